"""Robust accuracy under a universal patch, on the test split only.

For every test image the victim is scored clean, with the patch at ``placements`` random
placements drawn from the patch's own distribution (seeded, so reruns repeat), and with the
patch at each of ``grid`` x ``grid`` positions (nominal size, unrotated): the worst case over
positions counts an image as correct only if every position leaves it correct.

Attack success rate (Brown et al. 2017 report the targeted one):

* untargeted: among the images classified correctly when clean, the fraction the patch makes
  wrong;
* targeted: among the images whose true class is not the target, the fraction classified as
  the target.

For random placements the rate is averaged over placements; for the grid an image counts as a
success when any position succeeds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from vprompt.attack.eot import apply_patch, grid_placements, sample_placements
from vprompt.attack.patch_file import PatchFile
from vprompt.attack.universal import iter_batches
from vprompt.attack.victim import Victim
from vprompt.data.dataset import ClassificationDataset, DataSplits
from vprompt.errors import ConfigError, DatasetError
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_write_text


def success_rate(
    clean_pred: torch.Tensor,
    adv_pred: torch.Tensor,
    labels: torch.Tensor,
    *,
    target: int | None = None,
    reduce: Literal["mean", "any"] = "mean",
) -> float | None:
    """The attack success rate (see the module docstring); None when no image is eligible.

    Args:
        clean_pred: N predictions without the patch.
        adv_pred: N or N x P predictions with it (P placements per image).
        labels: N true labels.
        target: The targeted class; None for an untargeted attack.
        reduce: ``mean`` over placements, or ``any`` placement (the worst case).
    """
    adv = adv_pred.reshape(len(labels), -1)
    if target is None:
        eligible = clean_pred == labels
        hit = adv != labels.unsqueeze(1)
    else:
        eligible = labels != target
        hit = adv == target
    if not bool(eligible.any()):
        return None
    per_image = hit.float().mean(dim=1) if reduce == "mean" else hit.any(dim=1).float()
    return float(per_image[eligible].mean())


@dataclass(frozen=True)
class RobustConfig:
    """Attributes:
    placements: Seeded random placements per image.
    grid: The worst case is taken over ``grid`` x ``grid`` positions.
    seed: Seeds the random placements.
    batch_size: Images per forward.
    examples: Test images shown in the example grid.
    """

    placements: int = 4
    grid: int = 3
    seed: int = 0
    batch_size: int = 32
    examples: int = 8

    def __post_init__(self) -> None:
        for name, low, high in (
            ("placements", 1, 1000),
            ("grid", 1, 64),
            ("batch_size", 1, 10**6),
            ("examples", 0, 64),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


@dataclass
class RobustReport:
    """Scores of one patch on a test set (accuracies in [0, 1]; rates None when undefined)."""

    images: int
    clean_accuracy: float
    patched_accuracy_random: float
    patched_accuracy_worst: float
    success_rate_random: float | None
    success_rate_worst: float | None
    target: int | None
    target_name: str | None
    placements: int
    grid: int
    examples: dict[str, torch.Tensor]
    captions: list[str]
    """"true>predicted" for each clean example, then for each patched one."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("examples", "captions"):
            out.pop(key)
        result: dict[str, Any] = jsonio.finite(out)
        return result


def check_patch_fits(patch_file: PatchFile, victim: Victim) -> None:
    """Refuse a patch made for other classes than the victim's, naming both."""
    if list(patch_file.classnames) != list(victim.classnames):
        raise ConfigError(
            f"the patch was made for {len(patch_file.classnames)} classes "
            f"({', '.join(patch_file.classnames[:5])} …) and the victim has "
            f"{len(victim.classnames)} ({', '.join(victim.classnames[:5])} …)"
        )


def patched_views(
    images: torch.Tensor,
    patch_file: PatchFile,
    config: RobustConfig,
    generator: torch.Generator,
) -> Iterator[tuple[Literal["random", "grid"], torch.Tensor]]:
    """One batch under the patch, as robust accuracy scores it: ``config.placements`` random
    placements drawn from ``generator`` in turn, then every position of the grid. Anything
    that scores the same views (a defence's evaluation) sees the very same patched images."""
    b, _, h, w = images.shape
    patch = patch_file.patch.to(images.device)
    transform, s = patch_file.transform, patch.shape[-1]
    for _ in range(config.placements):
        where = sample_placements(b, h, w, transform, patch_pixels=s, generator=generator)
        yield "random", apply_patch(images, patch, where.to(images.device), transform.shape)
    grid = grid_placements(h, w, transform, patch_pixels=s, grid=config.grid).to(images.device)
    for g in range(len(grid)):
        yield "grid", apply_patch(images, patch, grid.repeat(g, b), transform.shape)


@torch.no_grad()
def robust_accuracy(
    victim: Victim,
    patch_file: PatchFile,
    test: ClassificationDataset,
    config: RobustConfig | None = None,
    *,
    progress: bool | None = None,
) -> RobustReport:
    """Score ``patch_file``'s patch against ``victim`` on the test images ``test``."""
    cfg = config or RobustConfig()
    if len(test) == 0:
        raise DatasetError("the test split is empty")
    check_patch_fits(patch_file, victim)
    device = victim.device
    generator = torch.Generator().manual_seed(cfg.seed)
    labels_all, clean_all, random_all, grid_all = [], [], [], []
    shown: dict[str, list[torch.Tensor]] = {"clean": [], "patched": []}
    captions: list[str] = []
    clean_captions: list[str] = []
    names = victim.classnames
    bar = tqdm(
        total=len(test),
        desc="robust eval",
        unit="img",
        leave=False,
        disable=True if progress is False else None,
    )
    for images, labels in iter_batches(
        test, victim.pixel_transform, batch_size=cfg.batch_size, device=device
    ):
        b = len(images)
        clean = victim(images).argmax(dim=1).cpu()
        random_preds: list[torch.Tensor] = []
        grid_preds: list[torch.Tensor] = []
        first = images
        for kind, patched in patched_views(images, patch_file, cfg, generator):
            if kind == "random" and not random_preds:
                first = patched
            preds = random_preds if kind == "random" else grid_preds
            preds.append(victim(patched).argmax(dim=1).cpu())
        take = max(0, cfg.examples - len(shown["clean"]))
        for i in range(min(take, b)):
            shown["clean"].append(images[i].cpu())
            shown["patched"].append(first[i].cpu())
            truth = names[int(labels[i])]
            clean_captions.append(f"{truth}>{names[int(clean[i])]}")
            captions.append(f"{truth}>{names[int(random_preds[0][i])]}")
        labels_all.append(labels.cpu())
        clean_all.append(clean)
        random_all.append(torch.stack(random_preds, dim=1))
        grid_all.append(torch.stack(grid_preds, dim=1))
        bar.update(b)
    bar.close()
    y = torch.cat(labels_all)
    clean_pred = torch.cat(clean_all)
    rand_pred, grid_pred = torch.cat(random_all), torch.cat(grid_all)
    target = patch_file.target
    return RobustReport(
        images=len(y),
        clean_accuracy=float((clean_pred == y).float().mean()),
        patched_accuracy_random=float((rand_pred == y.unsqueeze(1)).float().mean()),
        patched_accuracy_worst=float((grid_pred == y.unsqueeze(1)).all(dim=1).float().mean()),
        success_rate_random=success_rate(clean_pred, rand_pred, y, target=target),
        success_rate_worst=success_rate(clean_pred, grid_pred, y, target=target, reduce="any"),
        target=target,
        target_name=None if target is None else names[target],
        placements=cfg.placements,
        grid=cfg.grid,
        examples={k: torch.stack(v) for k, v in shown.items() if v},
        captions=clean_captions + captions,
    )


def evaluate_patch_on(
    victim: Victim,
    patch_file: PatchFile,
    splits: DataSplits,
    config: RobustConfig | None = None,
    *,
    test_subset: int | None = None,
    progress: bool | None = None,
) -> RobustReport:
    """:func:`robust_accuracy` on ``splits.test`` (a seeded subset of ``test_subset`` images
    when given); the training and validation splits are never read."""
    from vprompt.engine.experiment import random_subset

    test = random_subset(splits.test, test_subset, (config or RobustConfig()).seed)
    return robust_accuracy(victim, patch_file, test, config, progress=progress)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def markdown_table(report: RobustReport, *, title: str = "Patch attack") -> str:
    """The report as a markdown table."""
    kind = "untargeted" if report.target is None else f"targeted → {report.target_name}"
    rows = [
        ("clean accuracy", _percent(report.clean_accuracy)),
        (
            f"accuracy, patch at {report.placements} random placements",
            _percent(report.patched_accuracy_random),
        ),
        (
            f"accuracy, worst of {report.grid}x{report.grid} positions",
            _percent(report.patched_accuracy_worst),
        ),
        ("attack success, random placements", _percent(report.success_rate_random)),
        ("attack success, worst position", _percent(report.success_rate_worst)),
    ]
    lines = [
        f"# {title}",
        "",
        f"{report.images} test images, {kind}.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def write_report(
    report: RobustReport,
    patch_file: PatchFile,
    out_dir: str | Path,
    *,
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write ``robust.json``, ``robust.md``, ``patch.png`` and ``examples.png`` (each clean
    example beside its patched copy, captioned "true>predicted") to ``out_dir``."""
    from vprompt.attack.patch_file import save_patch_png
    from vprompt.engine.report import save_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {**(extra or {}), **report.to_json()}
    written = [out / "robust.json", out / "robust.md"]
    atomic_write_text(written[0], jsonio.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(written[1], markdown_table(report))
    written.append(save_patch_png(patch_file.patch, out / "patch.png", patch_file.transform.shape))
    if "clean" in report.examples:
        # Each clean image beside its patched copy, pairs in reading order.
        clean, patched = report.examples["clean"], report.examples["patched"]
        both = torch.stack([clean, patched], dim=1).flatten(0, 1)
        n = len(clean)
        captions: Sequence[str] = [
            c for pair in zip(report.captions[:n], report.captions[n:], strict=True) for c in pair
        ]
        written.append(save_image(both, out / "examples.png", captions))
    return written
