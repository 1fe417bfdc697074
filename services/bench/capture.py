"""`livepipe bench capture [--json]`: what the audio.in chunk length costs, to choose its default.

For each chunk length, a real `livepipe capture-audio` records a PulseAudio virtual
microphone (started if none is reachable) through a real broker for `--seconds`, while this
process subscribes to audio.in. Measured per length: how old a chunk's first sample is when
it reaches a subscriber (capture_ts -> receipt: the latency the chunking adds), messages per
second, and the CPU of capture-audio, the broker and the subscriber (ms of CPU per second
of audio, from psutil). The subscriber stands in for the bridge, whose per-message cost
(base64 + a websocket frame per chunk) scales the same way.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig
from livepipe.services.dev.harness import BenchError, HarnessError, ProcessExited, spawn_livepipe, start_broker, stop_process
from livepipe.services.lib.stats import percentile
from livepipe.services.lib.verb import VerbParser, verb
from livepipe.services.dev.pulse import PulseDaemon


def measure(env: dict[str, str], chunk_ms: int, seconds: float, workdir: Path, ps_broker: psutil.Process) -> dict:
    proc = spawn_livepipe(["capture-audio", "--chunk-ms", str(chunk_ms)], env, log=workdir / f"capture-{chunk_ms}.log")
    try:
        with BusClient("bench-capture", BusConfig.from_env(env), ["audio.in"]) as client:
            client.wait_ready()
            if client.recv(20) is None:   # the first input stream of a process is slow to start
                raise BenchError(f"no audio.in from capture-audio: {(workdir / f'capture-{chunk_ms}.log').read_text()[-500:]}")
            ps_capture = psutil.Process(proc.pid)
            me = psutil.Process()
            t0 = time.monotonic()
            cpu0 = (sum(ps_capture.cpu_times()[:2]), sum(me.cpu_times()[:2]), sum(ps_broker.cpu_times()[:2]))
            ages, n = [], 0
            while time.monotonic() - t0 < seconds:
                msg = client.recv(1.0)
                if msg is None:
                    raise BenchError("audio.in stopped")
                ages.append((msg.recv_ns - msg["capture_ts"]) / 1e6)
                n += 1
            wall = time.monotonic() - t0
            cpu1 = (sum(ps_capture.cpu_times()[:2]), sum(me.cpu_times()[:2]), sum(ps_broker.cpu_times()[:2]))
    finally:
        stop_process(proc)
    return {"chunk_ms": chunk_ms, "messages_per_s": round(n / wall, 1),
            "age_at_subscriber_p50_ms": round(float(percentile(ages, 50)), 2),
            "age_at_subscriber_p99_ms": round(float(percentile(ages, 99)), 2),
            "capture_cpu_ms_per_s": round((cpu1[0] - cpu0[0]) * 1000 / wall, 2),
            "subscriber_cpu_ms_per_s": round((cpu1[1] - cpu0[1]) * 1000 / wall, 2),
            "broker_cpu_ms_per_s": round((cpu1[2] - cpu0[2]) * 1000 / wall, 2)}


@verb("bench capture")
def main(argv: list[str]) -> int:
    p = VerbParser(prog="livepipe bench capture", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--chunks", default="10,20,30,40", help="chunk lengths in ms (default 10,20,30,40)")
    p.add_argument("--seconds", type=float, default=8.0, help="measuring time per length (default 8)")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="livepipe-bench-capture-"))
    daemon = PulseDaemon.ensure()   # PulseError: one line from @verb
    devices = daemon.private_devices()
    feeder = None
    broker = None
    results = []
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPIPE_")}
        env.update(daemon.env, PULSE_SOURCE=devices.virtual_mic, PYTHONUNBUFFERED="1")
        try:
            broker, env = start_broker(env, log=workdir / "broker.log")
        except ProcessExited:
            raise BenchError("broker exited") from None
        except HarnessError as exc:
            raise BenchError(str(exc)) from None
        # Something to capture: a tone played into the microphone for the whole run.
        feeder = subprocess.Popen(["pacat", f"--device={devices.mic_feed}", "--rate=16000", "--channels=1",
                                   "--format=s16le", "--raw", "--latency-msec=100"],
                                  env={**os.environ, **daemon.env}, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
        t = np.arange(16000 * 300) / 16000
        tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()
        threading.Thread(target=lambda: _feed(feeder, tone), daemon=True).start()
        ps_broker = psutil.Process(broker.pid)
        for chunk_ms in [int(x) for x in args.chunks.split(",")]:
            results.append(measure(env, chunk_ms, args.seconds, workdir, ps_broker))
    finally:
        if feeder is not None:
            feeder.kill()
            feeder.wait()
        if broker is not None:
            stop_process(broker)
        devices.close()
        daemon.close()
    out = {"results": results, "seconds_per_length": args.seconds}
    if args.json:
        print(json.dumps(out))
    else:
        for r in results:
            print("  ".join(f"{k}={v}" for k, v in r.items()))
    return 0


def _feed(proc: subprocess.Popen, data: bytes) -> None:
    try:
        proc.stdin.write(data)
        proc.stdin.close()
    except (BrokenPipeError, ValueError, OSError):
        pass
