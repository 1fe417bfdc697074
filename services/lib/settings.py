"""Flags with an environment fallback, checked one way for every verb, and the state directory.

A setting comes from its flag, else its LIVEPIPE_* variable, else the default; an empty variable
counts as unset. A bad value raises the bus's `ConfigError` with one line naming the flag and the
variable (a verb run under `lib/verb.py` prints it and exits 2). The bus's own settings (broker
endpoints, session, CURVE keys) stay in bus/config.py.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from livepipe.bus.config import ConfigError


def env(name: str, default: str | None = None) -> str | None:
    """$name, or `default` when it is unset or empty (for argparse defaults)."""
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def state_dir() -> Path:
    """Where livepipe keeps its state (emulator address and certificates, demo runs): $LIVEPIPE_STATE_DIR,
    default ~/.local/state/livepipe."""
    return Path(env("LIVEPIPE_STATE_DIR") or Path.home() / ".local/state/livepipe").expanduser()


def _given(value: str | None, var: str) -> str | None:
    return value if value not in (None, "") else env(var)


def switch(flag: str, var: str, value: str | None, default: bool | None = None) -> bool:
    """on/off (true/false, yes/no, 1/0) from the flag's `value`, else $var, else `default`."""
    text = _given(value, var)
    if text is None and default is not None:
        return default
    v = str(text).strip().lower()
    if v in ("on", "true", "yes", "1"):
        return True
    if v in ("off", "false", "no", "0"):
        return False
    raise ConfigError(f"{flag} {text!r}: use on or off (env {var})")


def number(flag: str, var: str, value: str | None, kind: type, low: float, high: float,
           optional: bool = False, default: float | None = None) -> Any:
    """An int or float (`kind`) within [low, high] from the flag's `value`, else $var, else `default`
    (None when `optional` and nothing is given)."""
    text = _given(value, var)
    if text is None:
        if default is not None:
            return kind(default)
        if optional:
            return None
    try:
        n = kind(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{flag} {text!r}: not a{'n integer' if kind is int else ' number'} (env {var})") from None
    if not low <= n <= high or n != n:  # n != n: NaN
        raise ConfigError(f"{flag} {text!r}: must be between {low:g} and {high:g} (env {var})")
    return n


def choice(flag: str, var: str, value: str | None, choices: tuple[str, ...], optional: bool = False) -> str | None:
    """One of `choices` (case-insensitive) from the flag's `value`, else $var (None when `optional`)."""
    text = _given(value, var)
    if text is None and optional:
        return None
    v = str(text).strip().lower()
    if v not in choices:
        raise ConfigError(f"{flag} {text!r}: use {', '.join(choices[:-1])} or {choices[-1]} (env {var})")
    return v


def non_negative(text: str) -> float:
    """argparse `type=` for a number >= 0 (argparse reports the error as a usage error)."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def positive(text: str) -> float:
    """argparse `type=` for a number > 0."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return value
