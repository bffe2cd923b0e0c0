"""One CoOp training step, the reference way and vprompt's way, timed in the same run.

1. **Reference-style step**, written out plainly below as the CoOp reference code runs it: the
   image encoder runs on the batch every step (no grad), all C class prompts go through the
   text encoder at the full 77-token context, fp16 autocast on CUDA (fp32 on CPU), then
   cross-entropy, backward and an SGD step.
2. **vprompt's fast path**: ``CoOp.forward_features`` on image features encoded once before
   timing (what the feature cache holds), prompts cut after the longest prompt's end-of-text
   token, bf16 autocast on CUDA, the same loss / backward / SGD step with the engine's
   ``build_optimizer``. The prompts' shared beginning (SOS and the 16 context tokens) runs
   through the text tower once per step, not once per class (``vprompt.backbones.text_prefix``);
   the same step with whole prompts is timed too, to show what that is worth. ``--compile``
   also times it with ``torch.compile`` on the text side.

Both start from the same context vectors; one step's loss and context gradient are compared
before timing (fp32 on CPU must agree tightly; on CUDA the reference's fp16 and vprompt's bf16
differ by their rounding, reported as the largest difference relative to the largest value).
Weights are random (``--weights none``): speed and agreement do not depend on them.

``--e2e`` also times a whole 16-shot, 3-seed CoOp few-shot protocol (the
``coop/few-shot-16ctx`` preset: 200 epochs at 16 shots) on a synthetic dataset of ``--classes``
classes written in a real dataset's layout, through ``plan_jobs`` / ``run_protocol`` with the
feature cache.

CPU (what bench/results/coop_step_cpu records; the end-to-end part on clip:tiny, 32 px)::

    .venv/bin/python bench/coop_step.py --device cpu --threads 2 --model clip:ViT-B-16 \
        --classes 20 --batch-size 8 --steps 5 --warmup 2 --compile \
        --e2e --e2e-model clip:tiny --e2e-image-size 32 --out bench/results/coop_step_cpu

GPU (H100, full settings, with torch.compile and the end-to-end protocol)::

    python bench/coop_step.py --device cuda --model clip:ViT-B-16 --classes 100 \
        --batch-size 32 --n-ctx 16 --steps 50 --warmup 10 --compile \
        --e2e --e2e-image-size 224 --e2e-workers 8 --out bench/results/coop_step_h100
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import vprompt
from vprompt.engine.optim import build_optimizer
from vprompt.methods.coop import CoOp, CoOpConfig, coop_optim
from vprompt.utils.precision import autocast_for

_WORDS = (
    "red", "mountain", "bike", "golden", "retriever", "space", "shuttle", "sea", "lake",
    "wooden", "spoon", "apple", "pie", "tiger", "shark", "church", "indoor", "person", "doing",
    "archery", "hard", "leaved", "pocket", "orchid", "street", "sign", "electric", "ray",
)  # fmt: skip


def class_names(n: int) -> list[str]:
    """``n`` distinct names of 1-4 words (real datasets' names are 1-8 tokens long)."""
    names: list[str] = []
    for i in range(n):
        words = [_WORDS[(7 * i + 3 * j) % len(_WORDS)] for j in range(1 + i % 4)]
        name = " ".join(words)
        names.append(name if name not in names else f"{name} {i}")
    return names


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- reference step
class ReferenceCoOp:
    """CoOp's PromptLearner + TextEncoder + training step, as the reference code runs them:
    the full 77-token context, the image encoder on every batch, fp16 autocast on CUDA."""

    def __init__(self, backbone: Any, names: list[str], ctx: torch.Tensor, lr: float) -> None:
        self.model = backbone.model
        self.device = ctx.device
        tokenizer = backbone._tokenizer
        m = ctx.shape[0]
        prompts = [" ".join(["X"] * m) + f" {n}." for n in names]
        self.tokens = tokenizer(prompts).to(self.device)  # C x 77
        with torch.no_grad():
            emb = self.model.token_embedding(self.tokens).float()  # C x 77 x W
        self.prefix, self.suffix = emb[:, :1], emb[:, 1 + m :]
        self.ctx = ctx.detach().clone().requires_grad_(True)
        self.optimizer = torch.optim.SGD([self.ctx], lr=lr, momentum=0.9, weight_decay=5e-4)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def text_features(self) -> torch.Tensor:
        model, c = self.model, self.tokens.shape[0]
        x = torch.cat([self.prefix, self.ctx.unsqueeze(0).expand(c, -1, -1), self.suffix], dim=1)
        x = x + model.positional_embedding
        x = model.transformer(x, attn_mask=model.attn_mask)
        x = model.ln_final(x)
        return (
            x[torch.arange(c, device=x.device), self.tokens.argmax(dim=-1)] @ model.text_projection
        )

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            with torch.no_grad():
                img = self.model.encode_image(images)
            text = self.text_features()
            img = img / img.norm(dim=-1, keepdim=True)
            text = text / text.norm(dim=-1, keepdim=True)
            logits = self.model.logit_scale.exp() * img @ text.t()
        return F.cross_entropy(logits.float(), labels)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        loss = self.loss(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


# ---------------------------------------------------------------------------- vprompt step
class FastCoOp:
    """vprompt's CoOp on cached image features, through the engine's optimizer and autocast."""

    def __init__(self, backbone: Any, names: list[str], n_ctx: int, device: torch.device) -> None:
        self.device = device
        self.method = CoOp(backbone, names, CoOpConfig(n_ctx=n_ctx, optim=coop_optim()))
        self.method.to(device).train()
        self.optimizer = build_optimizer(
            self.method.trainable_parameters(), self.method.config.optim
        )

    def loss(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast_for(self.device):
            out = self.method.forward_features(feats)
        loss = F.cross_entropy(out.logits.float(), labels)
        for term in out.aux_loss.values():
            loss = loss + term.float()
        return loss

    def step(self, feats: torch.Tensor, labels: torch.Tensor) -> float:
        loss = self.loss(feats, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


#: The text-tower entry points vprompt's CoOp step calls (compiled together with --compile).
TEXT_ENTRIES = ("encode_text_embeddings", "encode_text_shared_prefix")


@contextlib.contextmanager
def whole_prompts(backbone: Any) -> Any:
    """Time vprompt's step as it was before prefix sharing: every prompt runs whole."""
    cls = type(backbone)
    saved = cls.__dict__["shares_text_prefix"]
    cls.shares_text_prefix = property(lambda self: False)
    try:
        yield
    finally:
        cls.shares_text_prefix = saved


def time_steps(
    step: Callable[[], float], *, warmup: int, steps: int, device: torch.device
) -> list[float]:
    """Seconds of each of ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - started)
    return times


def compare(ref: ReferenceCoOp, fast: FastCoOp, images: Any, feats: Any, labels: Any) -> dict:
    """One step's loss and context gradient from the same context, both ways."""
    with torch.no_grad():
        fast.method.ctx.copy_(ref.ctx)
    ref_loss = ref.loss(images, labels)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref.ctx)
    fast_loss = fast.loss(feats, labels)
    (fast_grad,) = torch.autograd.grad(fast_loss, fast.method.ctx)
    a, b = ref_grad.float(), fast_grad.float()
    return {
        "reference_loss": float(ref_loss.detach()),
        "vprompt_loss": float(fast_loss.detach()),
        "loss_rel_diff": abs(float(ref_loss.detach()) - float(fast_loss.detach()))
        / max(abs(float(ref_loss.detach())), 1e-12),
        "grad_max_abs_diff": float((a - b).abs().max()),
        "grad_max_rel_diff": float((a - b).abs().max() / a.abs().max().clamp_min(1e-30)),
        "grad_cosine": float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0)),
    }


def summarize(times: list[float], batch: int) -> dict[str, float]:
    median = statistics.median(times)
    return {
        "median_ms": 1000 * median,
        "min_ms": 1000 * min(times),
        "images_per_s": batch / median,
        "steps": len(times),
    }


# ---------------------------------------------------------------------------- end to end
def run_e2e(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Wall time of a CoOp few-shot protocol (3 seeds) on a synthetic dataset."""
    from vprompt.data.suite.synthetic import write_fake_dataset
    from vprompt.engine.protocol import ProtocolRun, plan_jobs, run_protocol

    seeds = [int(s) for s in args.e2e_seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["VPROMPT_CACHE"] = str(root / "cache")  # few-shot splits stay in tmp
        started = time.perf_counter()
        write_fake_dataset(
            args.e2e_dataset,
            root / "data",
            num_classes=args.classes,
            images_per_class=(args.e2e_shots, min(args.e2e_shots, 4), args.e2e_test),
            image_size=args.e2e_image_size,
        )
        write_seconds = time.perf_counter() - started
        overrides = tuple(args.e2e_set)
        jobs = plan_jobs(
            "few-shot",
            method="coop",
            datasets=[args.e2e_dataset],
            shots=[args.e2e_shots],
            seeds=seeds,
        )
        run = ProtocolRun(
            protocol="few-shot",
            method="coop",
            model=args.e2e_model or args.model,
            weights=args.weights,
            data_root=root / "data",
            out_dir=root / "out",
            overrides=overrides,
            device=str(device),
            feature_cache=None if args.e2e_no_cache else root / "features",
            progress=False,
            num_workers=args.e2e_workers,
            preset="coop/few-shot-16ctx",
        )
        started = time.perf_counter()
        summary = run_protocol(run, jobs)
        wall = time.perf_counter() - started
    records = summary["records"]
    return {
        "model": args.e2e_model or args.model,
        "dataset": args.e2e_dataset,
        "classes": args.classes,
        "shots": args.e2e_shots,
        "seeds": seeds,
        "image_size": args.e2e_image_size,
        "test_per_class": args.e2e_test,
        "preset": "coop/few-shot-16ctx",
        "overrides": list(overrides),
        "feature_cache": not args.e2e_no_cache,
        "epochs": [r["train"]["epochs"] for r in records],
        "job_seconds": [r["seconds"] for r in records],
        "accuracy": [r["metrics"]["accuracy"] for r in records],
        "wall_seconds": wall,
        "write_dataset_seconds": write_seconds,
    }


# ---------------------------------------------------------------------------- report
def render(info: dict[str, Any]) -> str:
    a = info["args"]
    ref, fast = info["reference"], info["vprompt"]
    agree = info["agreement"]
    lines = [
        f"# One CoOp training step: reference-style vs vprompt ({info['device_name']})",
        "",
        f"`{info['command']}`",
        "",
        f"{a['model']} ({a['weights']}) on {info['device']} (torch {info['torch']}"
        + (f", {a['threads']} threads" if info["device"] == "cpu" else "")
        + f"); {a['classes']} classes, batch {a['batch_size']}, {a['n_ctx']} context tokens; "
        f"median of {a['steps']} timed steps after {a['warmup']} warm-up steps.",
        "",
        "| step | text tokens | precision | median ms/step | images/s | speed-up |",
        "|---|---:|---|---:|---:|---:|",
        f"| reference (image encoder every step, full context) | {info['reference_tokens']} | "
        f"{info['reference_precision']} | {ref['median_ms']:.1f} | {ref['images_per_s']:.1f} | "
        "1.0x |",
    ]
    whole = info.get("vprompt_whole_prompts")
    if whole is not None:
        lines.append(
            f"| vprompt, whole prompts (cached features, truncated prompts) | "
            f"{info['vprompt_tokens']} | {info['vprompt_precision']} | {whole['median_ms']:.1f} | "
            f"{whole['images_per_s']:.1f} | {ref['median_ms'] / whole['median_ms']:.1f}x |"
        )
    shared = info.get("shared_prefix_tokens")
    label = (
        f"vprompt (cached features, truncated prompts, {shared}-token prefix run once)"
        if shared
        else "vprompt (cached features, truncated prompts)"
    )
    lines.append(
        f"| {label} | {info['vprompt_tokens']} | {info['vprompt_precision']} | "
        f"{fast['median_ms']:.1f} | {fast['images_per_s']:.1f} | {info['speedup']:.1f}x |"
    )
    comp = info.get("compiled")
    if comp is not None and "median_ms" in comp:
        lines.append(
            f"| vprompt + torch.compile (text side) | {info['vprompt_tokens']} | "
            f"{info['vprompt_precision']} | {comp['median_ms']:.1f} | "
            f"{comp['images_per_s']:.1f} | {ref['median_ms'] / comp['median_ms']:.1f}x |"
        )
    lines += [
        "",
        f"Agreement of one step from the same context: loss {agree['reference_loss']:.6f} vs "
        f"{agree['vprompt_loss']:.6f} (relative difference {agree['loss_rel_diff']:.1e}); "
        f"context gradient max difference {agree['grad_max_abs_diff']:.2e} "
        f"({agree['grad_max_rel_diff']:.1e} of its largest entry), cosine "
        f"{agree['grad_cosine']:.6f} — {'within' if info['agree'] else 'OUTSIDE'} tolerance "
        f"{info['tolerance']:.0e}.",
    ]
    if comp is not None:
        if "error" in comp:
            lines += ["", f"torch.compile failed here: {comp['error']}"]
        else:
            helps = "helps" if comp["median_ms"] < fast["median_ms"] else "does not help"
            lines += [
                "",
                f"torch.compile on the text side {helps}: {comp['median_ms']:.1f} vs "
                f"{fast['median_ms']:.1f} ms/step (compile time {comp['compile_seconds']:.1f} s, "
                "not in the step times).",
            ]
    e2e = info.get("e2e")
    if e2e is not None:
        per_job = ", ".join(f"{s:.1f}" for s in e2e["job_seconds"])
        lines += [
            "",
            f"## End to end: {e2e['shots']}-shot CoOp few-shot protocol, seeds {e2e['seeds']}",
            "",
            f"{e2e['model']} ({a['weights']}); synthetic `{e2e['dataset']}` layout, "
            f"{e2e['classes']} classes, "
            f"{e2e['image_size']} px images, {e2e['test_per_class']} test images per class; "
            f"preset `{e2e['preset']}` ({e2e['epochs'][0]} epochs)"
            + (f" with `{' '.join(e2e['overrides'])}`" if e2e["overrides"] else "")
            + f", feature cache {'on' if e2e['feature_cache'] else 'off'}.",
            "",
            f"Wall time {e2e['wall_seconds']:.1f} s for {len(e2e['seeds'])} jobs "
            f"({per_job} s each; training, caching and testing), plus "
            f"{e2e['write_dataset_seconds']:.1f} s to write the dataset.",
        ]
    if info["device"] == "cpu":
        lines += [
            "",
            "On a shared CPU single step times vary by 10-20% between runs, so a torch.compile "
            "gain or loss of that size is noise; the reference-vs-vprompt ratio is the stable "
            "figure.",
        ]
    lines += [
        "",
        "The reference step runs the image encoder on every batch and all prompts at 77 "
        "tokens; vprompt reads image features encoded once (the feature cache), cuts the "
        "prompts after the longest one's end-of-text token and runs the tokens every prompt "
        "starts with (SOS and the shared context) once instead of once per class; none of this "
        "changes a feature (the text tower is causal). Weights are random (`none`); timings do "
        "not depend on them.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="clip:ViT-B-16")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n-ctx", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--compile", action="store_true", help="Also time torch.compile'd text side")
    ap.add_argument("--e2e", action="store_true", help="Also time a 3-seed few-shot protocol")
    ap.add_argument("--e2e-model", default=None, help="Backbone of --e2e (default: --model)")
    ap.add_argument("--e2e-dataset", default="caltech101")
    ap.add_argument("--e2e-shots", type=int, default=16)
    ap.add_argument("--e2e-seeds", default="1,2,3")
    ap.add_argument("--e2e-test", type=int, default=10, help="Test images per class")
    ap.add_argument("--e2e-image-size", type=int, default=224)
    ap.add_argument("--e2e-no-cache", action="store_true", help="Train on pixels (no cache)")
    ap.add_argument("--e2e-workers", type=int, default=0, help="Data-loading workers")
    ap.add_argument(
        "--e2e-set", action="append", default=[], metavar="KEY=VALUE", help="Config override"
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/coop_step"))
    ap.add_argument("--render", type=Path, default=None, help="Re-render a results.json only")
    args = ap.parse_args()
    if args.render is not None:
        text = render(json.loads(args.render.read_text()))
        args.render.with_name("results.md").write_text(text)
        print(text)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    backbone = vprompt.load_backbone(args.model, args.weights, device=device)
    names = class_names(args.classes)
    gen = torch.Generator().manual_seed(1)
    size = backbone.preprocess.size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    images = torch.randn(args.batch_size, 3, *hw, generator=gen).to(device)
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=gen).to(device)

    fast = FastCoOp(backbone, names, args.n_ctx, device)
    with autocast_for(device):
        feats = fast.method.encode_images(images)  # what the feature cache would hold
    ref = ReferenceCoOp(backbone, names, fast.method.ctx.detach(), lr=0.002)
    agreement = compare(ref, fast, images, feats, labels)
    tolerance = 1e-4 if device.type == "cpu" else 5e-2
    agree = agreement["loss_rel_diff"] < tolerance and agreement["grad_max_rel_diff"] < tolerance
    print(json.dumps(agreement), flush=True)

    ref_times = time_steps(
        lambda: ref.step(images, labels), warmup=args.warmup, steps=args.steps, device=device
    )
    print(f"reference: {statistics.median(ref_times) * 1000:.1f} ms/step", flush=True)
    with whole_prompts(backbone):
        whole_times = time_steps(
            lambda: fast.step(feats, labels), warmup=args.warmup, steps=args.steps, device=device
        )
    print(f"vprompt, whole prompts: {statistics.median(whole_times) * 1000:.1f} ms/step")
    fast_times = time_steps(
        lambda: fast.step(feats, labels), warmup=args.warmup, steps=args.steps, device=device
    )
    print(f"vprompt:   {statistics.median(fast_times) * 1000:.1f} ms/step", flush=True)
    compiled: dict[str, Any] | None = None
    if args.compile:
        try:
            for name in TEXT_ENTRIES:
                setattr(backbone, name, torch.compile(getattr(backbone, name)))
            started = time.perf_counter()
            fast.step(feats, labels)
            sync(device)
            compile_seconds = time.perf_counter() - started
            times = time_steps(
                lambda: fast.step(feats, labels),
                warmup=args.warmup,
                steps=args.steps,
                device=device,
            )
            compiled = summarize(times, args.batch_size) | {"compile_seconds": compile_seconds}
            print(f"compiled:  {statistics.median(times) * 1000:.1f} ms/step", flush=True)
        except Exception as exc:  # a missing compiler toolchain, an unsupported op …
            compiled = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
            print(f"compile failed: {compiled['error']}", flush=True)
        finally:
            for name in TEXT_ENTRIES:
                backbone.__dict__.pop(name, None)  # back to the bound methods

    ref_stats = summarize(ref_times, args.batch_size)
    fast_stats = summarize(fast_times, args.batch_size)
    whole_stats = summarize(whole_times, args.batch_size)
    info: dict[str, Any] = {
        "command": shlex.join(
            [".venv/bin/python" if device.type == "cpu" else "python", *sys.argv]
        ),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine() or "cpu"),
        "torch": torch.__version__,
        "vprompt_version": vprompt.__version__,
        "threads": torch.get_num_threads(),
        "reference_tokens": int(ref.tokens.shape[1]),
        "vprompt_tokens": 1 + args.n_ctx + int(fast.method.assembler.token_suffix.shape[1]),
        "reference_precision": "fp16 autocast" if device.type == "cuda" else "fp32",
        "vprompt_precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "reference": ref_stats | {"times_ms": [1000 * t for t in ref_times]},
        "vprompt": fast_stats | {"times_ms": [1000 * t for t in fast_times]},
        "vprompt_whole_prompts": whole_stats | {"times_ms": [1000 * t for t in whole_times]},
        "shared_prefix_tokens": int(fast.method.assembler.shared_prefix_len),
        "speedup": ref_stats["median_ms"] / fast_stats["median_ms"],
        "compiled": compiled,
        "agreement": agreement,
        "tolerance": tolerance,
        "agree": agree,
    }
    if args.e2e:
        info["e2e"] = run_e2e(args, device)
        print(json.dumps(info["e2e"]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(info, indent=1) + "\n")
    text = render(info)
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
