"""`livepipe gemini-bridge`: the Live API session on the bus.

The one process that talks to the model (google-genai's `client.aio.live.connect`) and the only
module that imports google-genai (lazily, so `--help` stays fast).

    audio.in, video.in, text.in, tool.result, control  ->  model  ->  audio.out, transcript, control,
                                                                      tool.call, grounding
    tool.announce, status: functions other processes serve, joined to --tools (tools.py)

Backend: the real Gemini Live API when GEMINI_API_KEY (or GOOGLE_API_KEY) is set, else the local
emulator found through `<state>/emulator/emulator.json`; `--backend` forces either. Both go through
the same SDK calls; only the address and the CA to trust differ.

Long sessions: on goAway the next connection is opened with the latest resumption handle before
the old one closes, and audio.in is held (bounded) until it is up; an abrupt close reconnects with
the handle and backoff; a fatal error (bad key, policy close) is one line and exit 1.

The package: settings.py (live_options.py: the newer options, checked per model generation),
errors.py, media.py, link.py, and the Bridge in bridge.py with its input, output, tools, connection
and signals (newer Live API parts) sides in their own modules."""
from __future__ import annotations

import gc
import logging
import sys

from livepipe.bus import Service, setup_logging
from livepipe.bus.config import BusConfig
from livepipe.services.lib.verb import UsageError, one_line, verb
from livepipe.services.processes.gemini_bridge.bridge import Bridge
from livepipe.services.processes.gemini_bridge.errors import KeyScrubber, install_scrubber
from livepipe.services.processes.gemini_bridge.link import Link
from livepipe.services.processes.gemini_bridge.live_options import model_generation
from livepipe.services.processes.gemini_bridge.settings import (
    BYTES_PER_SECOND_IN,
    NAME,
    Settings,
    build_parser,
    live_config,
    settings_from_args,
)

__all__ = ["BYTES_PER_SECOND_IN", "NAME", "Bridge", "KeyScrubber", "Link", "Settings", "main"]

log = logging.getLogger(NAME)


@verb(NAME)
def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)   # ConfigError: one line, exit 2 (@verb)
    bus_cfg = BusConfig.from_args(args)
    setup_logging(NAME)
    scrubber = install_scrubber(settings.api_key)
    try:
        live_config(settings, None, bool(settings.live.history))   # the SDK's own validation, before anything connects
    except Exception as exc:
        raise UsageError(f"invalid session configuration: {one_line(scrubber.scrub(str(exc)))}") from None
    svc = Service(NAME, bus_cfg, log)
    bridge = Bridge(svc, settings, scrubber)
    svc.on("audio.in", bridge.on_audio)
    svc.on("video.in", bridge.on_video)
    svc.on("text.in", bridge.on_text)
    svc.on("tool.result", bridge.on_tool_result)
    svc.on("audio.in", bridge.note_audio)       # a pause ends the stream for the service (signals.py)
    svc.on("control", bridge.on_control)        # mute, context_update
    svc.on("tool.announce", bridge.on_tool_announce)   # functions served by other processes (tools.py)
    svc.on("status", bridge.on_status)                 # their heartbeats keep them
    if model_generation(settings.model) >= 3 and any(
            str(d.get("behavior", "")).upper() == "NON_BLOCKING" for d in settings.tools or []):
        log.warning("%s calls functions synchronously only: NON_BLOCKING declarations are answered "
                    "before the model goes on", settings.model)
    log.info("backend %s, model %s", settings.backend, settings.model)

    async def run(_: Service) -> None:
        await bridge.run()

    # google-genai's types are ~10^5 long-lived objects: frozen, the collector skips them while the
    # bridge runs and at exit (their teardown took ~0.2 s of every stop).
    gc.freeze()
    return svc.main(run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
