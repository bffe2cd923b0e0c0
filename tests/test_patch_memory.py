"""patch-memory (PatchCore) against from-the-reference computations, and its own edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from vprompt.anomaly import build_anomaly_method
from vprompt.anomaly.patch_features import aggregate_maps, greedy_coreset, nearest_distances
from vprompt.backbones import load_backbone
from vprompt.backbones.dense import default_layers, dense_features
from vprompt.errors import ConfigError

SMALL = ["pretrain_dim=12", "target_dim=8", "image_size=64", "resize=72"]


def _pool_1d(vec: torch.Tensor, out: int) -> torch.Tensor:
    """adaptive_avg_pool1d by its definition: bin i averages
    [floor(i n / out), ceil((i + 1) n / out))."""
    n = vec.shape[-1]
    return torch.stack(
        [vec[..., (i * n) // out : -(-((i + 1) * n) // out)].mean(-1) for i in range(out)], -1
    )


def test_aggregation_matches_the_reference_computation_cell_by_cell():
    """Each cell: its zero-padded 3 x 3 neighbourhood per layer (channel-major), deeper layers'
    neighbourhood vectors resized bilinearly onto the first grid, pooled per layer, then
    pooled again over the concatenation (PatchCore's PatchMaker + MeanMapper + Aggregator)."""
    gen = torch.Generator().manual_seed(0)
    fine = torch.randn(2, 3, 4, 4, generator=gen)
    coarse = torch.randn(2, 5, 2, 2, generator=gen)
    got = aggregate_maps([fine, coarse], patch_size=3, pretrain_dim=7, target_dim=6)
    assert got.shape == (2, 4, 4, 6)

    def neighbourhoods(m):  # B x C x h x w → B x h x w x C x 3 x 3
        padded = F.pad(m, (1, 1, 1, 1))
        h, w = m.shape[-2:]
        out = torch.zeros(m.shape[0], h, w, m.shape[1], 3, 3)
        for y in range(h):
            for x in range(w):
                out[:, y, x] = padded[:, :, y : y + 3, x : x + 3]
        return out

    nf = neighbourhoods(fine).reshape(2, 4, 4, -1)
    nc = neighbourhoods(coarse)  # 2 x 2 x 2 x 5 x 3 x 3
    # every neighbourhood element is an image over the coarse grid, resized to the fine one
    flat = nc.permute(0, 3, 4, 5, 1, 2).reshape(2, 45, 2, 2)
    up = F.interpolate(flat, size=(4, 4), mode="bilinear", align_corners=False)
    nc_up = up.reshape(2, 45, 4, 4).permute(0, 2, 3, 1)
    want = _pool_1d(torch.cat([_pool_1d(nf, 7), _pool_1d(nc_up, 7)], -1), 6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_coreset_matches_the_reference_greedy_loop():
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(60, 5, generator=gen)
    picked = greedy_coreset(
        feats, 9, generator=torch.Generator().manual_seed(7), start_points=4, projection_dim=5
    )
    # Reference: mean distance to the start rows, then repeatedly the farthest row.
    ref_gen = torch.Generator().manual_seed(7)
    starts = torch.randperm(60, generator=ref_gen)[:4]
    dist = torch.cdist(feats.double(), feats.double())
    nearest = dist[:, starts].mean(1)
    want = []
    for _ in range(9):
        j = int(nearest.argmax())
        want.append(j)
        nearest = torch.minimum(nearest, dist[:, j])
    assert picked.tolist() == want
    assert len(set(want)) == 9


def test_coreset_projects_wide_features_and_depends_on_the_seed():
    feats = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    a = greedy_coreset(feats, 20, generator=torch.Generator().manual_seed(1), projection_dim=16)
    b = greedy_coreset(feats, 20, generator=torch.Generator().manual_seed(1), projection_dim=16)
    c = greedy_coreset(feats, 20, generator=torch.Generator().manual_seed(2), projection_dim=16)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_nearest_distances_are_brute_force_squared_l2_even_in_chunks(monkeypatch):
    import vprompt.anomaly.patch_features as pf

    gen = torch.Generator().manual_seed(0)
    q, bank = torch.randn(37, 6, generator=gen), torch.randn(11, 6, generator=gen)
    monkeypatch.setattr(pf, "QUERY_CHUNK_ELEMENTS", 50)  # 4 queries per chunk
    got = nearest_distances(q, bank, k=2)
    want = torch.cdist(q.double(), bank.double()).pow(2).sort(dim=1).values[:, :2]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_scores_are_the_nearest_bank_distance_upsampled_and_smoothed():
    method = build_anomaly_method(
        "patch-memory", model="torchvision:tiny", weights="none", overrides=[*SMALL, "coreset=1"]
    )
    gen = torch.Generator().manual_seed(0)
    refs, test = torch.randn(2, 3, 64, 64, generator=gen), torch.randn(1, 3, 64, 64, generator=gen)
    method.fit_normal([refs])
    maps = dense_features(method.backbone, refs, method.layers)
    bank = aggregate_maps(maps, patch_size=3, pretrain_dim=12, target_dim=8).reshape(-1, 8)
    assert torch.equal(method.bank, bank)  # coreset=1 keeps every patch
    feats = aggregate_maps(
        dense_features(method.backbone, test, method.layers),
        patch_size=3,
        pretrain_dim=12,
        target_dim=8,
    )
    grid = (
        torch.cdist(feats.reshape(-1, 8).double(), bank.double())
        .min(1)
        .values.pow(2)
        .reshape(1, 8, 8)
    )
    out = method.score(test)
    assert float(out.image_scores[0]) == pytest.approx(float(grid.max()), rel=1e-4)
    up = F.interpolate(grid[:, None].float(), size=(64, 64), mode="bilinear", align_corners=False)[
        0, 0
    ]
    want = ndimage.gaussian_filter(up.numpy(), sigma=4)
    np.testing.assert_allclose(out.maps[0].numpy(), want, rtol=1e-4, atol=1e-6)


def test_memory_stays_bounded_for_many_references():
    method = build_anomaly_method(
        "patch-memory",
        model="torchvision:tiny",
        weights="none",
        overrides=[*SMALL, "max_rows=200", "coreset=0.25"],
    )
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 3, 64, 64, generator=gen) for _ in range(8)]  # 16 images x 64 cells
    method.fit_normal(iter(batches))
    assert method.peak_rows <= 200
    assert 0 < method.bank.shape[0] <= 0.25 * 200


def test_default_layers_are_the_stride_8_and_16_stages():
    assert default_layers(load_backbone("torchvision:resnet18", "none")) == ["layer2", "layer3"]
    mobilenet = load_backbone("torchvision:tiny", "none")  # MobileNetV2's layout
    assert default_layers(mobilenet) == ["features.6", "features.13"]
    maps = dense_features(mobilenet, torch.zeros(1, 3, 64, 64), ["features.6", "features.13"])
    assert [m.shape[-1] for m in maps] == [8, 4]


def test_a_vit_backbone_gives_patch_features_too():
    method = build_anomaly_method(
        "patch-memory",
        model="clip:tiny",
        weights="none",
        overrides=["pretrain_dim=16", "target_dim=8", "image_size=32", "resize=32"],
    )
    assert method.layers == ["block.0"]
    method.fit_normal([torch.randn(2, 3, 32, 32)])
    assert method.score(torch.randn(1, 3, 32, 32)).maps.shape == (1, 32, 32)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("patch_size=4", "odd"),
        ("coreset=0", "fraction"),
        ("resize=32", "resize"),
        ("layers=[nope]", "no module 'nope'"),
        ("sigma=-1", "sigma"),
    ],
)
def test_bad_settings_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        build_anomaly_method(
            "patch-memory", model="torchvision:tiny", weights="none", overrides=[override]
        )


def test_fitting_on_nothing_is_refused():
    method = build_anomaly_method(
        "patch-memory", model="torchvision:tiny", weights="none", overrides=SMALL
    )
    with pytest.raises(ConfigError, match="at least one"):
        method.fit_normal([])


def test_the_run_seed_drives_the_coreset_unless_set_explicitly():
    refs = [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))]

    def bank(seed, extra=()):
        m = build_anomaly_method(
            "patch-memory",
            model="torchvision:tiny",
            weights="none",
            overrides=[*SMALL, "coreset=0.2", *extra],
            seed=seed,
        )
        m.fit_normal(refs)
        return m.config.seed, m.bank

    (s1, a), (_, b), (_, c) = bank(1), bank(1), bank(2)
    assert s1 == 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert bank(2, ["seed=1"])[0] == 1  # --set seed= wins
