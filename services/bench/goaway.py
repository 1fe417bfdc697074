"""`livepipe bench goaway [--json]`: the gap in audio.in delivery to the model across goAway switchovers.

Starts a broker, the emulator (a goAway every --every seconds per connection) and gemini-bridge as
subprocesses, streams real speech (espeak-ng) on audio.in in real time, and reads the bridge's
per-switchover measurement: wall time between the last audio written to the old connection and the
first written to the new one. Baseline in the same run: the chunk cadence of the stream (20 ms), the
gap a switchover-free stream shows between two writes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from livepipe.services.dev.harness import spawn_livepipe, start_broker, stop_process
from livepipe.services.lib.audio import read_wav_int16
from livepipe.services.lib.stats import percentile
from livepipe.services.lib.verb import VerbParser, verb


def _speech(text: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.wav"
        subprocess.run(["espeak-ng", "-s", "190", "-w", str(path), text], check=True, capture_output=True)
        return read_wav_int16(path, 16000)[0]


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return spawn_livepipe(args, env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _stop(proc: subprocess.Popen) -> str:
    return stop_process(proc)[1]


@verb("bench goaway")
def main(argv: list[str]) -> int:
    p = VerbParser(prog="livepipe bench goaway", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("--seconds", type=float, default=20.0, help="how long to stream (default 20)")
    p.add_argument("--every", type=float, default=1.0, help="goAway this long after each connection (default 1)")
    p.add_argument("--bridge-log", metavar="FILE", help="save the bridge's log there")
    args = p.parse_args(argv)
    from livepipe.bus.client import BusClient
    from livepipe.bus.config import BusConfig

    state = tempfile.mkdtemp(prefix="livepipe-bench-goaway-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LIVEPIPE_", "GEMINI_", "GOOGLE_API"))}
    env.update(LIVEPIPE_STATE_DIR=state, PYTHONUNBUFFERED="1")
    broker, env = start_broker(env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs = [broker,
             _spawn(["emulator", "--port", "0", "--latency", "0.05", "--pace", "4", "--goaway-after", str(args.every),
                     "--goaway-grace", "3"], env)]
    bridge = _spawn(["gemini-bridge"], env)
    words = [_speech(t) for t in ("Hello there, how are you", "What time is it", "Tell me a story about a cat")]
    gap = np.zeros(int(1.2 * 16000), np.int16)
    stream = np.concatenate([np.concatenate([w, gap]) for w in words])
    client = BusClient("bench-goaway", BusConfig.from_env(env))
    try:
        client.wait_ready(15)
        client.wait_subscriber("audio.in", 30)
        time.sleep(0.5)   # let the first connection come up
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < args.seconds:
            chunk = stream[(n * 320) % len(stream):][:320]
            client.publish("audio.in", "audio", chunk.tobytes(), rate=16000, channels=1, sample_width=2,
                           frames=len(chunk))
            n += 1
            time.sleep(max(0.0, t0 + n * 0.02 - time.monotonic()))
        # Stop while the stream is still "live": after it, a switchover's first write would measure idle time.
    finally:
        client.close()
        err = _stop(bridge)
        if args.bridge_log:
            Path(args.bridge_log).write_text(err)
        for proc in reversed(procs):
            _stop(proc)
    gaps = [float(g) for g in re.findall(r"resumed on connection \d+: ([\d.]+) ms after", err)]
    waits = [float(w) for w in re.findall(r"\((\d+) ms of it letting the model finish", err)]
    # Switchovers that did not wait for a model turn: the pure connection-change gap.
    quick = [g for g, w in zip(gaps, waits) if w < 1.0] if len(waits) == len(gaps) else []
    dropped = "dropping the oldest audio" in err
    result = {"bench": "goaway", "seconds": args.seconds, "goaway_every_s": args.every,
              "switchovers": len(gaps), "audio_lost": dropped, "baseline_chunk_cadence_ms": 20.0}
    if gaps:
        result.update(gap_ms_median=round(float(np.median(gaps)), 1),
                      gap_ms_p90=round(float(percentile(gaps, 90)), 1),
                      gap_ms_p99=round(float(percentile(gaps, 99)), 1), gap_ms_max=max(gaps),
                      median_vs_cadence=round(float(np.median(gaps)) / 20.0, 2),
                      switchovers_waiting_for_a_turn=sum(1 for w in waits if w >= 1.0))
    if quick:
        result.update(no_turn_gap_ms_median=round(float(np.median(quick)), 1),
                      no_turn_gap_ms_p99=round(float(percentile(quick, 99)), 1), no_turn_gap_ms_max=max(quick))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if gaps else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
