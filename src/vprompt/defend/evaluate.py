"""What a defence costs on clean images and what it buys under a patch, on the test split only.

For every test image the victim is scored with and without the defence:

* clean (the clean cost: accuracy without minus accuracy with the defence);
* when a patch is given, with the patch at ``placements`` seeded random placements drawn from
  its own distribution and at each of ``grid`` x ``grid`` positions (nominal size,
  unrotated; an image counts as correct in the worst case only when every position leaves it
  correct), exactly as :func:`vprompt.attack.robust.robust_accuracy` draws them (same seed,
  same batch size, same order), so the undefended numbers equal ``vprompt attack eval``'s and
  the defended ones are scored on the very same patched images;
* for a certifying defence (PatchCleanser), the certificate on the clean images: the
  certified fraction and the certified robust accuracy (certified *and* correct), the
  paper's lower bound on accuracy under any patch the defence was set up for.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from vprompt.attack.eot import (
    MAX_AREA,
    PatchTransformConfig,
    half_extent,
    nominal_side,
)
from vprompt.attack.patch_file import PatchFile
from vprompt.attack.robust import RobustConfig, check_patch_fits, patched_views
from vprompt.attack.universal import iter_batches
from vprompt.attack.victim import Victim
from vprompt.data.dataset import ClassificationDataset, DataSplits
from vprompt.defend.base import Defense
from vprompt.errors import DatasetError
from vprompt.utils import jsonio


@dataclass
class DefenseReport:
    """Accuracies in [0, 1] of one victim without and with one defence on a test set (None
    where not measured: no patch, or no certificate)."""

    defense: str
    settings: dict[str, Any]
    images: int
    clean_accuracy: float
    clean_accuracy_defended: float
    certified_fraction: float | None = None
    certified_accuracy: float | None = None
    patched_accuracy_random: float | None = None
    patched_accuracy_random_defended: float | None = None
    patched_accuracy_worst: float | None = None
    patched_accuracy_worst_defended: float | None = None
    placements: int | None = None
    grid: int | None = None
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def clean_cost(self) -> float:
        """Clean accuracy lost to the defence."""
        return self.clean_accuracy - self.clean_accuracy_defended

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["clean_cost"] = self.clean_cost
        for kind in ("random", "worst"):
            plain, defended = (
                out[f"patched_accuracy_{kind}"],
                out[f"patched_accuracy_{kind}_defended"],
            )
            gain = None if plain is None or defended is None else defended - plain
            out[f"robust_gain_{kind}"] = gain
        result: dict[str, Any] = jsonio.finite(out)
        return result


def covering_fraction(
    transform: PatchTransformConfig, height: int, width: int, patch_pixels: int
) -> float:
    """Area fraction of the smallest axis-aligned square that holds every placement the
    patch's distribution draws on H x W images: the largest area (``size * (1 + jitter)``)
    at the worst rotation (45° or the largest drawn angle), bilinear edges included."""
    area = min(MAX_AREA, transform.size * (1 + transform.scale_jitter))
    side = nominal_side(area, height, width, transform.shape)
    angle = torch.tensor(math.radians(min(transform.max_rotation, 45.0)), dtype=torch.float64)
    extent = float(2 * half_extent(side, angle, patch_pixels, transform.shape))
    extent = min(extent, float(min(height, width)))
    return min(1.0, extent * extent / (height * width))


def _plain(victim: Victim, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return victim(images).argmax(dim=1).cpu()


def defense_accuracy(
    victim: Victim,
    defense: Defense,
    test: ClassificationDataset,
    patch_file: PatchFile | None = None,
    config: RobustConfig | None = None,
    *,
    progress: bool | None = None,
) -> DefenseReport:
    """Score ``defense`` around ``victim`` on the test images ``test``, clean and (with
    ``patch_file``) under the patch at the placements ``robust_accuracy`` uses."""
    cfg = config or RobustConfig()
    if len(test) == 0:
        raise DatasetError("the test split is empty")
    if patch_file is not None:
        check_patch_fits(patch_file, victim)
    device = victim.device
    generator = torch.Generator().manual_seed(cfg.seed)
    rows: dict[str, list[torch.Tensor]] = {}

    def keep(key: str, value: torch.Tensor) -> None:
        rows.setdefault(key, []).append(value)

    settings: dict[str, Any] = {}
    bar = tqdm(
        total=len(test),
        desc=f"defend eval ({defense.name})",
        unit="img",
        leave=False,
        disable=True if progress is False else None,
    )
    for images, labels in iter_batches(
        test, victim.pixel_transform, batch_size=cfg.batch_size, device=device
    ):
        b, _, h, w = images.shape
        settings = settings or defense.describe(h, w)
        keep("labels", labels.cpu())
        keep("clean", _plain(victim, images))
        out = defense(images, certify=defense.certifies)
        keep("clean_defended", out.prediction)
        if out.certified is not None:
            keep("certified", out.certified)
        if patch_file is not None:
            _patched(victim, defense, patch_file, images, cfg, generator, keep)
        bar.update(b)
    bar.close()
    got = {key: torch.cat(value) for key, value in rows.items()}
    y = got["labels"]

    def accuracy(key: str) -> float:
        return float((got[key] == y).float().mean())

    def worst(key: str) -> float:
        return float((got[key] == y.unsqueeze(1)).all(dim=1).float().mean())

    def mean_over_placements(key: str) -> float:
        return float((got[key] == y.unsqueeze(1)).float().mean())

    report = DefenseReport(
        defense=defense.name,
        settings=settings,
        images=len(y),
        clean_accuracy=accuracy("clean"),
        clean_accuracy_defended=accuracy("clean_defended"),
        seed=cfg.seed,
    )
    if "certified" in got:
        certified = got["certified"]
        report.certified_fraction = float(certified.float().mean())
        report.certified_accuracy = float((certified & (got["clean_defended"] == y)).float().mean())
    if patch_file is not None:
        report.patched_accuracy_random = mean_over_placements("random")
        report.patched_accuracy_random_defended = mean_over_placements("random_defended")
        report.patched_accuracy_worst = worst("grid")
        report.patched_accuracy_worst_defended = worst("grid_defended")
        report.placements, report.grid = cfg.placements, cfg.grid
    return report


def _patched(
    victim: Victim,
    defense: Defense,
    patch_file: PatchFile,
    images: torch.Tensor,
    cfg: RobustConfig,
    generator: torch.Generator,
    keep: Any,
) -> None:
    """One batch under the patch (``robust_accuracy``'s views, in its order), each view
    scored without and with the defence."""
    found: dict[str, list[torch.Tensor]] = {}
    for kind, patched in patched_views(images, patch_file, cfg, generator):
        found.setdefault(kind, []).append(_plain(victim, patched))
        found.setdefault(f"{kind}_defended", []).append(defense(patched).prediction)
    for key in ("random", "random_defended", "grid", "grid_defended"):
        keep(key, torch.stack(found[key], dim=1))


def evaluate_defense_on(
    victim: Victim,
    defense: Defense,
    splits: DataSplits,
    patch_file: PatchFile | None = None,
    config: RobustConfig | None = None,
    *,
    test_subset: int | None = None,
    progress: bool | None = None,
) -> DefenseReport:
    """:func:`defense_accuracy` on ``splits.test`` (the seeded subset of ``test_subset``
    images that ``vprompt attack eval`` picks, when given); the training and validation
    splits are never read."""
    from vprompt.engine.experiment import random_subset

    test = random_subset(splits.test, test_subset, (config or RobustConfig()).seed)
    return defense_accuracy(victim, defense, test, patch_file, config, progress=progress)
