"""Errors: which are fatal, one line each, and the filter that keeps the API key out of every log line."""
from __future__ import annotations

import asyncio
import logging
import re
import ssl
from typing import Any, Callable

from livepipe.services.processes.gemini_bridge.settings import NAME

log = logging.getLogger(NAME)


FATAL_CLOSE_CODES = {1007, 1008}        # invalid argument / policy: bad key, unknown model, quota


FATAL_HTTP = {400, 401, 403, 404}


class KeyScrubber(logging.Filter):
    """Replace the API key in every log record (ours, the SDK's, websockets') before it is written."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self.secret = secret

    def scrub(self, text: str) -> str:
        return text.replace(self.secret, "***") if self.secret and self.secret in text else text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            msg = str(record.msg)
        if record.exc_info:
            msg += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = self.scrub(msg), None
        return True


def install_scrubber(secret: str) -> KeyScrubber:
    scrubber = KeyScrubber(secret)
    for handler in logging.getLogger().handlers:
        handler.addFilter(scrubber)
    return scrubber


class FatalBridgeError(Exception):
    """An error retrying cannot fix (bad key, unknown model, policy close): one line, exit 1."""


def _fatal_close(code: Any, reason: str) -> bool:
    """1007 (bad key, invalid argument) and 1008 (no credentials, unknown model, quota) are final,
    except the 1008 the service sends when a connection outlives its goAway: that one is resumable."""
    if code == 1008 and re.search(r"go ?away|session duration|deadline", reason, re.I):
        return False
    return code in FATAL_CLOSE_CODES


class SilentServer(Exception):
    """The server stopped answering pings while the connection stayed open."""


def describe_error(exc: BaseException, scrub: Callable[[str], str]) -> tuple[bool, str]:
    """(fatal, one line) for an exception from connecting, sending or receiving."""
    if isinstance(exc, SilentServer):
        return False, str(exc)
    import websockets.exceptions as wsx
    from google.genai import errors as genai_errors
    if isinstance(exc, genai_errors.APIError):
        code = exc.code
        reason = exc.message or (exc.details if isinstance(exc.details, str) else "") or exc.status or ""
        line = f"connection closed {code}" + (f": {reason}" if reason else "")
        return _fatal_close(code, str(reason)) or (isinstance(code, int) and code in FATAL_HTTP), scrub(line)
    if isinstance(exc, wsx.InvalidStatus):
        status = exc.response.status_code
        return status in FATAL_HTTP, scrub(f"the service refused the connection: HTTP {status}")
    if isinstance(exc, wsx.ConnectionClosed):
        rcvd = exc.rcvd
        code = rcvd.code if rcvd else 1006
        reason = rcvd.reason if rcvd else "no close frame"
        return _fatal_close(code, reason), scrub(f"connection closed {code}: {reason}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return True, scrub(f"TLS certificate not trusted: {exc.verify_message}")
    if isinstance(exc, asyncio.TimeoutError):
        return False, "connection attempt timed out"
    if isinstance(exc, OSError):
        return False, scrub(f"cannot connect: {exc.strerror or exc}")
    return False, scrub(f"{type(exc).__name__}: {exc}")

