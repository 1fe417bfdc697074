"""`livepipe update`: give the live model session new instructions and/or tools, then exit.

Publishes one `control: context_update`. gemini-bridge applies it without losing anything said:
by send_context_update on the open session, or by resuming on a new connection with the handle
(`--context-update`), and keeps it for every later connection.

    livepipe update --system-instruction "Answer in French."
    livepipe update --system-instruction @prompt.txt --tools tools.json
    livepipe update --tools none          # no functions any more
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from livepipe.bus.client import BusClient, BusTimeout
from livepipe.bus.config import BusConfig, ConfigError, add_bus_arguments
from livepipe.services.lib.verb import VerbParser


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = VerbParser(prog="livepipe update", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system-instruction", metavar="TEXT|@FILE", help="the new system instruction")
    p.add_argument("--tools", metavar="FILE|none",
                   help="JSON function declarations (a list, or {\"function_declarations\": [...]}); none clears them")
    p.add_argument("--wait", type=float, default=5.0, metavar="S",
                   help="wait up to S seconds for a control subscriber (default 5)")
    add_bus_arguments(p)
    return p.parse_args(argv)


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    si = args.system_instruction
    if si is not None:
        if si.startswith("@"):
            try:
                si = Path(si[1:]).expanduser().read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"--system-instruction {args.system_instruction}: cannot read ({exc})") from None
        if not si.strip():
            raise ConfigError("--system-instruction is empty")
        fields["system_instruction"] = si
    if args.tools is not None:
        if args.tools == "none":
            fields["tools"] = []
        else:
            try:
                data = json.loads(Path(args.tools).expanduser().read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ConfigError(f"--tools {args.tools}: not readable JSON ({exc})") from None
            decls = data.get("function_declarations", data.get("functionDeclarations")) if isinstance(data, dict) else data
            if not isinstance(decls, list) or not all(isinstance(d, dict) and isinstance(d.get("name"), str)
                                                      for d in decls):
                raise ConfigError(f"--tools {args.tools}: expected a list of function declarations, each with a \"name\"")
            fields["tools"] = decls
    if not fields:
        raise ConfigError("give --system-instruction and/or --tools")
    return fields


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        cfg = BusConfig.from_args(args)
        fields = _fields(args)
    except ConfigError as exc:
        print(f"livepipe update: {exc}", file=sys.stderr)
        return 2
    client = BusClient("update", cfg)
    try:
        client.wait_ready(args.wait)
        client.wait_subscriber("control", args.wait)
        client.publish("control", "context_update", **fields)
    except BusTimeout as exc:
        print(f"livepipe update: {exc} (is gemini-bridge running?); nothing sent", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0
