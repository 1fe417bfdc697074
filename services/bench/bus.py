"""`livepipe bench bus [--json]`: one-hop latency publisher process -> broker -> subscriber process.

Two streams: 20 ms audio chunks (640 B payload on audio.in) and 100 KB
JPEG-sized payloads (on video.in). Every hop is a real process on loopback TCP through a real
`livepipe broker` subprocess:

  livepipe: a `Service` publishing with `Service.publish` -> broker -> a `Service` handler
            (asyncio runtime, decode + validate + dispatch), i.e. the code path services use;
  raw:      pyzmq PUB (an XPUB, to see the subscription arrive) -> the same broker -> a blocking
            SUB, no envelope: the baseline, measured in the same run.

Latency = receive time - send time, both from time.time_ns() (one system-wide clock; the
perf counter is not comparable across processes). livepipe's send time is the header `ts`,
taken at the start of `publish`; its receive time is taken at the top of the handler. Raw
carries its send time in the payload. Paced on an absolute clock: audio every 2 ms (10x
real time: thousands of samples in seconds without saturating a 2-core machine), JPEG every
20 ms (20x a camera's 1 fps); warm-up messages (--warmup audio, a quarter of it JPEG) are
excluded. raw and livepipe take turns in --rounds blocks per stream, so both meet the same
background load. `lost` counts livepipe messages that never reached the handler, whatever
the reason, including video frames the video lane's newest-frame-only policy replaced
(`video_stale_dropped` says how many of those; they need a > 20 ms stall of the subscriber).

CPU per message at the real cadence (`--cadence-count`, default 500 per system): audio.in messages
every 20 ms, as capture-audio sends them, raw and livepipe in alternating blocks; the CPU time of the
publisher, the broker and the subscriber over each block (the scheduler's ns counts: report.run_seconds),
divided by the messages sent. At 10x real time the processes never fall asleep between messages; at 50 a second
each message wakes all three, which is what a conversation costs (`audio_cpu_us_per_msg`,
`audio_hop_cpu_pct_of_core`: one 50-a-second stream across one hop, in % of one core). These
messages are left out of the latency figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import struct
import subprocess
import sys
import time
from typing import Any

from livepipe.services.bench.report import run_seconds
from livepipe.services.dev.harness import PortTimeout, spawn_livepipe, start_broker, stop_process
from livepipe.services.lib.stats import percentile
from livepipe.services.lib.verb import VerbParser, fail, verb

AUDIO_BYTES = 640          # 20 ms of 16 kHz mono s16le
JPEG_BYTES = 100_000
RAW_PREFIX = struct.Struct("<QQ")   # (seq, send time ns) at the start of a raw payload
CADENCE_S = 0.020                  # capture-audio's chunk: the pace of the CPU-per-message phase


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = VerbParser(prog="livepipe bench bus", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--audio-count", type=int, default=3000, help="measured audio messages (default 3000)")
    p.add_argument("--audio-interval-ms", type=float, default=2.0, help="audio pacing (default 2 ms)")
    p.add_argument("--jpeg-count", type=int, default=400, help="measured JPEG messages (default 400)")
    p.add_argument("--jpeg-interval-ms", type=float, default=20.0, help="JPEG pacing (default 20 ms)")
    p.add_argument("--warmup", type=int, default=200,
                   help="audio messages excluded at the start (default 200; JPEG: a quarter of it)")
    p.add_argument("--cadence-count", type=int, default=500,
                   help="audio messages per system sent every 20 ms to measure CPU per message (default 500; 0: skip)")
    p.add_argument("--rounds", type=int, default=10,
                   help="raw and livepipe alternate in this many blocks per stream (default 10)")
    p.add_argument("--role", choices=["lp-pub", "lp-sub", "raw-pub", "raw-sub"], help=argparse.SUPPRESS)
    p.add_argument("--pub", help=argparse.SUPPRESS)
    p.add_argument("--sub", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# Raw topics of their own, so the raw and livepipe subscribers never see each other's traffic.
RAW_TOPICS = {"audio": b"raw.audio", "jpeg": b"raw.jpeg"}


def jpeg_like(size: int) -> bytes:
    """JPEG-sized bytes with JPEG markers; the bus never decodes them, only carries them."""
    return b"\xff\xd8\xff\xe0" + os.urandom(size - 6) + b"\xff\xd9"


# Publishers take orders on stdin, one block at a time: "audio N" / "jpeg N" sends N paced
# messages and answers "done"; "quit" exits. The orchestrator alternates raw and livepipe
# blocks, so both see the same background load (a shared 2-core machine is noisy).

# ----------------------------------------------------------------- livepipe
def lp_pub(args: argparse.Namespace) -> int:
    from livepipe.bus import Service, setup_logging
    from livepipe.bus.config import BusConfig

    setup_logging("bench-pub", "WARNING")
    svc = Service("bench-pub", BusConfig.from_env(pub_endpoint=args.pub, sub_endpoint=args.sub))
    audio, jpeg = bytes(AUDIO_BYTES), jpeg_like(JPEG_BYTES)
    intervals = {"audio": args.audio_interval_ms / 1000, "jpeg": args.jpeg_interval_ms / 1000,
                 "cadence": CADENCE_S}

    async def run(svc: Service) -> int:
        for topic in ("audio.in", "video.in"):
            if not await svc.wait_subscriber(topic, 10):
                raise RuntimeError(f"no subscriber for {topic}")
        loop = asyncio.get_running_loop()
        print("READY", flush=True)
        while True:
            order = (await loop.run_in_executor(None, sys.stdin.readline)).split()
            if not order or order[0] == "quit":
                break
            stream, count = order[0], int(order[1])
            t0 = time.monotonic()
            for i in range(count):
                delay = t0 + i * intervals[stream] - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if stream != "jpeg":
                    svc.publish("audio.in", "audio", audio, rate=16000, channels=1, sample_width=2, frames=320)
                else:
                    svc.publish("video.in", "image", jpeg, image_width=768, image_height=768, mime="image/jpeg")
            await asyncio.sleep(0.05)   # drained before the next block starts
            print(json.dumps({"done": stream, "dropped": svc.counters["dropped"]}), flush=True)
        return 0

    return svc.main(run)


def lp_sub(args: argparse.Namespace) -> int:
    from livepipe.bus import Service, setup_logging
    from livepipe.bus.config import BusConfig

    setup_logging("bench-sub", "WARNING")
    svc = Service("bench-sub", BusConfig.from_env(pub_endpoint=args.pub, sub_endpoint=args.sub))
    lat: dict[str, list[tuple[int, int]]] = {"audio": [], "jpeg": []}

    def handler(samples: list[tuple[int, int]]):
        def on_message(msg) -> None:
            now = time.time_ns()   # first thing in the handler: decode/validate/dispatch are included
            samples.append((msg.header["seq"], now - msg.header["ts"]))
        return on_message

    svc.on("audio.in", handler(lat["audio"]))
    svc.on("video.in", handler(lat["jpeg"]))

    async def run(svc: Service) -> None:
        print("READY", flush=True)
        await asyncio.Event().wait()   # until SIGTERM

    code = svc.main(run)
    print(json.dumps({"samples": lat, "counters": dict(svc.counters)}), flush=True)
    return code


# ---------------------------------------------------------------------- raw
def raw_pub(args: argparse.Namespace) -> int:
    import zmq

    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)    # sends exactly like PUB; also shows when the subscription is live
    pub.linger = 1000
    pub.sndhwm = 50_000
    pub.connect(args.pub)
    wanted = set(RAW_TOPICS.values())
    deadline = time.monotonic() + 10
    while wanted and time.monotonic() < deadline:
        if pub.poll(100):
            msg = pub.recv()
            wanted.discard(msg[1:])
    if wanted:
        print(f"raw publisher: no subscriber for {wanted}", file=sys.stderr)
        return 1
    bodies = {"audio": bytearray(AUDIO_BYTES), "jpeg": bytearray(jpeg_like(JPEG_BYTES))}
    intervals = {"audio": args.audio_interval_ms / 1000, "jpeg": args.jpeg_interval_ms / 1000,
                 "cadence": CADENCE_S}
    seqs = {"audio": 0, "jpeg": 0}
    print("READY", flush=True)
    for line in sys.stdin:
        order = line.split()
        if not order or order[0] == "quit":
            break
        stream, count = order[0], int(order[1])
        kind = "audio" if stream == "cadence" else stream   # cadence: audio at the real 20 ms pace
        topic, body = RAW_TOPICS[kind], bodies[kind]
        t0 = time.monotonic()
        for i in range(count):
            delay = t0 + i * intervals[stream] - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            RAW_PREFIX.pack_into(body, 0, seqs[kind], time.time_ns())
            pub.send_multipart([topic, body])
            seqs[kind] += 1
        time.sleep(0.05)
        print(json.dumps({"done": stream, "dropped": 0}), flush=True)
    pub.close()
    ctx.term()
    return 0


def raw_sub(args: argparse.Namespace) -> int:
    import signal

    import zmq

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.rcvhwm = 50_000
    sub.connect(args.sub)
    for topic in RAW_TOPICS.values():
        sub.subscribe(topic)
    lat: dict[str, list[tuple[int, int]]] = {"audio": [], "jpeg": []}
    stream_of = {topic: stream for stream, topic in RAW_TOPICS.items()}
    stopped: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
    print("READY", flush=True)
    while not stopped:
        if not sub.poll(100):
            continue
        topic, body = sub.recv_multipart()
        now = time.time_ns()
        seq, sent = RAW_PREFIX.unpack_from(body)
        lat[stream_of[topic]].append((seq, now - sent))
    sub.close()
    ctx.term()
    print(json.dumps({"samples": lat}), flush=True)
    return 0


# ------------------------------------------------------------- orchestrator
def spawn(args: list[str], stdin: int | None = None) -> subprocess.Popen:
    return spawn_livepipe(args, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class Pair:
    """A subscriber and a publisher process of one kind (raw or lp), driven block by block."""

    def __init__(self, kind: str, common: list[str]) -> None:
        self.kind = kind
        self.sub = spawn([*common, "--role", f"{kind}-sub"])
        self._expect_ready(self.sub, "subscriber")
        self.pub = spawn([*common, "--role", f"{kind}-pub"], stdin=subprocess.PIPE)
        self._expect_ready(self.pub, "publisher")
        self.sent = {"audio": 0, "jpeg": 0}
        self.dropped = 0

    def _expect_ready(self, proc: subprocess.Popen, what: str) -> None:
        line = proc.stdout.readline()
        if line.strip() != "READY":
            proc.kill()
            raise RuntimeError(f"{self.kind} {what} failed: {line.strip()} {proc.communicate()[1].strip()}")

    def send(self, stream: str, count: int) -> None:
        self.pub.stdin.write(f"{stream} {count}\n")
        self.pub.stdin.flush()
        line = self.pub.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.kind} publisher died: {self.pub.communicate()[1].strip()}")
        self.dropped = json.loads(line)["dropped"]
        self.sent["jpeg" if stream == "jpeg" else "audio"] += count

    def send_measured(self, count: int, broker: subprocess.Popen) -> dict[str, float]:
        """`count` audio messages at the real cadence: CPU seconds each process spent meanwhile."""
        procs = {"publisher": self.pub, "broker": broker, "subscriber": self.sub}
        before = {name: run_seconds(proc) for name, proc in procs.items()}
        self.send("cadence", count)
        return {name: run_seconds(proc) - before[name] for name, proc in procs.items()}


    def finish(self) -> dict[str, Any]:
        self.pub.stdin.write("quit\n")
        self.pub.stdin.flush()
        self.pub.communicate(timeout=5)
        self.sub.terminate()
        out, err = self.sub.communicate(timeout=5)
        if not out.strip():
            raise RuntimeError(f"{self.kind} subscriber gave no result: {err.strip()}")
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        for proc in (self.pub, self.sub):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def pct_us(values_ns: list[int], q: float) -> float | None:
    value = percentile(values_ns, q)
    return None if value is None else round(value / 1000, 1)


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    try:
        broker, env = start_broker(os.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except PortTimeout as exc:
        raise RuntimeError(f"broker did not listen on {exc.port}") from None
    pub_ep, sub_ep = env["LIVEPIPE_PUB_ENDPOINT"], env["LIVEPIPE_SUB_ENDPOINT"]
    common = ["bench", "bus", "--pub", pub_ep, "--sub", sub_ep, "--audio-interval-ms", str(args.audio_interval_ms),
              "--jpeg-interval-ms", str(args.jpeg_interval_ms)]
    pairs: dict[str, Pair] = {}
    warmup = {"audio": args.warmup, "jpeg": max(1, args.warmup // 4)}
    try:
        for kind in ("raw", "lp"):
            pairs[kind] = Pair(kind, common)
        for pair in pairs.values():      # warm-up: excluded below by sequence number
            pair.send("audio", warmup["audio"])
            pair.send("jpeg", warmup["jpeg"])
        for r in range(args.rounds):     # alternate who goes first, so neither always follows the other
            order = ("raw", "lp") if r % 2 == 0 else ("lp", "raw")
            for stream, total in (("audio", args.audio_count), ("jpeg", args.jpeg_count)):
                count = total // args.rounds + (1 if r < total % args.rounds else 0)
                for kind in order:
                    pairs[kind].send(stream, count)
        # CPU per message at the real cadence, after the latency rounds (so excluded from them by
        # sequence number): two blocks per system, alternating.
        cpu: dict[str, dict[str, float]] = {kind: {} for kind in pairs}
        blocks = 2 if args.cadence_count >= 2 else args.cadence_count
        for b in range(blocks):
            for kind in (("raw", "lp") if b % 2 == 0 else ("lp", "raw")):
                n = args.cadence_count // blocks + (1 if b < args.cadence_count % blocks else 0)
                for name, secs in pairs[kind].send_measured(n, broker).items():
                    cpu[kind][name] = cpu[kind].get(name, 0.0) + secs
        results = {kind: pair.finish() for kind, pair in pairs.items()}
    finally:
        for pair in pairs.values():
            pair.kill()
        stop_process(broker)
    out: dict[str, Any] = {}
    lost = {}
    for kind, prefix in (("lp", ""), ("raw", "raw_")):
        res = results[kind]
        missing = 0
        for stream in ("audio", "jpeg"):
            end = warmup[stream] + (args.audio_count if stream == "audio" else args.jpeg_count)
            measured = [lat for seq, lat in res["samples"][stream] if warmup[stream] <= seq < end]
            out[f"{prefix}{stream}_p50_us"] = pct_us(measured, 50)
            out[f"{prefix}{stream}_p99_us"] = pct_us(measured, 99)
            out[f"{prefix}{stream}_max_us"] = pct_us(measured, 100)
            received = {seq for seq, _ in res["samples"][stream]}
            missing += pairs[kind].sent[stream] - len(received)
        lost[kind] = missing
    if args.cadence_count:
        for kind, prefix in (("lp", ""), ("raw", "raw_")):
            per = {name: round(secs / args.cadence_count * 1e6, 1) for name, secs in cpu[kind].items()}
            per["total"] = round(sum(per.values()), 1)
            out[f"{prefix}audio_cpu_us_per_msg"] = per
            out[f"{prefix}audio_hop_cpu_pct_of_core"] = round(per["total"] / (CADENCE_S * 1e6) * 100, 2)
        if out["raw_audio_cpu_us_per_msg"]["total"]:
            out["audio_cpu_ratio"] = round(out["audio_cpu_us_per_msg"]["total"] / out["raw_audio_cpu_us_per_msg"]["total"], 2)
    out["lost"] = lost["lp"]
    out["raw_lost"] = lost["raw"]
    for stream in ("audio", "jpeg"):
        if out[f"raw_{stream}_p99_us"] and out[f"{stream}_p99_us"] is not None:
            out[f"{stream}_p99_ratio"] = round(out[f"{stream}_p99_us"] / out[f"raw_{stream}_p99_us"], 2)
            out[f"{stream}_p50_ratio"] = round(out[f"{stream}_p50_us"] / out[f"raw_{stream}_p50_us"], 2)
    out.update({
        "audio_samples": args.audio_count, "audio_interval_ms": args.audio_interval_ms,
        "jpeg_samples": args.jpeg_count, "jpeg_interval_ms": args.jpeg_interval_ms, "warmup": warmup,
        "rounds": args.rounds, "cadence_count": args.cadence_count, "cadence_ms": CADENCE_S * 1000,
        "publisher_dropped": pairs["lp"].dropped,
        "video_stale_dropped": results["lp"].get("counters", {}).get("stale_dropped", 0),
        "subscriber_counters": {k: v for k, v in results["lp"].get("counters", {}).items() if v},
        "transport": "tcp loopback via livepipe broker", "cpus": os.cpu_count(),
        "seconds": round(time.monotonic() - started, 1),
    })
    return out


@verb("bench bus")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.role:
        return {"lp-pub": lp_pub, "lp-sub": lp_sub, "raw-pub": raw_pub, "raw-sub": raw_sub}[args.role](args)
    try:
        result = orchestrate(args)
    except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
        return fail("bench bus", exc)
    if args.json:
        print(json.dumps(result))
    else:
        for stream in ("audio", "jpeg"):
            print(f"{stream:<6} livepipe p50 {result[f'{stream}_p50_us']} us  p99 {result[f'{stream}_p99_us']} us   "
                  f"raw pyzmq p50 {result[f'raw_{stream}_p50_us']} us  p99 {result[f'raw_{stream}_p99_us']} us   "
                  f"p99 ratio {result.get(f'{stream}_p99_ratio')}")
        if result.get("audio_cpu_us_per_msg"):
            print(f"CPU per audio message every {result['cadence_ms']:g} ms (publisher, broker, subscriber): livepipe "
                  f"{result['audio_cpu_us_per_msg']}, raw pyzmq {result['raw_audio_cpu_us_per_msg']} us; "
                  f"one 50/s stream across one hop: {result['audio_hop_cpu_pct_of_core']} % of a core "
                  f"(raw {result['raw_audio_hop_cpu_pct_of_core']} %)")
        print(f"lost {result['lost']} (raw {result['raw_lost']}), {result['seconds']} s")
    return 0
