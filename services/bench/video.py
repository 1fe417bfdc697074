"""`livepipe bench video [--json]`: what a video frame costs and how old it is when it arrives.

1. Fit + encode, per frame, in this process (interleaved round-robin so both see the same load):
   livepipe:   capture-video's own FrameEncoder: 1280x720 fitted inside 768x768 (-> 768x432,
               INTER_AREA), JPEG q80; also with --pad (-> 768x768); and with Pillow (BOX, an area
               average), the encoder of the test pattern and the screen, which do not load OpenCV;
   reference:  the usual quick-start client: cv2.resize(frame, (768, 768)) (distorts 16:9) and
               cv2.imencode(".jpg", frame) at OpenCV's default quality 95; also at q80, to
               separate the effect of the quality from the effect of the fit.
   Frames are synthetic 1280x720 pictures with camera-like content (smooth shapes, edges, text,
   sensor noise), several different ones so no cache flatters a codec.
2. Frame age from a short live run: a real broker and real `livepipe capture-video` processes
   (a 30 fps 1280x720 file whose frames carry their number, read in real time like a camera;
   and the test pattern), a subscriber on video.in. capture -> publish is header ts - capture_ts;
   capture -> receive adds the bus hop. For the file, the source frames that pass between two
   sends show that each send is the newest frame (a buffered reader would advance by one).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from livepipe.services.dev.harness import spawn_livepipe, start_broker
from livepipe.services.lib.stats import percentile
from livepipe.services.lib.verb import VerbParser, verb

COUNTER_BITS = 16


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = VerbParser(prog="livepipe bench video", description=__doc__,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--frames", type=int, default=300, help="measured frames per encoder (default 300)")
    p.add_argument("--seconds", type=float, default=6.0, help="length of each live run (default 6)")
    p.add_argument("--fps", type=float, default=10.0,
                   help="send rate of the live runs: more samples than 1 fps in a short run (default 10)")
    return p.parse_args(argv)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "p99": round(percentile(values, 99), 3),
            "n": len(values)}


# ----------------------------------------------------------------------------- fit + encode
def camera_like_frames(count: int, width: int = 1280, height: int = 720) -> list[np.ndarray]:
    rng = np.random.default_rng(42)
    frames = []
    for i in range(count):
        low = rng.integers(0, 255, (9, 16, 3), dtype=np.uint8)
        img = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)     # smooth lighting
        for _ in range(12):                                                      # objects with edges
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
            colour = tuple(int(c) for c in rng.integers(0, 255, 3))
            if rng.random() < 0.5:
                cv2.circle(img, (x, y), int(rng.integers(20, 200)), colour, -1, cv2.LINE_AA)
            else:
                cv2.rectangle(img, (x, y), (x + int(rng.integers(20, 300)), y + int(rng.integers(20, 200))), colour, -1)
        for line in range(6):                                                    # text, fine detail
            cv2.putText(img, f"livepipe frame {i} line {line} 0123456789", (40, 80 + line * 100),
                        cv2.FONT_HERSHEY_SIMPLEX, 1.2, (255, 255, 255), 2, cv2.LINE_AA)
        noise = rng.normal(0, 3, img.shape)                                      # sensor noise
        frames.append(np.clip(img + noise, 0, 255).astype(np.uint8))
    return frames


def bench_encode(n: int) -> dict[str, Any]:
    # measure the service's own code, not a copy: OpenCV's encoder (camera, file, stream) and Pillow's (test pattern, screen)
    from livepipe.services.processes.capture_video import CvFrameEncoder, FrameEncoder

    frames = camera_like_frames(8)
    fit = CvFrameEncoder(768, 80)
    fit_pad = CvFrameEncoder(768, 80, pad=True)
    fit_pillow = FrameEncoder(768, 80)

    def reference(q: int | None):
        params = [] if q is None else [cv2.IMWRITE_JPEG_QUALITY, q]

        def run(frame: np.ndarray) -> tuple[bytes, tuple[int, int]]:
            small = cv2.resize(frame, (768, 768))
            return cv2.imencode(".jpg", small, params)[1].tobytes(), small.shape[1::-1]
        return run

    def ours(enc: FrameEncoder):
        def run(frame: np.ndarray) -> tuple[bytes, tuple[int, int]]:
            return enc.fit_encode(frame)
        return run

    cases = {"livepipe_fit_q80": ours(fit), "livepipe_fit_pad_q80": ours(fit_pad), "livepipe_fit_q80_pillow": ours(fit_pillow),
             "reference_resize768_q95": reference(None), "reference_resize768_q80": reference(80)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    sizes: dict[str, list[int]] = {k: [] for k in cases}
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(n + 20):                 # the first 20 rounds warm caches and are not counted
        frame = frames[i % len(frames)]
        for name, fn in cases.items():
            t0 = time.perf_counter()
            jpeg, shape = fn(frame)
            dt = (time.perf_counter() - t0) * 1000
            if i >= 20:
                times[name].append(dt)
                sizes[name].append(len(jpeg))
                shapes[name] = shape
    out: dict[str, Any] = {"input": "1280x720 BGR, camera-like synthetic content", "frames": n,
                           "cv2_threads": cv2.getNumThreads()}
    for name in cases:
        out[name] = {"output": f"{shapes[name][0]}x{shapes[name][1]}", "ms": summary(times[name]),
                     "jpeg_bytes_median": int(statistics.median(sizes[name]))}
    ref = statistics.median(times["reference_resize768_q95"])
    out["ratio_median_livepipe_vs_reference_q95"] = round(statistics.median(times["livepipe_fit_q80"]) / ref, 3)
    out["ratio_median_livepipe_vs_reference_q80"] = round(
        statistics.median(times["livepipe_fit_q80"]) / statistics.median(times["reference_resize768_q80"]), 3)
    out["ratio_bytes_livepipe_vs_reference_q95"] = round(
        out["livepipe_fit_q80"]["jpeg_bytes_median"] / out["reference_resize768_q95"]["jpeg_bytes_median"], 3)
    return out


# ----------------------------------------------------------------------------- live frame age
def write_counter_video(path: Path, seconds: float, fps: int = 30) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (1280, 720))
    base = camera_like_frames(1)[0]
    for i in range(int(seconds * fps)):
        img = base.copy()
        top = 720 - 72
        for b in range(COUNTER_BITS):
            img[top:, b * 1280 // COUNTER_BITS:(b + 1) * 1280 // COUNTER_BITS] = 255 * ((i >> (COUNTER_BITS - 1 - b)) & 1)
        writer.write(img)
    writer.release()


def read_counter(img: np.ndarray) -> int:
    h, w = img.shape[:2]
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    y = h - h // 20
    value = 0
    for b in range(COUNTER_BITS):
        x = int((b + 0.5) * w / COUNTER_BITS)
        value = (value << 1) | int(grey[y - 2:y + 3, x - 2:x + 3].mean() > 128)
    return value


def live_run(env: dict[str, str], source_args: list[str], seconds: float, counter: bool) -> dict[str, Any]:
    from livepipe.bus.client import BusClient
    from livepipe.bus.config import BusConfig

    with BusClient("bench-video", BusConfig.from_env(env), ["video.in"]) as client:
        client.wait_ready()
        proc = spawn_livepipe(["capture-video", *source_args], env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        try:
            first = client.recv(15)
            if first is None:
                raise RuntimeError(f"capture-video sent nothing: {proc.stderr.read() if proc.poll() is not None else ''}")
            msgs = [first] + client.collect(seconds, topic="video.in")
        finally:
            proc.terminate()
            proc.communicate(timeout=10)
    msgs = msgs[2:]     # the first frames include process start-up
    out: dict[str, Any] = {
        "frames": len(msgs),
        "capture_to_publish_ms": summary([(m["ts"] - m["capture_ts"]) / 1e6 for m in msgs]),
        "capture_to_receive_ms": summary([(m.recv_ns - m["capture_ts"]) / 1e6 for m in msgs]),
        "image": f"{msgs[0]['image_width']}x{msgs[0]['image_height']}",
        "jpeg_bytes_median": int(statistics.median(len(m.payload) for m in msgs)),
    }
    if counter:
        counters = [read_counter(cv2.imdecode(np.frombuffer(m.payload, np.uint8), cv2.IMREAD_COLOR)) for m in msgs]
        steps = np.diff(counters)
        out["source_frames_between_sends_median"] = float(statistics.median(steps))
    return out


def bench_age(seconds: float, fps: float) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEPIPE_")}
    env.update(LIVEPIPE_LOG="WARNING")
    broker, env = start_broker(env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            video = Path(tmp) / "counter.avi"
            write_counter_video(video, 4.0)
            file_run = live_run(env, [str(video), "--loop", "--fps", str(fps)], seconds, counter=True)
            file_run["source"] = "1280x720 MJPEG file at 30 fps, real-time pacing, --loop"
            file_run["expected_source_frames_between_sends"] = round(30 / fps, 2)
        pattern_run = live_run(env, ["test", "--fps", str(fps)], seconds, counter=False)
        pattern_run["source"] = "test pattern 1280x720 (grabbed at the tick)"
    finally:
        broker.terminate()
        broker.communicate(timeout=10)
    return {"send_fps": fps, "seconds": seconds, "file": file_run, "test_pattern": pattern_run}


@verb("bench video")
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    result = {"bench": "video", "cpus": os.cpu_count(), "fit_encode": bench_encode(args.frames),
              "frame_age": bench_age(args.seconds, args.fps)}
    if args.json:
        print(json.dumps(result))
        return 0
    fe = result["fit_encode"]
    print(f"fit + encode, 1280x720 input, {fe['frames']} frames (median / p99 ms, JPEG bytes):")
    for name in ("livepipe_fit_q80", "livepipe_fit_pad_q80", "reference_resize768_q95", "reference_resize768_q80"):
        r = fe[name]
        print(f"  {name:<26} {r['output']:>8}  {r['ms']['median']:7.2f} / {r['ms']['p99']:7.2f}  {r['jpeg_bytes_median']:>7}")
    print(f"  livepipe / reference(q95) median: {fe['ratio_median_livepipe_vs_reference_q95']}")
    for name in ("file", "test_pattern"):
        r = result["frame_age"][name]
        print(f"frame age, {r['source']}: capture->publish {r['capture_to_publish_ms']['median']:.1f} / "
              f"{r['capture_to_publish_ms']['p99']:.1f} ms, capture->receive {r['capture_to_receive_ms']['median']:.1f}"
              f" / {r['capture_to_receive_ms']['p99']:.1f} ms ({r['frames']} frames)")
    return 0
