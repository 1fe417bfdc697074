"""`livepipe keys DIR NAME...`: generate CURVE key pairs (NAME.key public, NAME.key_secret secret).

Give the broker its server.key_secret and a directory holding the *.key public files of the
clients it allows; give each client server.key and its own NAME.key_secret.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import zmq.auth

from livepipe.services.lib.verb import VerbParser, fail, verb


@verb("keys")
def main(argv: list[str]) -> int:
    p = VerbParser(prog="livepipe keys", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="directory to write the key files into (created if missing)")
    p.add_argument("names", nargs="+", help="one key pair per name, e.g. server edge hub")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    args = p.parse_args(argv)
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        if (out / f"{name}.key_secret").exists() and not args.force:
            return fail("keys", f"{out / (name + '.key_secret')} exists (use --force to overwrite)")
        public, secret = zmq.auth.create_certificates(str(out), name)
        os.chmod(secret, 0o600)
        print(f"{name}: public {public}, secret {secret}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
