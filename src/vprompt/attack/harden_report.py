"""Hardening a prompt pack end to end, and the white-box comparison of both packs.

:func:`harden_pack` runs, in this order (every training stage before any test image is read):

1. a universal patch trained **from scratch** against the original pack on the training split
   (:func:`~vprompt.attack.universal.train_patch`, Brown et al. 2017);
2. hardening (:func:`~vprompt.attack.harden.harden`, Madry et al. 2018's adversarial training
   with an adaptive patch), warm-started from that patch; the hardened pack is written with
   :func:`~vprompt.engine.pack.save_pack` and read back with ``load_pack`` /
   ``build_from_pack``, so what is scored is what the file holds;
3. a patch trained **from scratch** against the hardened pack, with the same budget and seed;
4. on the TEST split (:func:`~vprompt.attack.robust.evaluate_patch_on`, the same seeded
   placements for both): each pack under the patch made against it, and, for reference, the
   hardened pack under the original's patch.

The comparison is white-box: the attacker always adapts to the prompt it faces. Scoring the
hardened pack only against the patch made for the original (step 4's reference row) flatters
the defence, since a patch transfers worse than it attacks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vprompt.attack.harden import (
    HardenConfig,
    HardenResult,
    check_capabilities,
    check_hardenable,
    harden,
)
from vprompt.attack.patch_file import PatchFile, save_patch, save_patch_png
from vprompt.attack.robust import RobustConfig, RobustReport, evaluate_patch_on
from vprompt.attack.universal import PatchTrainConfig, describe_config, train_patch
from vprompt.attack.victim import Victim, victim_from_method
from vprompt.data.dataset import DataSplits
from vprompt.engine.experiment import random_subset
from vprompt.engine.pack import (
    PromptPack,
    build_from_pack,
    check_classnames,
    load_pack,
    pack_method,
    save_pack,
)
from vprompt.errors import ConfigError
from vprompt.methods.registry import METHODS
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_write_text

PACK_FILE = "prompt.safetensors"
PATCH_FILE = "patch.safetensors"
ATTACK_ORIGINAL = "attack_original.safetensors"
ATTACK_HARDENED = "attack_hardened.safetensors"
REPORT_JSON = "harden.json"
REPORT_MD = "harden.md"


@dataclass(frozen=True)
class AttackBudget:
    """The white-box attacker the comparison uses against each pack.

    Attributes:
        epochs: Passes of ``train_patch`` over the training split, from scratch.
        placements: Seeded random placements per test image.
        grid: Worst case over ``grid`` x ``grid`` positions.
        train_subset: Train on a seeded subset of this many training images (None: all).
        test_subset: Score on a seeded subset of this many test images (None: all).
    """

    epochs: int = 3
    placements: int = 4
    grid: int = 3
    train_subset: int | None = None
    test_subset: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"attack epochs must be an integer >= 1, got {self.epochs!r}")
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        RobustConfig(placements=self.placements, grid=self.grid)  # validates both


@dataclass
class HardenOutcome:
    """What :func:`harden_pack` produced: the hardened pack's path, the hardening record, and
    the test-split reports (original vs its own patch, hardened vs its own patch, hardened vs
    the original's patch)."""

    pack_path: Path
    result: HardenResult
    original: RobustReport
    hardened: RobustReport
    hardened_vs_original_patch: RobustReport
    summary: dict[str, Any]


def _patch_config(config: HardenConfig, budget: AttackBudget, batch_size: int) -> PatchTrainConfig:
    return PatchTrainConfig(
        transform=config.transform,
        optimizer=config.patch_optimizer,
        lr=config.patch_lr,
        epochs=budget.epochs,
        batch_size=batch_size,
        seed=config.seed,
    )


def harden_pack(
    pack: PromptPack,
    splits: DataSplits,
    config: HardenConfig,
    budget: AttackBudget,
    out_dir: str | Path,
    *,
    pack_source: str | None = None,
    data_spec: str | None = None,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
    batch_size: int = 32,
    progress: bool | None = None,
) -> HardenOutcome:
    """Harden ``pack`` on ``splits.train`` and compare both packs on ``splits.test`` (see the
    module docstring); writes ``prompt.safetensors`` (the hardened pack), ``patch.safetensors``
    / ``patch.png`` (the attacker's last patch during hardening), ``attack_original`` /
    ``attack_hardened.safetensors`` (the from-scratch patches) and ``harden.json`` /
    ``harden.md`` to ``out_dir``. ``splits.val`` is never read.

    Args:
        batch_size: Images per batch of the from-scratch attacks and of the evaluation.

    Raises:
        ConfigError: The pack's method has no prompt to harden (checked before any work), or
            its classes differ from the data's.
    """
    check_capabilities(pack.method, METHODS.get(pack.method).capabilities)
    check_classnames(pack, list(splits.train.classnames))
    method = build_from_pack(pack, weights=weights, device=device, allow_download=allow_download)
    check_hardenable(method)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = str(Path(pack_source).expanduser().absolute()) if pack_source else pack.source
    train = random_subset(splits.train, budget.train_subset, config.seed)
    described = {"model": pack.backbone.name, "weights": pack.backbone.weights}
    original = victim_from_method(method, {"pack": source, **described})
    attack_cfg = _patch_config(config, budget, batch_size)
    attack_o = train_patch(original, train, attack_cfg, progress=progress)

    # A second copy of the prompt on the same frozen backbone: the victim above froze its own.
    student = build_from_pack(pack, backbone=method.backbone)
    result = harden(student, train, config, init_patch=attack_o.patch, progress=progress)
    settings = _settings(config, budget, len(train))
    extra = {"hardened": {"from_pack": source, "data": data_spec, **settings}}
    pack_path = save_pack(
        pack_method(student, metrics={"hardening": result.history[-1]}, extra=extra),
        out / PACK_FILE,
    )
    reloaded = build_from_pack(load_pack(pack_path), backbone=method.backbone)
    where = str(pack_path.expanduser().absolute())
    hardened = victim_from_method(reloaded, {"pack": where, **described})
    attack_h = train_patch(hardened, train, attack_cfg, progress=progress)

    def patch_file(patch: torch.Tensor, victim: Victim, scratch: bool) -> PatchFile:
        how = (
            {**describe_config(attack_cfg), "from": "scratch"}
            if scratch
            else {"from": "hardening", "epochs": config.epochs, "patch_steps": config.patch_steps}
        )
        return PatchFile(
            patch=patch,
            transform=config.transform,
            classnames=list(pack.classnames),
            victim={**victim.description, "data": data_spec},
            train={**how, "images": len(train)},
        )

    files = {
        "original": patch_file(attack_o.patch, original, True),
        "hardened": patch_file(attack_h.patch, hardened, True),
        "adaptive": patch_file(result.patch, hardened, False),
    }
    save_patch(files["original"], out / ATTACK_ORIGINAL)
    save_patch(files["hardened"], out / ATTACK_HARDENED)
    save_patch(files["adaptive"], out / PATCH_FILE)
    save_patch_png(result.patch, out / "patch.png", config.transform.shape)

    # Only now is the test split read.
    robust = RobustConfig(
        placements=budget.placements, grid=budget.grid, seed=config.seed, batch_size=batch_size
    )

    def score(victim: Victim, patch_file: PatchFile) -> RobustReport:
        return evaluate_patch_on(
            victim, patch_file, splits, robust, test_subset=budget.test_subset, progress=progress
        )

    outcome = HardenOutcome(
        pack_path=pack_path,
        result=result,
        original=score(original, files["original"]),
        hardened=score(hardened, files["hardened"]),
        hardened_vs_original_patch=score(hardened, files["original"]),
        summary={},
    )
    outcome.summary = {
        "pack": source,
        "hardened_pack": where,
        "method": pack.method,
        "backbone": described,
        "data": data_spec,
        "split": "test",
        "settings": settings,
        "original": outcome.original.to_json(),
        "hardened": outcome.hardened.to_json(),
        "hardened_vs_original_patch": outcome.hardened_vs_original_patch.to_json(),
        "history": result.history,
    }
    atomic_write_text(
        out / REPORT_JSON, jsonio.dumps(jsonio.finite(outcome.summary), indent=1) + "\n"
    )
    atomic_write_text(out / REPORT_MD, markdown_comparison(outcome))
    return outcome


def _settings(config: HardenConfig, budget: AttackBudget, train_images: int) -> dict[str, Any]:
    return {
        "transform": asdict(config.transform),
        "epochs": config.epochs,
        "patch_steps": config.patch_steps,
        "mix": config.mix,
        "seed": config.seed,
        "patch_optimizer": config.patch_optimizer,
        "patch_lr": config.patch_lr,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "train_images": train_images,
        "attack": asdict(budget),
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def markdown_comparison(outcome: HardenOutcome) -> str:
    """Both packs side by side on the test split, as a markdown table."""
    s = outcome.summary
    o, h, t = outcome.original, outcome.hardened, outcome.hardened_vs_original_patch
    rows = [
        ("clean accuracy", o.clean_accuracy, h.clean_accuracy, t.clean_accuracy),
        (
            f"accuracy, patch at {o.placements} random placements",
            o.patched_accuracy_random,
            h.patched_accuracy_random,
            t.patched_accuracy_random,
        ),
        (
            f"accuracy, worst of {o.grid}x{o.grid} positions",
            o.patched_accuracy_worst,
            h.patched_accuracy_worst,
            t.patched_accuracy_worst,
        ),
        ("attack success, random placements", o.success_rate_random, h.success_rate_random,
         t.success_rate_random),
        ("attack success, worst position", o.success_rate_worst, h.success_rate_worst,
         t.success_rate_worst),
    ]  # fmt: skip
    cfg = s["settings"]
    lines = [
        "# Hardening a prompt against a universal patch",
        "",
        f"{s['method']} on {s['backbone']['model']}; {o.images} test images; patch "
        f"{100 * cfg['transform']['size']:.0f}% of the image ({cfg['transform']['shape']}); "
        f"{cfg['epochs']} hardening epochs, {cfg['patch_steps']} patch steps each, "
        f"mix {cfg['mix']}. Each pack faces a patch trained from scratch against it "
        f"({cfg['attack']['epochs']} epochs on {cfg['train_images']} training images, "
        "same seed); the last column is the hardened pack under the original's patch "
        "(not adaptive: for reference only).",
        "",
        "| metric | original | hardened | hardened, original's patch |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {_pct(a)} | {_pct(b)} | {_pct(c)} |" for n, a, b, c in rows]
    return "\n".join(lines) + "\n"
