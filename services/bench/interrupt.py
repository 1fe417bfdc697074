"""`livepipe bench interrupt [--json]`: interrupt -> silence at a real audio device.

A PulseAudio null sink is the device (a daemon is started if none is reachable; it is
stopped again at the end if we started it). A real `livepipe broker` and `livepipe playback`
run as subprocesses on free ports; this process publishes replies on audio.out and, in the
middle of each, `control: interrupt`, with a BusClient, and records the sink's monitor.
Per run it measures from the interrupt's publish to the last non-silent sample read back
from the monitor (dated on the sink's sample clock, see bus/pulse.MonitorRecorder).

Baseline, same run: a playback started with --no-device-reset (it clears its queue but lets
the device buffer play out), i.e. what an interrupt costs without resetting the device.
"""
from __future__ import annotations

import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from livepipe.services.lib.audio import OUT_RATE, tone
from livepipe.bus.client import BusClient, BusTimeout
from livepipe.bus.config import BusConfig
from livepipe.services.bench.report import print_result
from livepipe.services.dev.harness import BenchError, HarnessError, spawn_livepipe, start_broker, stop_process
from livepipe.services.lib.stats import percentile
from livepipe.services.lib.verb import VerbParser, verb
from livepipe.services.dev.pulse import MonitorRecorder, PulseDaemon

SILENT = 8            # |sample| <= 8 (-72 dBFS) counts as silence
CHUNK = 960           # 40 ms audio.out chunks, as the bridge sends them


def _wait_event(client: BusClient, kind: str, turn: int, timeout: float = 10.0) -> Any:
    try:
        return client.wait_for("playback", kind, timeout, turn=turn)
    except BusTimeout:
        raise BenchError(f"no playback {kind} for turn {turn} within {timeout} s") from None


def _last_metrics(client: BusClient, timeout: float = 3.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = client.recv(max(0.0, deadline - time.monotonic()))
        if msg is not None and msg.topic == "status" and msg["src"] == "playback":
            return msg["metrics"]
    return {}


def run_series(env: dict[str, str], rec: MonitorRecorder, runs: int, period_ms: float, reset: bool,
               workdir: Path, rng: random.Random) -> tuple[list[float], list[float], dict]:
    """Start a playback, do `runs` interrupts mid-reply, return interrupt->silence ms per run."""
    log = workdir / f"playback-{'reset' if reset else 'noreset'}.log"
    args = ["playback", "--period-ms", str(period_ms)] + ([] if reset else ["--no-device-reset"])
    proc = spawn_livepipe(args, env, log=log)
    delays: list[float] = []
    observed: list[float] = []
    try:
        with BusClient("bench-interrupt", BusConfig.from_env(env), ["playback", "status"]) as client:
            client.wait_ready()
            deadline = time.monotonic() + 15
            while not client.has_subscriber("audio.out"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"playback did not start: {log.read_text()[-800:]}")
                client.pub.poll(50)
            for turn in range(1, runs + 1):
                reply = tone(rng.uniform(300, 900), 1.5, OUT_RATE, -12.0)
                for i in range(0, len(reply), CHUNK):   # the whole reply at once, like the Live API
                    part = reply[i:i + CHUNK]
                    client.publish("audio.out", "audio", part.tobytes(), rate=OUT_RATE, channels=1,
                                   sample_width=2, frames=len(part), turn=turn)
                started = _wait_event(client, "turn_started", turn)
                # Mid-reply, at a random phase of the device period.
                mid_s = rng.uniform(0.15, 0.6)
                if not rec.wait_frames(rec.index_at(started["first_sample_ts"]) + int(mid_s * OUT_RATE), 10):
                    raise BenchError("the monitor recording stalled")
                # The wait above returns just after a monitor block arrived: move off that phase
                # (publishing right after the sink rendered would flatter the figure).
                time.sleep(rng.uniform(0.0, period_ms / 1000))
                t_publish = time.time_ns()
                client.publish("control", "interrupt", turn=turn)
                _wait_event(client, "turn_finished", turn)
                # Record 250 ms past the interrupt, so the silence (or the tail) is on tape.
                if not rec.wait_frames(rec.index_at(t_publish) + int(0.25 * OUT_RATE), 10):
                    raise BenchError("the monitor recording stalled")
                on_clock, on_arrival = _silence_after(rec, t_publish)
                delays.append(on_clock)
                observed.append(on_arrival)
            metrics = _last_metrics(client)
    finally:
        stop_process(proc)
    return delays, observed, metrics


def _silence_after(rec: MonitorRecorder, t_publish: int) -> tuple[float, float]:
    """ms from `t_publish` to the end of the last non-silent sample of the reply it cut: dated on
    the sink's sample clock, and (an upper bound) when that sample's block reached the reader."""
    t0 = rec.t0_ns()
    heard = rec.samples()
    i_pub = rec.index_at(t_publish, t0)
    before = heard[max(0, i_pub - OUT_RATE // 50):i_pub]          # the 20 ms before the interrupt
    if not len(before) or np.max(np.abs(before.astype(np.int32))) <= SILENT:
        raise BenchError("the reply was not sounding when the interrupt was published")
    window = heard[i_pub:i_pub + int(0.25 * OUT_RATE)].astype(np.int32)
    loud = np.nonzero(np.abs(window) > SILENT)[0]
    last = i_pub + (int(loud[-1]) + 1 if len(loud) else 0)
    if len(loud) and loud[-1] >= len(window) - OUT_RATE // 100:
        raise BenchError("the reply was still sounding 250 ms after the interrupt")
    arrival = rec.arrival_of(max(i_pub, last - 1)) or rec.time_of(last, t0)
    return (rec.time_of(last, t0) - t_publish) / 1e6, (arrival - t_publish) / 1e6


def _pct(values: list[float], q: float) -> float:
    return round(float(percentile(values, q)), 2)


def bench(runs: int, baseline_runs: int, period_ms: float, seed: int) -> dict:
    rng = random.Random(seed)
    daemon = PulseDaemon.ensure()
    sink = f"lpbench{uuid.uuid4().hex[:6]}"
    module = daemon.load_null_sink(sink, OUT_RATE)
    workdir = Path(tempfile.mkdtemp(prefix="livepipe-bench-interrupt-"))
    broker = None
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPIPE_")}
        env.update(daemon.env, PULSE_SINK=sink, PYTHONUNBUFFERED="1")
        try:
            broker, env = start_broker(env, log=workdir / "broker.log")
        except HarnessError as exc:
            raise BenchError(str(exc)) from None
        # The recorder runs first: it also keeps the null sink on a short clock.
        with MonitorRecorder(f"{sink}.monitor", OUT_RATE, daemon.env, latency_ms=5) as rec:
            rec.wait_started()
            delays, observed, metrics = run_series(env, rec, runs, period_ms, True, workdir, rng)
            base, base_observed, _ = (run_series(env, rec, baseline_runs, period_ms, False, workdir, rng)
                                      if baseline_runs else ([], [], {}))
            # How tightly the monitor's sample clock is pinned to the wall clock.
            jitter_ms = float(percentile(rec.clock_offsets_ns(), 99)) / 1e6
    finally:
        if broker is not None:
            stop_process(broker)
        daemon.unload(module)
        daemon_started = daemon.started
        daemon.close()
    period = float(metrics.get("period_ms", period_ms))
    target = period + 5.0
    result: dict[str, Any] = {
        "interrupt_to_silence_p50_ms": _pct(delays, 50),
        "interrupt_to_silence_p99_ms": _pct(delays, 99),
        "interrupt_to_silence_max_ms": round(max(delays), 2),
        "interrupt_to_silence_min_ms": round(min(delays), 2),
        "observed_at_reader_p50_ms": _pct(observed, 50),
        "observed_at_reader_p99_ms": _pct(observed, 99),
        "device_period_ms": period,
        "runs": len(delays),
        "target_p99_ms": target,
        "meets_target": _pct(delays, 99) <= target,
        "device_latency_ms": metrics.get("device_latency_ms"),
        "playback_reset_max_ms": metrics.get("interrupt_reset_ms_max"),
        "device_underflows": metrics.get("device_underflows"),
        "monitor_clock_jitter_p99_ms": round(jitter_ms, 2),
        "pulse_daemon": "started" if daemon_started else "reused",
    }
    if base:
        result.update(baseline_no_reset_p50_ms=_pct(base, 50), baseline_no_reset_p99_ms=_pct(base, 99),
                      baseline_observed_at_reader_p99_ms=_pct(base_observed, 99), baseline_runs=len(base),
                      # ratio of upper bounds: the sample-clock figures sit near 0 ms
                      baseline_over_reset_observed_p99=round(_pct(base_observed, 99) / max(_pct(observed, 99), 0.1), 1))
    return result


@verb("bench interrupt")
def main(argv: list[str]) -> int:
    p = VerbParser(prog="livepipe bench interrupt", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--runs", type=int, default=50, help="interrupts mid-reply (default 50)")
    p.add_argument("--baseline-runs", type=int, default=20,
                   help="interrupts against a playback without device reset (default 20, 0 = skip)")
    p.add_argument("--period-ms", type=float, default=20.0, help="playback device period (default 20)")
    p.add_argument("--seed", type=int, default=1, help="random seed for reply pitch and interrupt moment")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be >= 1")
    result = bench(args.runs, args.baseline_runs, args.period_ms, args.seed)   # PulseError, BenchError: @verb
    print_result(result, args.json)
    return 0
