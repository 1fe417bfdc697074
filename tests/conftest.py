"""Shared fixtures: a real broker subprocess on free ports, and helpers to start livepipe verbs."""
from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import settings

# Randomized tests are reproducible: by default every run draws the same examples (derandomized,
# no example database, so a failure found once cannot be replayed into later runs of a checkout).
# HYPOTHESIS_PROFILE=explore draws fresh examples, for looking for new bugs by hand.
settings.register_profile("deterministic", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

from livepipe.services.dev import harness
from livepipe.bus.client import BusClient
from livepipe.bus.config import BusConfig
from livepipe.services.lib.net import free_port  # noqa: F401  (imported by test files)

ROOT = Path(__file__).resolve().parent.parent

# An xdist worker has COLUMNS=80 and LINES=24 in its environment (a plain run has neither); the
# processes the tests start inherit it, and `livepipe top` sized its table to 80 columns (no PID).
if "PYTEST_XDIST_WORKER" in os.environ:
    for _name in ("COLUMNS", "LINES"):
        os.environ.pop(_name, None)


def livepipe_cmd(*args: str) -> list[str]:
    return harness.livepipe_cmd(*args)


def spawn(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    """Start `livepipe ARGS...` as a real subprocess with stdout/stderr captured as text."""
    return harness.spawn_livepipe(args, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> tuple[str, str]:
    """SIGTERM, wait, SIGKILL if needed; returns (stdout, stderr)."""
    return harness.stop_process(proc, timeout)


def stop_all(procs: list[subprocess.Popen], timeout: float = 5.0) -> list[tuple[str, str]]:
    """stop() for processes that may stop in any order, signalled together so their shutdowns overlap."""
    return harness.stop_processes(procs, timeout)


class Broker:
    def __init__(self, env: dict[str, str], pub_port: int, sub_port: int, extra: list[str] | None = None) -> None:
        self.env, self.pub_port, self.sub_port, self.extra = env, pub_port, sub_port, extra or []
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        # Ready when both ports accept connections.
        self.proc, _ = harness.start_broker(self.env, self.pub_port, self.sub_port, self.extra,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self

    def stop(self) -> tuple[str, str]:
        assert self.proc is not None
        return stop(self.proc)


@pytest.fixture
def bus_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for livepipe processes pointing at a fresh broker on free ports."""
    pub, sub = free_port(), free_port()
    env = dict(os.environ)
    for k in list(env):
        if k.startswith(("LIVEPIPE_", "GEMINI_", "GOOGLE_API")):
            del env[k]
    env.update(LIVEPIPE_PUB_ENDPOINT=f"tcp://127.0.0.1:{pub}", LIVEPIPE_SUB_ENDPOINT=f"tcp://127.0.0.1:{sub}",
               LIVEPIPE_STATE_DIR=str(tmp_path / "state"), PYTHONUNBUFFERED="1")
    broker = Broker(env, pub, sub).start()
    env["_LIVEPIPE_TEST_BROKER_PID"] = str(broker.proc.pid)
    yield env
    broker.stop()


@pytest.fixture
def bus_cfg(bus_env: dict[str, str]) -> BusConfig:
    return BusConfig.from_env(bus_env)


@pytest.fixture
def client(bus_cfg: BusConfig) -> Iterator[BusClient]:
    """A test client on the bus, subscribed to nothing yet: call .subscribe() then .wait_ready()."""
    c = BusClient("test", bus_cfg)
    yield c
    c.close()


# pytest-xdist (`-n 2 --dist loadgroup`, pyproject's default; -n 0 runs without it) runs the suite on two
# workers. What it hands out is a group of tests, run on one worker in file order:
# - every test that uses sound devices (PulseAudio null sinks, real-time playback and capture) is in
#   one group, "devices", and solo (below): they run one after the other with nothing beside them, as
#   without xdist (beside another worker's test, audio played through a device had gaps);
# - every other test is grouped with its file, so a module-scoped fixture (the emulators, the
#   browser, the wheel's demo run) is still set up once.
DEVICE_FILES = {"test_capture_audio.py", "test_playback.py", "test_echo.py", "test_devices.py", "test_demo_devices.py"}
DEVICE_TESTS = {"test_bench_pipeline_runs_end_to_end"}   # its bench makes null sinks of its own


@pytest.hookimpl(tryfirst=True)   # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        devices = (item.path.name in DEVICE_FILES or getattr(item, "originalname", item.name) in DEVICE_TESTS
                   or "pulse" in getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.xdist_group("devices" if devices else item.path.stem))
        if devices:
            item.add_marker(pytest.mark.solo)


# Tests marked `solo` (timing that another worker's load would disturb: every test that uses sound
# devices, frames dated against the clock) run while no other test runs: a reader-writer lock over
# whole tests, module fixtures included. Every other test holds it shared; a solo test holds it
# exclusive, and keeps it when the next test of its worker is solo too (the device tests run as one
# block instead of taking turns with the other worker's tests); while it waits for the lock it holds
# the turnstile, so the other worker starts nothing new meanwhile.
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "solo: under pytest-xdist, run while no other test runs")


_exclusive: list = []   # the open lock files while this worker holds the lock exclusive


def _release_exclusive() -> None:
    for f in _exclusive:
        f.close()   # closing releases its flock
    _exclusive.clear()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)   # outermost: around pytest-timeout and reruns too
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    run_dir = item.config._tmp_path_factory.getbasetemp().parent   # shared by this run's workers
    if item.get_closest_marker("solo"):
        if not _exclusive:
            _exclusive.extend([open(run_dir / "solo-turnstile.lock", "a"), open(run_dir / "solo.lock", "a")])
            fcntl.flock(_exclusive[0], fcntl.LOCK_EX)
            fcntl.flock(_exclusive[1], fcntl.LOCK_EX)
        try:
            yield
        finally:
            if nextitem is None or not nextitem.get_closest_marker("solo"):
                _release_exclusive()
        return
    _release_exclusive()
    with open(run_dir / "solo-turnstile.lock", "a") as turnstile, open(run_dir / "solo.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        fcntl.flock(lock, fcntl.LOCK_SH)
        yield
