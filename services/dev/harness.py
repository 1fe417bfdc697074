"""Process helpers for benchmarks and tests: start livepipe verbs as real subprocesses,
a broker on free ports, stop them.

Standard library only (no google-genai, sounddevice or cv2), so any bench or test can import it.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from livepipe.services.lib.net import free_port
from livepipe.services.lib.verb import VerbError

HOST = "127.0.0.1"

__all__ = ["BenchError", "HarnessError", "ProcessExited", "PortTimeout", "free_port", "livepipe_cmd",
           "spawn_livepipe", "stop_process", "stop_processes", "wait_for_port", "wait_for_ports", "start_broker"]


class HarnessError(VerbError, RuntimeError):
    """A helper process did not come up."""


class BenchError(HarnessError):
    """A benchmark could not measure what it measures; the message is one line for the user."""


class ProcessExited(HarnessError):
    """The process exited while we waited for it; `detail` is its stderr or log tail."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name} exited: {detail}")
        self.name, self.detail = name, detail


class PortTimeout(HarnessError):
    """The port did not accept connections in time."""

    def __init__(self, name: str, port: int) -> None:
        super().__init__(f"{name} not listening on {port}")
        self.name, self.port = name, port


def livepipe_cmd(*args: str) -> list[str]:
    """The command line of `livepipe ARGS...` run with this interpreter."""
    return [sys.executable, "-m", "livepipe.services", *args]


def spawn_livepipe(args: list[str], env: Mapping[str, str] | None = None, log: Path | None = None,
                   **popen_kw: Any) -> subprocess.Popen:
    """Start `python -m livepipe.services ARGS...` (works from any directory: the package is installed).

    With `log`, stdout and stderr are appended to that file; otherwise `popen_kw` decides
    (stdout=, stderr=, stdin=, text=...)."""
    env = dict(env) if env is not None else None
    if log is not None:
        with open(log, "ab") as f:
            return subprocess.Popen(livepipe_cmd(*args), env=env, stdout=f, stderr=f, **popen_kw)
    return subprocess.Popen(livepipe_cmd(*args), env=env, **popen_kw)


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> tuple[Any, Any]:
    """SIGTERM, wait up to `timeout`, SIGKILL if needed; returns (stdout, stderr) as communicate() does."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def stop_processes(procs: Iterable[subprocess.Popen], timeout: float = 5.0) -> list[tuple[Any, Any]]:
    """stop_process for several processes at once: SIGTERM to all first, so their shutdowns overlap
    instead of adding up; then each is waited for (SIGKILL after `timeout`). Outputs in order.

    Only for processes that may stop in any order: a broker goes after its clients (a client
    whose broker is gone waits out its socket linger)."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    outs = []
    deadline = time.monotonic() + timeout
    for proc in procs:   # one SIGTERM each: a second one, while a process stops, would kill it (rc -15)
        try:
            outs.append(proc.communicate(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            proc.kill()
            outs.append(proc.communicate())
    return outs


def _exit_detail(proc: subprocess.Popen, log: Path | None) -> str:
    if proc.stderr is not None:
        err = proc.communicate()[1] or ""
        return (err.decode(errors="replace") if isinstance(err, bytes) else err).strip()
    if log is not None:
        try:
            return log.read_text(errors="replace")[-500:]
        except OSError:
            pass
    return f"exit code {proc.returncode}"


def wait_for_ports(ports: Iterable[int], proc: subprocess.Popen, timeout: float = 10.0, name: str = "broker",
                   log: Path | None = None) -> None:
    """Return once every port on 127.0.0.1 accepts a connection (one deadline for all).

    Raises ProcessExited (with the process's stderr if piped, else the tail of `log`) if `proc`
    exits first, PortTimeout after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            if proc.poll() is not None:
                raise ProcessExited(name, _exit_detail(proc, log))
            try:
                socket.create_connection((HOST, port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise PortTimeout(name, port) from None
                time.sleep(0.02)


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 10.0, name: str = "broker",
                  log: Path | None = None) -> None:
    """wait_for_ports for one port."""
    wait_for_ports([port], proc, timeout, name, log)


def start_broker(env: Mapping[str, str], pub_port: int | None = None, sub_port: int | None = None,
                 extra: list[str] | None = None, log: Path | None = None, timeout: float = 10.0,
                 **popen_kw: Any) -> tuple[subprocess.Popen, dict[str, str]]:
    """Start `livepipe broker` on the given (default: free) ports and wait until both listen.

    Returns the process and a copy of `env` with LIVEPIPE_PUB_ENDPOINT/LIVEPIPE_SUB_ENDPOINT set.
    If the broker does not come up, it is stopped and ProcessExited/PortTimeout is raised."""
    pub = pub_port if pub_port is not None else free_port()
    sub = sub_port if sub_port is not None else free_port()
    env = {**env, "LIVEPIPE_PUB_ENDPOINT": f"tcp://{HOST}:{pub}", "LIVEPIPE_SUB_ENDPOINT": f"tcp://{HOST}:{sub}"}
    proc = spawn_livepipe(["broker", "--pub-bind", f"tcp://{HOST}:{pub}", "--sub-bind", f"tcp://{HOST}:{sub}",
                           *(extra or [])], env, log=log, **popen_kw)
    try:
        wait_for_ports((pub, sub), proc, timeout, "broker", log)
    except BaseException:
        if proc.poll() is None:
            stop_process(proc)
        raise
    return proc, env
