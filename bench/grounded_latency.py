"""Text → boxes → masks on one image: vprompt's Finder against the transformers models called
one after the other by hand, same run, same weights.

Both start from an image whose SAM embedding is already computed (the reference passes it as
``image_embeddings``; vprompt's Segmenter has it in its cache). Per request:

1. **Plain transformers** (the reference): ``Owlv2Processor(text=queries, images=image)`` →
   ``Owlv2ForObjectDetection`` (vision + text towers) →
   ``post_process_grounded_object_detection`` on the padded square → the top ``--boxes``
   boxes by score → ``SamProcessor(input_boxes=…)`` →
   ``SamModel(image_embeddings=…, multimask_output=False)`` → ``post_process_masks``.
2. **vprompt, same work**: ``Finder.find(image, queries=…, masks=True)`` with the OWL image
   embedding dropped before each call, so it reruns the vision tower as the reference does.
3. **vprompt, cached**: the same call again on the same image: OWL's image embedding and the
   query's text embedding are reused (what the server and a CLI run over many queries see).

Both keep the same number of boxes (score threshold 0, top ``--boxes``, no NMS: OWL's text
path has none) and decode them in one SAM call. Weights are random (``--weights none``);
timings do not depend on them. Every timing is the median of ``--repeats`` after
``--warmup`` untimed runs, contenders interleaved.

CPU (what bench/results/grounded_latency_cpu records)::

    .venv/bin/python bench/grounded_latency.py --device cpu --threads 2 \
        --detector owlv2:base-patch16-ensemble --segmenter sam:vit-base \
        --image-size 1024x768 --boxes 8 --repeats 5 --warmup 1 \
        --out bench/results/grounded_latency_cpu

GPU (not run: no device was lent to this issue)::

    python bench/grounded_latency.py --device cuda --detector owlv2:base-patch16-ensemble \
        --segmenter sam:vit-base --image-size 1024x768 --boxes 8 --repeats 50 --warmup 5 \
        --out bench/results/grounded_latency_h100
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import vprompt
from vprompt.detect import DetectionFilter, Finder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1000


def _photo(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", default="owlv2:base-patch16-ensemble")
    parser.add_argument("--segmenter", default="sam:vit-base")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--image-size", default="1024x768", help="WxH of the test image")
    parser.add_argument("--queries", default="a red mug,a spoon", help="comma-separated")
    parser.add_argument("--boxes", type=int, default=8, help="boxes turned into masks")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers as tf

    device = torch.device(args.device)
    w, h = (int(v) for v in args.image_size.lower().split("x"))
    image = _photo(w, h)
    queries = [q.strip() for q in args.queries.split(",") if q.strip()]
    finder = Finder.load(
        args.detector, args.weights, device=device, masks=args.segmenter, mask_weights=args.weights
    )
    detector: Any = finder.detector
    segmenter = finder.segmenter
    assert segmenter is not None
    if detector.kind != "owlv2":
        raise SystemExit("the reference pipeline here is Owlv2Processor/Owlv2: use owlv2:*")
    owl_processor, owl_model = detector.processor, detector.model
    sam = segmenter.backbone
    sam_processor = tf.SamProcessor(image_processor=sam.image_processor)
    embedding = segmenter.embed_image(image)  # cached for both contenders
    sam_embeddings = embedding.parts["embeddings"]
    keep = DetectionFilter(score_threshold=0.0, nms_iou=1.0, top_k=args.boxes)
    side = max(w, h)  # OWLv2 predicts boxes on the padded square

    def reference() -> Any:
        with torch.inference_mode():
            inputs = owl_processor(text=[queries], images=image, return_tensors="pt").to(device)
            outputs = owl_model(**inputs)
            found = owl_processor.post_process_grounded_object_detection(
                outputs, threshold=0.0, target_sizes=torch.tensor([[side, side]])
            )[0]
            order = torch.argsort(found["scores"], descending=True)[: args.boxes]
            boxes = found["boxes"][order]
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            sam_inputs = sam_processor(
                images=image, input_boxes=[boxes.tolist()], return_tensors="pt"
            )
            out = sam.model(
                image_embeddings=sam_embeddings,
                input_boxes=sam_inputs["input_boxes"].to(device),
                multimask_output=False,
            )
            return sam_processor.post_process_masks(
                out.pred_masks.cpu(),
                sam_inputs["original_sizes"],
                sam_inputs["reshaped_input_sizes"],
            )

    def ours_same_work() -> Any:
        detector.clear_cache()
        return finder.find(image, queries=queries, filter=keep)

    def ours_cached() -> Any:
        return finder.find(image, queries=queries, filter=keep)

    contenders = {
        "plain transformers": reference,
        "vprompt (detector embedding recomputed)": ours_same_work,
        "vprompt (detector embedding cached)": ours_cached,
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.warmup):
        for fn in contenders.values():
            fn()
    for _ in range(args.repeats):
        for name, fn in contenders.items():  # interleaved: load hits every contender alike
            times[name].append(_time(fn, device))
    medians = {name: statistics.median(t) for name, t in times.items()}
    found = ours_cached()
    if found.masks is None or len(found) != args.boxes:
        raise SystemExit(f"expected {args.boxes} masks, got {len(found)} detections")
    ref_ms = medians["plain transformers"]
    result = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "vprompt": vprompt.__version__,
        "torch": torch.__version__,
        "transformers": tf.__version__,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "detector": args.detector,
        "segmenter": args.segmenter,
        "image_size": [w, h],
        "queries": queries,
        "boxes": args.boxes,
        "median_ms": medians,
        "speedup_vs_reference": {name: ref_ms / ms for name, ms in medians.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# Text → boxes → masks ({args.detector} + {args.segmenter}, {result['device']}, "
        f"{result['threads']} threads, image {w}x{h}, {len(queries)} queries, "
        f"{args.boxes} masks)",
        "",
        f"Command: `{result['command']}`",
        "",
        "SAM's image embedding is cached for every contender.",
        "",
        "| pipeline | median per request | reference ÷ this |",
        "|---|---|---|",
    ]
    for name, ms in medians.items():
        lines.append(f"| {name} | {ms:.1f} ms | {ref_ms / ms:.2f}x |")
    lines += [
        "",
        "GPU (not run here): `python bench/grounded_latency.py --device cuda --detector "
        "owlv2:base-patch16-ensemble --segmenter sam:vit-base --image-size 1024x768 --boxes 8 "
        "--repeats 50 --warmup 5 --out bench/results/grounded_latency_h100`",
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
