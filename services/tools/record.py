"""`livepipe record FILE [TOPIC...]`: keep every bus message, as received, with its receipt time.

The file format is described in bus/recording.py: a magic line and a msgpack stream of
`[recv_ns, [frames...]]`, flushed per message, so killing the recorder loses at most the
message being written. Invalid messages are kept too (they are what you may want to debug);
replay skips them. SIGINT/SIGTERM, --count or --seconds close the file cleanly.
"""
from __future__ import annotations

import argparse
import sys
import time

from livepipe.bus.config import BusConfig, add_bus_arguments
from livepipe.services.lib.recording import RecordingWriter
from livepipe.services.lib.toolkit import StopFlag, check_topics, connect, human_bytes
from livepipe.services.lib.verb import VerbParser, fail, verb
from livepipe.bus.topics import TOPICS


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = VerbParser(prog="livepipe record", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="recording to write (overwritten)")
    p.add_argument("topics", nargs="*", metavar="TOPIC", help=f"topics to record (default: all): {', '.join(TOPICS)}")
    p.add_argument("--count", type=int, metavar="N", help="stop after N messages")
    p.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--connect-timeout", type=float, default=None, metavar="S",
                   help="give up if the broker does not answer within S seconds (default: say so after "
                        "1 s and keep waiting)")
    add_bus_arguments(p)
    return p.parse_args(argv)


@verb("record")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    check_topics(args.topics)
    cfg = BusConfig.from_args(args)
    stop = StopFlag()
    try:
        writer = RecordingWriter(args.file, cfg.session, args.topics)
    except OSError as exc:
        return fail("record", f"cannot write {args.file}: {exc.strerror}")
    try:
        client = connect("record", cfg, args.topics, args.connect_timeout, stop=stop)
    except BaseException:   # no broker (BusTimeout), bad CURVE key file (ConfigError): one line from @verb
        writer.close()
        raise
    if client is None:   # a signal while waiting for the broker
        writer.close()
        return 0
    wanted = set(args.topics)
    prefix = f"{cfg.session}/".encode() if cfg.session else b""
    started = time.monotonic()
    deadline = None if args.seconds is None else started + args.seconds
    try:
        print(f"livepipe record: recording {', '.join(args.topics) or 'all topics'} to {args.file}",
              file=sys.stderr, flush=True)
        while not stop and (args.count is None or writer.count < args.count):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            # Short waits so a signal (which only sets a flag) ends the loop within 0.2 s.
            frames = client.recv_raw(min(0.2, deadline - now) if deadline is not None else 0.2)
            if frames is None:
                continue
            recv_ns = time.time_ns()
            if wanted and bytes(frames[0]).removeprefix(prefix).decode("utf-8", "replace") not in wanted:
                continue   # SUB matches prefixes: keep only the exact topics asked for
            try:
                writer.write(recv_ns, frames)
            except OSError as exc:
                return fail("record", f"writing {args.file} failed: {exc.strerror}")
    finally:
        writer.close()
        client.close()
    print(f"livepipe record: {writer.count} messages ({human_bytes(writer.bytes)}) in "
          f"{time.monotonic() - started:.1f} s to {args.file}", file=sys.stderr)
    return 0
