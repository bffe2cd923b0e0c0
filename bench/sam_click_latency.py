"""Click-to-mask latency with SAM: the plain transformers pipeline and vprompt's, same run.

What one click costs once the image is embedded, and what the embedding itself costs:

1. **Plain transformers** (the reference): ``SamProcessor`` turns the click into model-frame
   inputs, ``SamModel(image_embeddings=…)`` decodes, ``post_process_masks`` upsamples and
   crops to the original size. For 64 objects, the 64 clicks go in as one point batch.
2. **vprompt**: ``Segmenter.decode`` on a cached :class:`ImageEmbedding` (objects on the
   batch axis, the same masks as the reference; parity is tested in tests/test_segmenter.py),
   keeping the best of the three candidates (``best_only``: only that one is upsampled), with
   its stability score.

3. **vprompt + ONNX** (``--onnx``): the same ``Segmenter.decode`` with the prompt encoder +
   mask decoder exported by ``vprompt export onnx`` and run by onnxruntime on CPU
   (:class:`~vprompt.segment.onnx_runtime.OnnxSamDecoder`, all objects in one run); the
   image encoder stays in PyTorch.

Rows: 1, 4, 16 and 64 objects (``--objects-list``), ms per click and per object.
Both decode with ``multimask_output=True``. Embedding time is the encoder forward on one
preprocessed image. Weights are random (``--weights none``): timings do not depend on them.
Every timing is the median of ``--repeats`` after ``--warmup`` untimed runs.

CPU (what bench/results/sam_click_latency_cpu records)::

    .venv/bin/python bench/sam_click_latency.py --device cpu --threads 2 \
        --model sam:vit-base --image-size 1024x768 --repeats 20 --warmup 3 \
        --embed-repeats 2 --onnx --out bench/results/sam_click_latency_cpu

GPU (the issue's speed goals: embedding <= 12 ms, one object <= 2 ms, 64 objects <= 8 ms)::

    python bench/sam_click_latency.py --device cuda --precision bf16 --model sam:vit-base \
        --image-size 1024x768 --repeats 100 --warmup 10 --embed-repeats 20 \
        --out bench/results/sam_click_latency_h100
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
from vprompt.prompts.spatial import ObjectPrompt, Point, PromptSet
from vprompt.segment import Segmenter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _photo(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sam:vit-base")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--image-size", default="1024x768", help="WxH of the test image")
    parser.add_argument("--objects", type=int, default=64)
    parser.add_argument("--objects-list", default="1,4,16,64", help="object counts timed")
    parser.add_argument("--onnx", action="store_true", help="also time the ONNX decoder")
    parser.add_argument("--onnx-decoder", default=None, help="exported decoder (default: export)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--embed-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers as tf

    device = torch.device(args.device)
    w, h = (int(v) for v in args.image_size.lower().split("x"))
    image = _photo(w, h)
    seg = Segmenter.load(args.model, args.weights, device=device, precision=args.precision)
    backbone = seg.backbone
    if backbone.kind != "sam":
        raise SystemExit("the reference pipeline here is SamProcessor/SamModel: use a sam:vit-*")
    processor = tf.SamProcessor(image_processor=backbone.image_processor)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    autocast = torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16")

    pixels = backbone.preprocess([image])

    def embed() -> None:
        with autocast:
            backbone.embed(pixels)

    embed_ms = _median_ms(embed, device, args.embed_repeats, 1)
    emb = seg.embed_image(image)
    rng = np.random.default_rng(1)
    counts = [int(v) for v in args.objects_list.split(",")]
    n_max = max([args.objects, *counts])
    clicks = [(float(x), float(y)) for x, y in rng.uniform(0, 1, (n_max, 2)) * (w, h)]
    emb_ref = emb.parts["embeddings"]

    def reference(points_inputs: Any) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode(), autocast:
                out = backbone.model(
                    image_embeddings=emb_ref,
                    input_points=points_inputs["input_points"].to(device),
                    multimask_output=True,
                )
            return processor.post_process_masks(
                out.pred_masks.float().cpu(),
                points_inputs["original_sizes"],
                points_inputs["reshaped_input_sizes"],
            )

        return run

    def ours(n: int, segmenter: Segmenter) -> Callable[[], Any]:
        def run() -> Any:
            # Building and validating the prompts is part of a click's cost.
            prompts = PromptSet(
                [ObjectPrompt(points=[Point(*c)]) for c in clicks[:n]], image_size=(w, h)
            )
            return segmenter.decode(emb, prompts, multimask=True, best_only=True)

        return run

    onnx_seg: Segmenter | None = None
    if args.onnx:
        from vprompt.segment.onnx_runtime import OnnxSamDecoder

        decoder = OnnxSamDecoder.for_backbone(
            backbone, path=args.onnx_decoder, threads=torch.get_num_threads()
        )
        onnx_seg = Segmenter(backbone, cache=seg.cache, precision=args.precision, decoder=decoder)

    rows = {}
    for n in counts:
        label = f"{n} object" + ("s" if n > 1 else "")
        ref_inputs = processor(
            images=image, input_points=[[[c] for c in clicks[:n]]], return_tensors="pt"
        )
        # Interleaved, so that load from other processes hits every contender alike.
        ref_ms = _median_ms(reference(ref_inputs), device, args.repeats, args.warmup)
        our_ms = _median_ms(ours(n, seg), device, args.repeats, args.warmup)
        row = {
            "objects": n,
            "reference_ms": ref_ms,
            "vprompt_ms": our_ms,
            "speedup": ref_ms / our_ms,
        }
        if onnx_seg is not None:
            onnx_ms = _median_ms(ours(n, onnx_seg), device, args.repeats, args.warmup)
            row.update(onnx_ms=onnx_ms, onnx_speedup=ref_ms / onnx_ms)
        rows[label] = row
        print(label, {k: round(v, 2) for k, v in row.items()}, flush=True)
    result = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "vprompt": vprompt.__version__,
        "torch": torch.__version__,
        "transformers": tf.__version__,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "model": args.model,
        "precision": args.precision,
        "image_size": [w, h],
        "embed_ms": embed_ms,
        "decode": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# SAM click latency ({args.model}, {args.precision}, {result['device']}, "
        f"{result['threads']} threads, image {w}x{h})",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Image embedding (encoder forward): **{embed_ms:.1f} ms**",
        "",
        "| click → mask (cached embedding) | plain transformers | vprompt (torch) | ratio |"
        " vprompt (ONNX) | ratio | ONNX per object |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        onnx = (
            f" {r['onnx_ms']:.1f} ms | {r['onnx_speedup']:.2f}x | "
            f"{r['onnx_ms'] / r['objects']:.1f} ms |"
            if "onnx_ms" in r
            else " – | – | – |"
        )
        lines.append(
            f"| {label} | {r['reference_ms']:.1f} ms | {r['vprompt_ms']:.1f} ms | "
            f"{r['speedup']:.2f}x |{onnx}"
        )
    lines += [
        "",
        "Ratios: plain transformers ÷ vprompt. Per object: ONNX ms ÷ objects.",
        "",
        "GPU (not run here): `python bench/sam_click_latency.py --device cuda --precision bf16 "
        "--model sam:vit-base --image-size 1024x768 --repeats 100 --warmup 10 "
        "--embed-repeats 20 --out bench/results/sam_click_latency_h100` "
        "(the ONNX decoder is a CPU runtime; --onnx adds it on CPU only)",
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
