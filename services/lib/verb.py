"""One way to run a verb: `livepipe VERB ...` ends with at most one line of error, never a traceback
for what a user can fix.

    @verb("tap")
    def main(argv: list[str]) -> int: ...

Errors, one style: `livepipe VERB: <one line>` on stderr.
  - exit 2: the command line or the settings are wrong (argparse's errors, `UsageError`, the bus's
    `ConfigError`, which also covers LIVEPIPE_* variables): fix the command and run it again;
  - exit 1: the verb could not do its job (`VerbError` and its subclasses: a missing or unreadable
    file, no audio device, no video source, a bench that failed; or no broker, `BusTimeout`).
Anything else is a bug and keeps its traceback. A process that is already on the bus reports run-time
trouble in its log instead (and counts it in its heartbeat): the wrapper only covers what ends a verb.
"""
from __future__ import annotations

import argparse
import functools
import gc
import sys
from typing import Callable, NoReturn

from livepipe.bus.client import BusTimeout
from livepipe.bus.config import ConfigError

EXIT_FAILED = 1
EXIT_USAGE = 2   # as argparse


class UsageError(ConfigError):
    """A bad flag or flag combination; the message is one line for the user (exit 2)."""


class VerbError(Exception):
    """An expected failure (missing file, no device...); the message is one line for the user (exit 1).

    Library errors that a verb lets through subclass it (AudioFileError, DeviceError, RecordingError...)."""


def one_line(exc: BaseException | str) -> str:
    """The first non-empty line of an error message (the exception's type if it has no text)."""
    text = str(exc).strip()
    if not text and isinstance(exc, BaseException):
        text = type(exc).__name__
    return text.splitlines()[0] if text else ""


def fail(name: str, error: BaseException | str, code: int = EXIT_FAILED) -> int:
    """Print `livepipe NAME: <one line>` on stderr; returns `code` (`return fail("tap", "...")`)."""
    print(f"livepipe {name}: {one_line(error)}", file=sys.stderr, flush=True)
    return code


def run_verb(name: str, body: Callable[[], int | None]) -> int:
    """Run `body` and turn the expected errors into one line and an exit code (see the module doc)."""
    try:
        return int(body() or 0)
    except ConfigError as exc:               # UsageError included
        return fail(name, exc, EXIT_USAGE)
    except (VerbError, BusTimeout) as exc:
        return fail(name, exc, EXIT_FAILED)


def verb(name: str) -> Callable[[Callable[[list[str]], int | None]], Callable[[list[str]], int]]:
    """Decorator for a verb's `main(argv)`: `run_verb` around it."""
    def wrap(main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int]:
        @functools.wraps(main)
        def wrapped(argv: list[str]) -> int:
            # What the imports built lives as long as the process: frozen, the collector skips it
            # while the verb runs and at exit (its teardown added ~0.03-0.08 s to every stop).
            gc.freeze()
            return run_verb(name, lambda: main(argv))
        return wrapped
    return wrap


class VerbParser(argparse.ArgumentParser):
    """argparse with the verbs' error style: `livepipe VERB: <message> (see --help)`, exit 2,
    instead of the usage block followed by `error:`. `prog` must be `livepipe VERB`."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)
