"""Input defences: LGS, feature masking, PatchCleanser, their evaluation and ``vprompt defend``."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from vprompt.attack import (
    PatchFile,
    PatchTransformConfig,
    RobustConfig,
    Victim,
    evaluate_patch_on,
    save_patch,
    victim_from_backbone,
)
from vprompt.data.dataset import DataSplits
from vprompt.defend import DEFENSES, build_defense
from vprompt.defend.evaluate import covering_fraction, evaluate_defense_on
from vprompt.defend.feature_mask import FeatureMask, FeatureMaskConfig
from vprompt.defend.lgs import LGSConfig, LocalGradientSmoothing
from vprompt.defend.patchcleanser import (
    PatchCleanser,
    PatchCleanserConfig,
    axis_masks,
    double_masking,
    mask_set,
)
from vprompt.errors import ConfigError, UnknownNameError

# ---------------------------------------------------------------------- helpers


class ListData:
    """A tiny in-memory dataset of PIL images that records which items were read."""

    def __init__(self, name: str, n: int, classnames: list[str], log: list[str]) -> None:
        gen = np.random.default_rng(len(name) + n)
        self.name, self.classnames, self.log = name, classnames, log
        self.items = [
            (Image.fromarray(gen.integers(0, 255, (20, 20, 3), dtype=np.uint8)), i % 3)
            for i in range(n)
        ]

    def __len__(self) -> int:
        self.log.append(f"{self.name}:len")
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        self.log.append(f"{self.name}:{index}")
        return self.items[index]


def _splits(names: list[str], log: list[str]) -> DataSplits:
    return DataSplits(
        name="t",
        train=ListData("train", 4, names, log),
        val=ListData("val", 3, names, log),
        test=ListData("test", 5, names, log),
    )


@pytest.fixture(scope="module")
def tv_tiny():
    from vprompt import load_backbone

    return load_backbone("torchvision:tiny", "none")


@pytest.fixture(scope="module")
def tiny_victim(tv_tiny) -> Victim:
    return victim_from_backbone(tv_tiny, list(tv_tiny.source_classes[:3]), {"model": "tv"})


class Rule(nn.Module):
    """A toy classifier of 3 x 12 x 12 pixels whose label is ``rule(masked)``, ``masked``
    saying, for each of the corner pixels A (0, 0), B (11, 11) and C (0, 11), whether it
    holds the fill value 0.5 (the test images never do)."""

    def __init__(self, rule, classes: int = 3) -> None:
        super().__init__()
        self.rule, self.classes = rule, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corners = [x[:, :, 0, 0], x[:, :, 11, 11], x[:, :, 0, 11]]
        a, b, c = ((p == 0.5).all(dim=1) for p in corners)
        labels = torch.tensor([self.rule(*flags) for flags in zip(a, b, c, strict=True)])
        return nn.functional.one_hot(labels, self.classes).float()


def _images(n: int = 2, size: int = 12) -> torch.Tensor:
    return 0.6 + 0.4 * torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------- LGS


def _lgs_reference(x: np.ndarray, window: int, overlap: int, tau: float, lam: float) -> np.ndarray:
    """LGS on one 3 x H x W image, written out loop by loop from the paper's definition."""
    _, h, w = x.shape
    g = np.zeros((h, w))
    for c in range(3):
        gy, gx = np.gradient(x[c])
        g += gy**2 + gx**2
    g = np.sqrt(g)
    g = (g - g.min()) / (g.max() - g.min()) if g.max() > g.min() else np.zeros_like(g)

    def starts(n: int) -> list[int]:
        out, s = [], 0
        while s + window <= n:
            out.append(s)
            s += window - overlap
        if out[-1] + window < n:
            out.append(n - window)
        return out

    mask = np.zeros((h, w))
    for top in starts(h):
        for left in starts(w):
            if g[top : top + window, left : left + window].mean() > tau:
                mask[top : top + window, left : left + window] = 1
    return x * np.clip(1 - lam * g * mask, 0, 1)


def test_lgs_matches_the_definition_and_suppresses_a_high_contrast_square():
    x = torch.full((1, 3, 40, 40), 0.5)
    x[:, :, 10:16, 22:28] = 1.0
    x[:, 1, 30:33, 5:8] = 0.55  # a faint blob: its windows stay below the threshold
    lgs = LocalGradientSmoothing(model=nn.Identity(), config=LGSConfig(window=8, overlap=2))
    out = lgs.sanitise(x)
    want = _lgs_reference(x[0].double().numpy(), 8, 2, 0.1, 2.3)
    assert np.allclose(out[0].double().numpy(), want, atol=1e-6)
    # The square's edges go black; flat ground and the faint blob are untouched.
    assert float(out[0, :, 10, 22:28].max()) == 0.0
    assert float(out[0, :, 15, 22:28].max()) == 0.0
    assert torch.equal(out[..., :6, :], x[..., :6, :])
    assert torch.equal(out[..., 28:, :12], x[..., 28:, :12])
    assert float(out.min()) >= 0
    assert float(out.max()) <= 1


def test_lgs_leaves_flat_images_alone_and_scales_its_windows():
    flat = torch.full((2, 3, 32, 32), 0.3)
    assert torch.equal(LocalGradientSmoothing(model=nn.Identity()).sanitise(flat), flat)
    assert LGSConfig().windowing(224, 224) == (15, 5)
    assert LGSConfig().windowing(32, 48) == (2, 1)
    assert LGSConfig().windowing(448, 448) == (30, 10)
    with pytest.raises(ConfigError, match="overlap"):
        LGSConfig(window=4, overlap=4)


# ---------------------------------------------------------------------- feature masking


class Linear(nn.Module):
    """logits = W · flatten(x) + b on 3 x 12 x 12 pixels, class 0 strongly preferred, with
    class 0's weights (so the input gradient) large on rows 3-6, columns 6-9 only."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        weight = 0.01 * torch.randn(2, 3, 12, 12, generator=gen)
        weight[0, :, 3:7, 6:10] = 5.0
        self.weight = nn.Parameter(weight.flatten(1))
        self.bias = nn.Parameter(torch.tensor([1000.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


@pytest.mark.parametrize("fill", ["mean", "grey"])
def test_feature_mask_masks_the_planted_high_gradient_window(fill):
    model, x = Linear(), _images(3)
    defense = FeatureMask(model=model, config=FeatureMaskConfig(patch_size=16 / 144, fill=fill))
    assert defense.locate(x).tolist() == [[3, 6]] * 3
    out = defense.sanitise(x)
    window = torch.zeros(12, 12, dtype=torch.bool)
    window[3:7, 6:10] = True
    value = x.mean(dim=(2, 3), keepdim=True).expand_as(x) if fill == "mean" else 0.5 + 0 * x
    assert torch.allclose(out[..., window], value[..., window])
    assert torch.equal(out[..., ~window], x[..., ~window])
    result = defense(x)
    assert result.logits is not None
    assert torch.allclose(result.logits, model(out).detach())
    # Only the image had a gradient: the model's parameters never received one.
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------- PatchCleanser


@pytest.mark.parametrize(
    ("h", "w", "p", "k"), [(12, 12, 3, 3), (12, 12, 3, 2), (13, 17, 4, 4), (10, 10, 10, 2),
                           (16, 16, 1, 6), (9, 14, 5, 6)],
)  # fmt: skip
def test_mask_set_covers_every_patch_position(h, w, p, k):
    rows = axis_masks(h, p, k)
    assert rows.stride == -(-(h - p + 1) // k)
    assert rows.size == min(h, p + rows.stride - 1)
    assert len(rows.starts) <= k
    assert rows.starts[0] == 0
    assert rows.starts[-1] + rows.size <= h
    masks = mask_set(h, w, p, k)
    assert len(masks) == len(rows.starts) * len(axis_masks(w, p, k).starts)
    assert _covers_every_position(masks, p)
    # The check can fail: masks one pixel narrower (last row and column dropped) leave some
    # patch position uncovered whenever the masks do not span the whole image.
    if rows.size < h:
        narrow = masks.clone()
        for m in narrow:
            r = m.any(dim=1).nonzero().max()
            c = m.any(dim=0).nonzero().max()
            m[r, :] = False
            m[:, c] = False
        assert not _covers_every_position(narrow, p)


def _covers_every_position(masks: torch.Tensor, p: int) -> bool:
    """Every p x p patch position lies wholly inside at least one of the K x H x W masks."""
    h, w = masks.shape[-2:]
    for top, left in itertools.product(range(h - p + 1), range(w - p + 1)):
        if not bool(masks[:, top : top + p, left : left + p].flatten(1).all(dim=1).any()):
            return False
    return True


def _cleanser(rule) -> PatchCleanser:
    # 12 px, p = 3, k = 3: stride 4, 6 px masks at 0, 4, 6; a mask holds at most one corner.
    config = PatchCleanserConfig(patch_size=9 / 144, k=3, batch_size=7)
    return PatchCleanser(model=Rule(rule), config=config)


@pytest.mark.parametrize(
    ("case", "rule", "label", "certified"),
    [
        # (a) A, B and C masked at once is out of reach of two masks: every prediction agrees.
        ("agreed", lambda a, b, c: int(a and b and c), 0, True),
        # (b) the mask over A flips the label, but its second round disagrees: majority, and
        #     no certificate.
        ("majority", lambda a, b, c: int(a and not b), 0, False),
        # (c) only the masks over A see the right label and all their two-mask predictions
        #     agree: round 2 recovers the minority label.
        ("disagreer", lambda a, b, c: 2 * int(a), 2, False),
        # one-mask predictions all agree, a pair of masks does not: not certified.
        ("agreed", lambda a, b, c: int(a and b), 0, False),
        ("agreed", lambda a, b, c: int(b and c), 0, False),
    ],
)
def test_double_masking_cases(case, rule, label, certified):
    defense, x = _cleanser(rule), _images(2)
    assert defense.describe(12, 12)["mask_px"] == [6, 6]
    lazy = defense(x)
    full = defense(x, certify=True)
    assert lazy.certified is None
    assert lazy.prediction.tolist() == [label, label]
    assert full.prediction.tolist() == [label, label]
    assert full.certified is not None
    assert full.certified.tolist() == [certified] * 2
    masks = defense.masks(12, 12)
    idx = torch.arange(len(masks))
    one = defense.masked_predictions(x[:1], masks, idx, idx)[0].tolist()

    def rows(ask):
        first = torch.tensor(ask).repeat_interleave(len(masks))
        got = defense.masked_predictions(x[:1], masks, first, idx.repeat(len(ask)))
        return got.view(len(ask), -1).tolist()

    assert double_masking(one, rows) == (label, case)


def test_round_two_returns_the_first_disagreer_that_passes():
    one = [0, 0, 0, 1, 2, 3]
    table = {3: [1, 1, 0, 1, 1, 1], 4: [2] * 6, 5: [3] * 6}
    asked: list[int] = []

    def rows(ask):
        asked.extend(ask)
        return [table[i] for i in ask]

    assert double_masking(one, rows) == (2, "disagreer")
    assert asked == [3, 4]  # the third disagreer is never evaluated
    assert double_masking(one, rows, group=3) == (2, "disagreer")
    assert double_masking([1, 1, 0, 0], lambda ask: [[0, 1, 0, 1]] * len(ask)) == (0, "majority")


# ---------------------------------------------------------------------- shared contract


@pytest.mark.parametrize(
    ("name", "settings"),
    [("lgs", []), ("feature-mask", []), ("patchcleanser", ["k=2", "patch_size=0.05"])],
)
def test_defences_leave_the_victim_bit_identical_and_repeat(tiny_victim, name, settings):
    before = {k: v.clone() for k, v in tiny_victim.state_dict().items()}
    defense = build_defense(name, tiny_victim, settings)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    first = defense(x, certify=True)
    again = defense(x, certify=True)
    after = tiny_victim.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in tiny_victim.parameters())
    assert not tiny_victim.training
    assert torch.equal(first.prediction, again.prediction)
    assert (first.certified is not None) == DEFENSES.get(name).certifies


def test_registry_and_settings_are_validated():
    assert DEFENSES.names() == ["feature-mask", "lgs", "patchcleanser"]
    with pytest.raises(UnknownNameError, match="known: feature-mask, lgs, patchcleanser"):
        build_defense("jpeg", nn.Identity())
    for bad in (["threshold=nan"], ["k=0"], ["fill=grey"], ["window=true"], ["lambda=2"]):
        name = (
            "lgs" if bad[0].split("=")[0] in ("threshold", "window", "lambda") else "patchcleanser"
        )
        with pytest.raises(ConfigError):
            build_defense(name, nn.Identity(), bad)


def test_covering_fraction_holds_the_rotated_patch():
    t = PatchTransformConfig(size=0.1, scale_jitter=0.0, max_rotation=0.0)
    assert covering_fraction(t, 100, 100, 32) == pytest.approx(0.1 * (1 + 1 / 32) ** 2, rel=1e-6)
    turned = PatchTransformConfig(size=0.1, scale_jitter=0.2, max_rotation=45)
    assert covering_fraction(turned, 100, 100, 32) == pytest.approx(
        0.12 * 2 * (1 + 1 / 32) ** 2, rel=1e-6
    )


# ---------------------------------------------------------------------- evaluation


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def test_evaluation_reads_only_the_test_split_and_shares_the_attack_placements():
    torch.manual_seed(0)
    names = ["a", "b", "c"]
    victim = Victim(
        model=nn.Sequential(nn.Flatten(), nn.Linear(3 * 20 * 20, 3)),
        classnames=names,
        pixel_transform=_pixels,
    )
    log: list[str] = []
    splits = _splits(names, log)
    patch = PatchFile(
        patch=torch.rand(3, 8, 8), transform=PatchTransformConfig(size=0.1), classnames=names
    )
    cfg = RobustConfig(placements=2, grid=2, batch_size=2, seed=5)
    defense = build_defense("patchcleanser", victim, ["k=2", "patch_size=0.15"])
    report = evaluate_defense_on(victim, defense, splits, patch, cfg, progress=False)
    assert {entry.split(":")[0] for entry in log} == {"test"}
    attack = evaluate_patch_on(victim, patch, splits, cfg, progress=False)
    # Without the defence the numbers are exactly `attack eval`'s: the same placements.
    assert report.images == attack.images == 5
    assert report.clean_accuracy == attack.clean_accuracy
    assert report.patched_accuracy_random == attack.patched_accuracy_random
    assert report.patched_accuracy_worst == attack.patched_accuracy_worst
    assert report.certified_accuracy is not None
    assert report.certified_fraction is not None
    assert report.certified_accuracy <= min(report.certified_fraction, 1.0)
    assert report.certified_accuracy <= report.clean_accuracy_defended
    data = report.to_json()
    assert data["robust_gain_worst"] == pytest.approx(
        data["patched_accuracy_worst_defended"] - data["patched_accuracy_worst"]
    )


# ---------------------------------------------------------------------- CLI


def _invoke(args):
    from vprompt.cli import main

    return CliRunner().invoke(main, ["defend", "eval", *args])


@pytest.mark.parametrize(
    ("name", "setting", "words"),
    [
        ("jpeg", None, ["unknown defense 'jpeg'", "feature-mask, lgs, patchcleanser"]),
        ("lgs", "threshold=nan", ["threshold"]),
        ("patchcleanser", "k=1e999", ["k must be"]),
        ("patchcleanser", "fill=!!python/object/apply:os.system ['touch {tmp}/owned']", ["fill"]),
        ("lgs", "window", ["KEY=VALUE"]),
        ("feature-mask", "shell=1", ["unknown key", "patch_size"]),
    ],
)
def test_cli_bad_defence_or_setting_is_one_line(tiny_folder, tmp_path, name, setting, words):
    args = ["--defense", name, "--model", "clip:tiny", "--weights", "none",
            "--data", f"folder:{tiny_folder}", "--out", str(tmp_path / "o")]  # fmt: skip
    extra = ["--set", setting.replace("{tmp}", str(tmp_path))] if setting else []
    result = _invoke(args + extra)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("vprompt: error: "), result.output
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "owned").exists()
    assert not (tmp_path / "o" / "defend.json").exists()


def test_cli_reads_only_the_test_split(tv_tiny, tmp_path, monkeypatch):
    import vprompt.data.sources

    log: list[str] = []
    names = list(tv_tiny.source_classes[:3])
    monkeypatch.setattr(vprompt.data.sources, "load_data", lambda *a, **k: _splits(names, log))
    patch = save_patch(
        PatchFile(patch=torch.rand(3, 8, 8), transform=PatchTransformConfig(), classnames=names),
        tmp_path / "p.safetensors",
    )
    out = tmp_path / "out"
    result = _invoke(
        ["--defense", "lgs", "--patch", str(patch), "--model", "torchvision:tiny",
         "--weights", "none", "--data", "anything", "--placements", "1", "--grid", "2",
         "--out", str(out), "--device", "cpu", "--json"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert {entry.split(":")[0] for entry in log} == {"test"}
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["split"] == "test"
    assert report["images"] == 5
    assert report["settings"]["window_px"] == 4  # 15 px at 224 → 4 px at 64
    assert json.loads((out / "defend.json").read_text())["defense"] == "lgs"
    assert "| clean |" in (out / "defend.md").read_text()
    assert (out / "defend.png").stat().st_size > 0


def test_defend_eval_end_to_end(run_cli, tiny_folder, tmp_path):
    """PatchCleanser against zero-shot clip:tiny through the real command: certified numbers,
    and a patch_size taken from the patch's placements."""
    classes = ["blue_thing", "green_thing", "red_thing"]  # folder order
    patch = save_patch(
        PatchFile(
            patch=torch.rand(3, 6, 6),
            transform=PatchTransformConfig(size=0.05),
            classnames=classes,
            victim={"model": "clip:tiny", "weights": "none"},
        ),
        tmp_path / "p.safetensors",
    )
    out = tmp_path / "eval"
    result = run_cli(
        "defend", "eval", "--defense", "patchcleanser", "--patch", patch, "--data",
        f"folder:{tiny_folder}", "--set", "k=2", "--placements", "1", "--grid", "2",
        "--out", out, "--device", "cpu", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 6
    assert report["victim"]["model"] == "clip:tiny"
    for key in ("clean_accuracy_defended", "certified_fraction", "certified_accuracy",
                "patched_accuracy_random_defended", "patched_accuracy_worst_defended"):  # fmt: skip
        assert 0 <= report[key] <= 1, key
    assert report["settings"]["masks"] == 4
    assert report["settings"]["patch_size"] == pytest.approx(
        covering_fraction(PatchTransformConfig(size=0.05), 32, 32, 6)
    )
    assert "patch_size=" in report["notes"][0]
    assert {p.name for p in out.iterdir()} >= {"defend.json", "defend.md", "defend.png"}
