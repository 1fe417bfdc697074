"""What every benchmark shares: per-process CPU time, and one way to print a result."""
from __future__ import annotations

import json
import os
import subprocess
from typing import Any, Mapping

import psutil


def cpu_seconds(procs: Mapping[str, subprocess.Popen]) -> dict[str, float]:
    """User + system CPU seconds so far of each named process (0.0 for one already gone)."""
    out = {}
    for name, proc in procs.items():
        try:
            t = psutil.Process(proc.pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            out[name] = 0.0
    return out


def run_seconds(proc: subprocess.Popen) -> float:
    """CPU seconds a process's threads have run so far: the scheduler's nanosecond count summed over
    /proc/PID/task/*/schedstat (cpu_seconds counts 10 ms ticks, too coarse for a few seconds of ~1 %
    load); cpu_seconds' figure where schedstat is missing."""
    total, found = 0, False
    try:
        for tid in os.listdir(f"/proc/{proc.pid}/task"):
            try:
                with open(f"/proc/{proc.pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
                    found = True
            except (OSError, ValueError, IndexError):
                pass   # a thread that just ended
    except OSError:
        pass
    return total / 1e9 if found else cpu_seconds({"p": proc})["p"]


def print_result(result: dict[str, Any], as_json: bool) -> None:
    """One JSON object with --json, else one aligned `key value` line per figure."""
    if as_json:
        print(json.dumps(result))
        return
    width = max(map(len, result), default=0) + 2
    for key, value in result.items():
        print(f"{key:{width}} {value}")
