"""`livepipe supervise [options] -- COMMAND...`: run one process and restart it when it dies.

honcho (and foreman) stop every process when one exits. Each livepipe process reconnects to
the bus by itself, so a crashed one only needs starting again: in a Procfile,

    capture-video: exec livepipe supervise -- livepipe capture-video

keeps the conversation going when capture-video is killed. Policy:
- --restart on-failure (default): restart after a non-zero exit or a death by signal; exit 0
  when the process exits 0 (it chose to stop). always: restart after any exit. never: run once.
- exit codes in --no-restart-on (default 2: livepipe's code for a usage or configuration error)
  are passed on at once: a restart cannot fix them.
- the delay before a restart starts at --backoff and doubles up to --backoff-max; a process
  that ran longer than --reset-after starts again from --backoff.
- more than --max-restarts restarts within --reset-after seconds each: give up and exit with
  the process's code (something is really broken; honcho then stops the rest, as it would).
- SIGTERM/SIGINT/SIGHUP are passed to the process; supervise exits with its exit code.

A plain wrapper, not a bus service: it lives in tools/ and imports no process module.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from livepipe.services.lib.verb import UsageError, VerbParser, verb

log = logging.getLogger("supervise")


def build_parser() -> argparse.ArgumentParser:
    p = VerbParser(prog="livepipe supervise", description=__doc__.split("\n\n")[0],
                                usage="livepipe supervise [options] -- COMMAND [ARGS...]")
    p.add_argument("--restart", choices=("on-failure", "always", "never"), default="on-failure",
                   help="when to start the process again (default on-failure)")
    p.add_argument("--max-restarts", type=int, default=10, metavar="N",
                   help="give up after N quick restarts in a row (default 10; 0 = never give up)")
    p.add_argument("--backoff", type=float, default=0.5, metavar="S", help="first restart delay (default 0.5 s)")
    p.add_argument("--backoff-max", type=float, default=10.0, metavar="S", help="longest restart delay (default 10 s)")
    p.add_argument("--reset-after", type=float, default=30.0, metavar="S",
                   help="a run this long counts as healthy: delay and count start over (default 30 s)")
    p.add_argument("--no-restart-on", default="2", metavar="CODES",
                   help="comma-separated exit codes never restarted (default 2, a usage or configuration error)")
    p.add_argument("--name", help="name in log lines (default: the livepipe verb or program)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the process to run, after --")
    return p


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _name_of(command: list[str]) -> str:
    prog = os.path.basename(command[0])
    if prog == "livepipe" and len(command) > 1:
        return command[1]
    return prog


@verb("supervise")
def main(argv: list[str]) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s: %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("no command: use livepipe supervise [options] -- COMMAND [ARGS...]")
    if args.backoff < 0 or args.backoff_max < args.backoff or args.max_restarts < 0:
        raise UsageError("--backoff must be >= 0, --backoff-max >= --backoff and --max-restarts >= 0")
    try:
        final_codes = {int(c) for c in args.no_restart_on.split(",") if c.strip()}
    except ValueError:
        raise UsageError(f"--no-restart-on {args.no_restart_on!r}: use exit codes separated by commas, "
                         "e.g. 1,2") from None
    name = args.name or _name_of(command)
    stopping = threading.Event()
    child: dict[str, subprocess.Popen] = {}

    def forward(signum: int, _frame: object) -> None:
        stopping.set()
        proc = child.get("proc")
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)

    restarts = 0          # quick restarts in a row
    delay = args.backoff
    while True:
        started = time.monotonic()
        try:
            child["proc"] = proc = subprocess.Popen(command)
        except OSError as exc:
            log.error("%s: cannot start %s: %s", name, command[0], exc.strerror or exc)
            return 127
        if stopping.is_set():     # a signal came while it was starting
            proc.terminate()
        code = proc.wait()
        if stopping.is_set():
            return code if code >= 0 else 0     # stopped by us: a clean stop
        ran = time.monotonic() - started
        if args.restart == "never" or (args.restart == "on-failure" and code == 0):
            return code
        if code in final_codes:
            log.error("%s %s: not restarted (a restart cannot fix it; see its message above)", name, _describe(code))
            return code
        if ran >= args.reset_after:
            restarts, delay = 0, args.backoff
        restarts += 1
        if args.max_restarts and restarts > args.max_restarts:
            log.error("%s %s: %d restarts within %.0f s each; giving up", name, _describe(code),
                      args.max_restarts, args.reset_after)
            return code if code > 0 else 1
        log.warning("%s %s after %.1f s: restarting in %.1f s (restart %d%s)", name, _describe(code), ran, delay,
                    restarts, f" of {args.max_restarts}" if args.max_restarts else "")
        if stopping.wait(delay):
            return 0
        delay = min(max(delay * 2, 0.1), args.backoff_max)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
