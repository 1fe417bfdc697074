"""`livepipe bench NAME [--json]`: dispatch to services/bench/NAME.py (each prints one JSON object)."""
from __future__ import annotations

import importlib

from livepipe.services.lib.verb import fail

BENCHES = {
    "bus": "one-hop latency through the broker, against raw pyzmq in the same run",
    "interrupt": "interrupt -> silence at a real (PulseAudio null sink) device",
    "video": "fit + JPEG encode cost per frame against a plain resize-to-768x768 client; frame age",
    "goaway": "audio.in delivery gap to the model across goAway switchovers",
    "capture": "capture chunk length vs latency and CPU (why 20 ms)",
    "pipeline": "voice-to-voice on null-sink devices against a one-process client in the same run",
    "aec": "echo cancellers on a synthetic echo: ERLE, the near voice kept, CPU (why WebRTC APM)",
    "barge": "coughs over the model's reply and a spoken barge-in through a PulseAudio room, per protection",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: livepipe bench NAME [--json] [options]\n\nbenchmarks:")
        for name, text in BENCHES.items():
            print(f"  {name:<10} {text}")
        return 0
    name = argv[0]
    if name not in BENCHES:
        return fail("bench", f"unknown benchmark {name!r} (known: {', '.join(BENCHES)})", 2)
    # a missing library (cv2, psutil...) propagates: cli.py names the extra that brings it
    module = importlib.import_module(f"livepipe.services.bench.{name.replace('-', '_')}")
    return int(module.main(argv[1:]) or 0)
