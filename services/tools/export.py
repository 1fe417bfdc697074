"""`livepipe export FILE --topic audio.out OUT.wav`: write an audio topic of a recording as WAV.

Chunks are placed at their timestamps (`capture_ts` when the header has one, else `ts`):
a pause in the stream (longer than --max-jitter-ms) or lost chunks (a sequence gap) become
silence up to where the timestamps say the next chunk starts. Every other chunk follows the
previous one directly: audio.out arrives faster than real time, and publishing jitter or
clock drift must not add clicks; no sample is ever dropped. --no-gaps concatenates all chunks. A WAV has one format, so a topic with mixed
sample rates, channels or widths is refused, as is one with several sources (pick one with --src).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from livepipe.bus.message import Message, decode
from livepipe.services.lib.audio import WavWriter
from livepipe.services.lib.recording import RecordingReader
from livepipe.services.lib.verb import VerbError, VerbParser, fail, verb
from livepipe.bus.topics import TOPICS, SchemaError


def audio_topics() -> list[str]:
    return [t.name for t in TOPICS.values() if any("frames" in k.required for k in t.kinds.values())]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = VerbParser(prog="livepipe export", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="a recording made by `livepipe record`")
    p.add_argument("out", metavar="OUT.wav", help="WAV file to write")
    p.add_argument("--topic", default="audio.out", help=f"audio topic to export: {', '.join(audio_topics())} "
                   "(default audio.out)")
    p.add_argument("--src", metavar="NAME", help="only messages from this process name")
    p.add_argument("--no-gaps", action="store_true", help="concatenate chunks, ignoring their timestamps")
    p.add_argument("--max-jitter-ms", type=float, default=30.0, metavar="MS",
                   help="a chunk less than MS later than the end of the previous one follows it directly "
                        "(default 30)")
    return p.parse_args(argv)


def fmt_name(fmt: tuple[int, int, int]) -> str:
    rate, channels, width = fmt
    layout = {1: "mono", 2: "stereo"}.get(channels, f"{channels} ch")
    return f"{rate} Hz {layout} {8 * width}-bit"


class ExportError(VerbError, ValueError):
    """A one-line reason why the topic cannot be written as one WAV."""


def chunks(path: str, topic: str, src: str | None):
    """Valid messages of `topic` (and `src`), in receipt order."""
    with RecordingReader(path) as reader:
        session = reader.session
        for _recv_ns, frames in reader:
            try:
                msg = decode(frames, session)
            except SchemaError:
                continue
            if msg.topic == topic and (src is None or msg.header["src"] == src):
                yield msg


def check(path: str, topic: str, src: str | None) -> tuple[tuple[int, int, int], int]:
    """(format, chunk count) of the topic, or ExportError."""
    formats: Counter[tuple[int, int, int]] = Counter()
    sources: Counter[str] = Counter()
    for msg in chunks(path, topic, src):
        formats[(msg["rate"], msg["channels"], msg["sample_width"])] += 1
        sources[msg["src"]] += 1
    if not formats:
        raise ExportError(f"{path} holds no valid {topic} messages{f' from {src}' if src else ''}")
    if len(sources) > 1:
        listed = ", ".join(f"{s} ({n} chunks)" for s, n in sources.most_common())
        raise ExportError(f"{topic} has several sources: {listed}; choose one with --src")
    if len(formats) > 1:
        listed = ", ".join(f"{fmt_name(f)} ({n} chunks)" for f, n in formats.most_common())
        raise ExportError(f"{topic} mixes formats: {listed}; a WAV file has one format, nothing written")
    (fmt, count), = formats.items()
    return fmt, count


def chunk_time_ns(msg: Message) -> int:
    return msg.get("capture_ts", msg["ts"])


def export(path: str, topic: str, out: str, src: str | None, gaps: bool, max_jitter_ms: float) -> dict:
    fmt, count = check(path, topic, src)
    rate, channels, width = fmt
    jitter_frames = int(max_jitter_ms * rate / 1000)
    written = silence = gap_count = 0    # in frames
    start_ns: int | None = None
    prev_end_ns, prev_inst, prev_seq = 0, "", 0
    tmp = Path(out).with_name(Path(out).name + ".part")
    try:
        with WavWriter(tmp, rate, channels, width) as wav:
            for msg in chunks(path, topic, src):
                t = chunk_time_ns(msg)
                if start_ns is None:
                    start_ns = t
                elif gaps:
                    # Silence only for a real pause: the stream stopped for a while (compared with
                    # the previous chunk) or chunks were lost (sequence gap), and we are behind the
                    # timestamps. Slow sample-clock drift alone never inserts a click.
                    lag = round((t - start_ns) * rate / 1e9) - written
                    paused = (t - prev_end_ns) * rate / 1e9 > jitter_frames
                    lost = msg["inst"] == prev_inst and msg["seq"] > prev_seq + 1
                    if lag > 0 and ((paused and lag > jitter_frames) or lost):
                        silence_byte = b"\x80" if width == 1 else b"\x00"   # 8-bit WAV is unsigned
                        wav.write_bytes(silence_byte * (lag * channels * width))
                        written += lag
                        silence += lag
                        gap_count += 1
                wav.write_bytes(msg.payload)
                written += msg["frames"]
                prev_end_ns = t + msg["frames"] * 1_000_000_000 // rate
                prev_inst, prev_seq = msg["inst"], msg["seq"]
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)   # never leave a half-written OUT.wav behind
    return {"out": out, "format": fmt_name(fmt), "chunks": count, "seconds": round(written / rate, 3),
            "gaps": gap_count, "silence_seconds": round(silence / rate, 3)}


@verb("export")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.topic not in audio_topics():
        return fail("export", f"{args.topic} is not an audio topic (audio topics: {', '.join(audio_topics())})", 2)
    if not Path(args.file).is_file():
        return fail("export", f"{args.file} does not exist")
    try:
        result = export(args.file, args.topic, args.out, args.src, not args.no_gaps, args.max_jitter_ms)
    except OSError as exc:   # ExportError and RecordingError are VerbErrors: one line, exit 1
        return fail("export", f"cannot write {args.out}: {exc.strerror or exc}")
    print(f"livepipe export: wrote {result['out']}: {result['seconds']:.2f} s of {result['format']} from "
          f"{result['chunks']} {args.topic} chunks ({result['gaps']} gaps, {result['silence_seconds']:.2f} s "
          f"of silence)", file=sys.stderr)
    return 0
