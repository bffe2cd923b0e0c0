"""One MaPLe training step (deep prompts in both CLIP towers), reference-style and vprompt's.

Deep vision prompts change the image features, so the image tower runs on every batch either
way (no feature cache); what vprompt saves is on the text side:

1. **Reference-style step**, written out plainly below as multimodal-prompt-learning's MaPLe
   runs it: all C class prompts through the text tower at the full 77-token context,
   sequence-first, the deep text prompts swapped in before blocks 1 … J-1; the image tower
   with the coupled vision prompts appended before ``ln_pre``; cross-entropy, backward, SGD.
2. **vprompt**: ``MaPLe.forward`` — prompts cut after the longest prompt's end-of-text token
   and the start token plus context (the same for every class, deep prompts included) run
   through the text tower once per step instead of once per class; the same image tower.

Both start from the same prompt parameters; one step's loss and gradients are compared before
timing. The text side alone (class features, forward and backward) is timed too: that is where
the two differ. Weights are random (``--weights none``): speed does not depend on them.

CPU (what bench/results/deep_vl_step_cpu records)::

    .venv/bin/python bench/deep_vl_step.py --device cpu --threads 2 --classes 100 \
        --batch-size 4 --steps 3 --warmup 1 --out bench/results/deep_vl_step_cpu

GPU (H100)::

    python bench/deep_vl_step.py --device cuda --classes 100 --batch-size 4 --steps 30 \
        --warmup 5 --out bench/results/deep_vl_step_h100
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import vprompt
from coop_step import class_names, sync, time_steps
from vprompt.methods.maple import MaPLe, MaPLeConfig


# ---------------------------------------------------------------------------- reference step
def _block(block: Any, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One residual attention block on L x N x W (sequence-first) tokens, as the reference's
    CLIP runs it."""
    h = block.ln_1(x)
    if block.attn.batch_first:  # open_clip builds its blocks batch-first
        h = h.transpose(0, 1)
        a = block.attn(h, h, h, need_weights=False, attn_mask=mask)[0].transpose(0, 1)
    else:
        a = block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    x = x + block.ls_1(a)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class ReferenceMaPLe:
    """MultiModalPromptLearner + TextEncoder + VisionTransformer_MaPLe, whole 77-token prompts."""

    def __init__(self, backbone: Any, names: Sequence[str], method: MaPLe) -> None:
        self.model = backbone.model
        self.method = method  # its parameters are the prompts (the same tensors)
        tokens = backbone.tokenize([f"a photo of a {n}." for n in names])
        with torch.no_grad():
            emb = self.model.token_embedding(tokens)
        self.prefix, self.suffix = emb[:, :1], emb[:, 1 + method.ctx.shape[0] :]
        self.eot = tokens.argmax(dim=-1)

    def text(self) -> torch.Tensor:
        m, model, ctx = self.method, self.model, self.method.ctx
        n = ctx.shape[0]
        c = self.prefix.shape[0]
        x = torch.cat([self.prefix, ctx.unsqueeze(0).expand(c, -1, -1), self.suffix], dim=1)
        x = (x + model.positional_embedding).permute(1, 0, 2)
        for i, block in enumerate(model.transformer.resblocks):
            if 1 <= i <= len(m.text_deep):
                layer = m.text_deep[i - 1].unsqueeze(1).expand(-1, c, -1)
                x = torch.cat([x[:1], layer, x[1 + n :]], dim=0)
            x = _block(block, x, model.attn_mask)
        x = model.ln_final(x.permute(1, 0, 2))
        x = x[torch.arange(c), self.eot] @ model.text_projection
        return F.normalize(x, dim=-1)

    def image(self, images: torch.Tensor) -> torch.Tensor:
        m, v = self.method, self.model.visual
        prompts = [m.proj(m.ctx)] + [f(t) for f, t in zip(m.couplings, m.text_deep, strict=True)]
        n = prompts[0].shape[0]
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], device=x.device)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding
        x = torch.cat([x, prompts[0].expand(x.shape[0], -1, -1)], dim=1)
        x = v.ln_pre(x).permute(1, 0, 2)
        for i, block in enumerate(v.transformer.resblocks):
            if 1 <= i < len(prompts):
                layer = prompts[i].unsqueeze(1).expand(-1, x.shape[1], -1)
                x = torch.cat([x[: x.shape[0] - n], layer], dim=0)
            x = _block(block, x, None)
        x = v.ln_post(x.permute(1, 0, 2)[:, 0]) @ v.proj
        return F.normalize(x, dim=-1)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model.logit_scale.exp() * self.image(images) @ self.text().T
        return F.cross_entropy(logits, labels)


# ---------------------------------------------------------------------------- timing
def agreement(ref: ReferenceMaPLe, method: MaPLe, images: Any, labels: Any) -> dict[str, float]:
    params = [p for p in method.parameters() if p.requires_grad]
    ref_loss = ref.loss(images, labels)
    ref_grads = torch.autograd.grad(ref_loss, params)
    ours = F.cross_entropy(method(images).logits, labels)
    our_grads = torch.autograd.grad(ours, params)
    worst = max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
        for a, b in zip(our_grads, ref_grads, strict=True)
    )
    return {
        "loss_reference": float(ref_loss.detach()),
        "loss_vprompt": float(ours.detach()),
        "loss_rel_diff": abs(float(ours.detach() - ref_loss.detach()))
        / abs(float(ref_loss.detach())),
        "grad_max_rel_diff": worst,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="clip:ViT-B-16")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/results/deep_vl_step"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backbone = vprompt.load_backbone(args.model, args.weights, device=device)
    names = class_names(args.classes)
    torch.manual_seed(0)
    method = MaPLe(backbone, names, MaPLeConfig()).train()
    ref = ReferenceMaPLe(backbone, names, method)
    gen = torch.Generator().manual_seed(1)
    size = backbone.preprocess.size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    images = torch.randn(args.batch_size, 3, *hw, generator=gen).to(device)
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=gen).to(device)
    agree = agreement(ref, method, images, labels)
    print(json.dumps(agree), flush=True)
    params = [p for p in method.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=1e-12)  # steps of ~0: every timed step sees the same values

    def step(loss_of: Any) -> float:
        sgd.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        sgd.step()
        return float(loss.detach())

    rows = {}
    runs = {
        "reference step": lambda: step(lambda: ref.loss(images, labels)),
        "vprompt step": lambda: step(lambda: F.cross_entropy(method(images).logits, labels)),
        "reference text side": lambda: step(lambda: ref.text().square().sum()),
        "vprompt text side": lambda: step(
            lambda: method.text_features_from(method.prompts()).square().sum()
        ),
    }
    for name, run in runs.items():
        times = time_steps(run, warmup=args.warmup, steps=args.steps, device=device)
        rows[name] = statistics.median(times)
        print(f"{name}: {rows[name] * 1000:.0f} ms", flush=True)
        sync(device)
    result = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
        "model": args.model,
        "weights": args.weights,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "classes": args.classes,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "seconds": rows,
        "agreement": agree,
        "text_speedup": rows["reference text side"] / rows["vprompt text side"],
        "step_speedup": rows["reference step"] / rows["vprompt step"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "results.md").write_text(render(result))
    print(render(result))


def render(r: dict[str, Any]) -> str:
    s, a = r["seconds"], r["agreement"]
    text_row = (
        f"| text side (class features, forward + backward) | {s['reference text side']:.2f} "
        f"| {s['vprompt text side']:.2f} | {r['text_speedup']:.1f}x |"
    )
    step_row = (
        f"| whole step (both towers, loss, backward, SGD) | {s['reference step']:.2f} "
        f"| {s['vprompt step']:.2f} | {r['step_speedup']:.1f}x |"
    )
    return f"""# One MaPLe training step: reference-style vs vprompt ({r["machine"]})

`{r["command"]}`

{r["model"]} ({r["weights"]}) on {r["device"]} (torch {r["torch"]}, {r["threads"]} threads);
MaPLe's defaults (J = 9, 2 tokens from "a photo of a"), {r["classes"]} classes, batch
{r["batch_size"]}, fp32; median of {r["steps"]} timed steps.

| what | reference-style (s) | vprompt (s) | speed-up |
|---|---:|---:|---:|
{text_row}
{step_row}

Agreement of one step from the same prompts: loss {a["loss_reference"]:.6f} vs
{a["loss_vprompt"]:.6f} (relative difference {a["loss_rel_diff"]:.1e}); largest gradient
difference {a["grad_max_rel_diff"]:.1e} of the largest entry, over every prompt parameter.

The reference runs each class prompt at the full 77-token context; vprompt cuts them after the
longest prompt's end-of-text token and runs the start token and context once for all classes
(deep text prompts are the same for every class, and the tower is causal). The image tower
runs on every batch either way: deep vision prompts change the image features.
"""


if __name__ == "__main__":
    main()
