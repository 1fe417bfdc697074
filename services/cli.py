"""`livepipe VERB ...`: one command, a verb per process and tool.

Each verb's module is imported only when that verb runs, so `livepipe tap` never pays
for google-genai, sounddevice or OpenCV.
"""
from __future__ import annotations

import importlib
import sys

# verb -> (module, one-line help). Every module has `main(argv: list[str]) -> int`.
VERBS: dict[str, tuple[str, str]] = {
    "broker": ("services.broker", "the XSUB/XPUB rendezvous every process connects to"),
    "keys": ("services.keys", "generate CURVE key pairs for the broker and its clients"),
    "tap": ("services.tap", "print, or measure (--stats), what flows on topics"),
    "top": ("services.top", "a live table per process, from the heartbeats"),
    "record": ("services.record", "record topics to a file"),
    "replay": ("services.replay", "republish a recording (--speed, --loop)"),
    "export": ("services.export", "write an audio topic of a recording as WAV"),
    "say": ("services.say", "publish a line of text on text.in"),
    "emulator": ("services.emulator", "a local Live API emulator (the default backend with no key)"),
    "gemini-bridge": ("services.gemini_bridge", "the Live API session on the bus"),
    "capture-audio": ("services.capture_audio", "microphone or WAV file -> audio.in"),
    "playback": ("services.playback", "audio.out -> speaker or WAV file, with instant interrupt"),
    "capture-video": ("services.capture_video", "camera, file or screen -> JPEG frames on video.in"),
    "demo": ("services.demo", "a scripted conversation that runs anywhere"),
    "bench": ("services.bench", "benchmarks printing JSON: bench bus | interrupt | ..."),
}


def usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: livepipe VERB [options]   (livepipe VERB --help for a verb's options)", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"livepipe: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
