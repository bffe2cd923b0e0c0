"""TPT's cost per test image: the reference's loop shape and vprompt's, timed in the same run.

For one image, both: encode the 1 + 63 views as one batch with the frozen image tower, score
them with the class prompts, keep the 10% most confident, one AdamW step of the averaged
entropy on the context, then classify the original view with the updated context.

1. **Reference shape** (azshue/TPT ``test_time_tuning`` + the final inference), written out
   plainly below: every class prompt at the full 77-token context, for the tuning step and
   again for the prediction (the reference's ``model(image)`` re-encodes all prompts).
2. **vprompt** (``TPT.forward``): prompts cut after the longest prompt's end-of-text token and
   the start token plus context run once for all classes.

Both start from the same context; the first image's logits are compared before timing.
Weights are random (``--weights none``): speed does not depend on them.

CPU (what bench/results/tpt_image_cpu records)::

    .venv/bin/python bench/tpt_image.py --device cpu --threads 2 --classes 100 --images 2 \
        --out bench/results/tpt_image_cpu

GPU (H100; ImageNet's 1000 classes)::

    python bench/tpt_image.py --device cuda --classes 1000 --images 20 \
        --out bench/results/tpt_image_h100
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import vprompt
from coop_step import class_names, sync
from deep_vl_step import _block
from vprompt.methods.tpt import TPT, TPTConfig


class ReferenceTPT:
    """The reference's PromptLearner + TextEncoder + test_time_tuning for one image."""

    def __init__(self, backbone: Any, names: list[str], ctx: torch.Tensor) -> None:
        self.model = backbone.model
        tokens = backbone.tokenize([f"a photo of a {n}." for n in names])
        with torch.no_grad():
            emb = self.model.token_embedding(tokens)
        self.prefix, self.suffix = emb[:, :1], emb[:, 1 + ctx.shape[0] :]
        self.eot = tokens.argmax(dim=-1)
        self.init = ctx.detach().clone()

    def text(self, ctx: torch.Tensor) -> torch.Tensor:
        model, c = self.model, self.prefix.shape[0]
        x = torch.cat([self.prefix, ctx.unsqueeze(0).expand(c, -1, -1), self.suffix], dim=1)
        x = (x + model.positional_embedding).permute(1, 0, 2)
        for block in model.transformer.resblocks:
            x = _block(block, x, model.attn_mask)
        x = model.ln_final(x.permute(1, 0, 2))[torch.arange(c), self.eot] @ model.text_projection
        return F.normalize(x, dim=-1)

    def classify(self, views: torch.Tensor) -> torch.Tensor:
        ctx = self.init.clone().requires_grad_(True)  # model.reset()
        optimizer = torch.optim.AdamW([ctx], 5e-3)
        with torch.no_grad():
            image = F.normalize(self.model.encode_image(views), dim=-1)
        logits = self.model.logit_scale.exp() * image @ self.text(ctx).t()
        entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
        chosen = logits[torch.argsort(entropy)[: int(logits.shape[0] * 0.1)]]
        log_probs = chosen.log_softmax(1)
        mean = log_probs.logsumexp(0) - torch.log(torch.tensor(float(chosen.shape[0])))
        loss = -(mean * mean.exp()).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            return self.model.logit_scale.exp() * image[:1] @ self.text(ctx).t()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="clip:ViT-B-16")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--images", type=int, default=2, help="Timed images (after one warm-up)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/results/tpt_image"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backbone = vprompt.load_backbone(args.model, args.weights, device=device)
    names = class_names(args.classes)
    method = TPT(backbone, names, TPTConfig()).eval()
    ref = ReferenceTPT(backbone, names, method.ctx)
    gen = torch.Generator().manual_seed(0)
    size = backbone.preprocess.size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    images = [torch.randn(64, 3, *hw, generator=gen).to(device) for _ in range(args.images + 1)]
    with torch.no_grad():
        ours = method(images[0][None]).logits
    theirs = ref.classify(images[0])
    diff = float((ours - theirs).abs().max() / theirs.abs().max())
    print(f"first image: logits differ by {diff:.1e} of the largest", flush=True)
    seconds: dict[str, float] = {}

    def ours_no_grad(views: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # as evaluation runs it; TPT turns grad on for its own step
            return method(views[None]).logits

    for name, run in (("reference", ref.classify), ("vprompt", ours_no_grad)):
        times = []
        for views in images[1:]:
            sync(device)
            started = time.perf_counter()
            run(views)
            sync(device)
            times.append(time.perf_counter() - started)
        seconds[name] = statistics.median(times)
        print(f"{name}: {seconds[name]:.2f} s per image", flush=True)
    result = {
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
        "model": args.model,
        "weights": args.weights,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "classes": args.classes,
        "images": args.images,
        "seconds_per_image": seconds,
        "speedup": seconds["reference"] / seconds["vprompt"],
        "logits_max_rel_diff": diff,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    text = render(result)
    (args.out / "results.md").write_text(text)
    print(text)


def render(r: dict[str, Any]) -> str:
    s = r["seconds_per_image"]
    return f"""# TPT per test image: reference loop shape vs vprompt ({r["machine"]})

`{r["command"]}`

{r["model"]} ({r["weights"]}) on {r["device"]} (torch {r["torch"]}, {r["threads"]} threads);
{r["classes"]} classes, 64 views (1 + 63) in one batch, one AdamW step, fp32; median of
{r["images"]} images after one warm-up.

| loop | s per image | speed-up |
|---|---:|---:|
| reference shape (77-token prompts, re-encoded for the prediction) | {s["reference"]:.2f} | 1.0x |
| vprompt `tpt` (truncated prompts, start run once) | {s["vprompt"]:.2f} | {r["speedup"]:.1f}x |

The first image's logits agree to {r["logits_max_rel_diff"]:.1e} of the largest. The image
tower's 64 views cost the same in both; the difference is the text side (two passes over every
class prompt per image, one with backward).
"""


if __name__ == "__main__":
    main()
