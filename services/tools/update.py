"""`livepipe update`: give the live model session new instructions, tools or history, then exit.

Publishes one `control: context_update`. gemini-bridge applies it without losing anything said:
by send_context_update on the open session, or by resuming on a new connection with the handle
(`--context-update`), and keeps it for every later connection.

--history publishes `control: history`: the earlier turns a new session starts with. The bridge
starts a new session with them at once if nothing was said in the current one yet (a bridge just
restarted), else keeps them for the next new session (after a resumption is refused).

    livepipe update --system-instruction "Answer in French."
    livepipe update --system-instruction @prompt.txt --tools tools.json
    livepipe update --tools none          # no functions any more
    livepipe update --history conversation.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from livepipe.bus.client import BusClient, BusTimeout
from livepipe.bus.config import BusConfig, ConfigError, add_bus_arguments
from livepipe.services.lib.conversation import load_history
from livepipe.services.lib.verb import VerbParser


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = VerbParser(prog="livepipe update", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system-instruction", metavar="TEXT|@FILE", help="the new system instruction")
    p.add_argument("--tools", metavar="FILE|none",
                   help="JSON function declarations (a list, or {\"function_declarations\": [...]}); none clears them")
    p.add_argument("--history", metavar="FILE",
                   help="JSON list of earlier turns [{\"role\": \"user\"|\"model\", \"text\": \"...\"}] a new "
                        "session starts with (as gemini-bridge --history)")
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
    return fields


def _history(args: argparse.Namespace) -> list[dict[str, Any]] | None:
    if args.history is None:
        return None
    turns = load_history(args.history, f"--history {args.history}")
    # on the bus in the file's short form: one text per turn
    return [{"role": t["role"], "text": " ".join(p["text"] for p in t["parts"])} for t in turns]


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        cfg = BusConfig.from_args(args)
        fields = _fields(args)
        history = _history(args)
        if not fields and history is None:
            raise ConfigError("give --system-instruction, --tools and/or --history")
    except ConfigError as exc:
        print(f"livepipe update: {exc}", file=sys.stderr)
        return 2
    client = BusClient("update", cfg)
    try:
        client.wait_ready(args.wait)
        client.wait_subscriber("control", args.wait)
        if fields:
            client.publish("control", "context_update", **fields)
        if history is not None:
            client.publish("control", "history", turns=history)
    except BusTimeout as exc:
        print(f"livepipe update: {exc} (is gemini-bridge running?); nothing sent", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0
