"""DAM-VP: diversity-adaptive clustering, prototype routing, per-cluster pad prompts."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vprompt
from conftest import FOLDER_CLASSES
from vprompt.engine.pack import build_from_pack, load_pack, save_pack
from vprompt.errors import ConfigError, PackError
from vprompt.methods.config import apply_overrides
from vprompt.methods.dam_vp import DamVP, DamVPConfig, average_linkage
from vprompt.methods.visual_prompt import VisualPrompt
from vprompt.methods.zeroshot import encode_class_prompts

CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def tiny_cnn():
    return vprompt.load_backbone("torchvision:tiny", "none")


class Data:
    """The ``MethodData`` a method's hooks see: plain training batches, in order."""

    views = 0
    has_val = False

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch: int = 4) -> None:
        self.images, self.labels, self.batch = images, labels, batch

    def train(self, view=None):
        for i in range(0, len(self.images), self.batch):
            yield self.images[i : i + self.batch], self.labels[i : i + self.batch]

    def val(self):
        raise ConfigError("no validation data")


def naive_average_linkage(x: np.ndarray, threshold: float, max_clusters: int = 10**6):
    """The textbook definition: merge the two clusters with the smallest mean distance between
    their members while it is below the threshold (or too many clusters remain)."""
    clusters = [[i] for i in range(len(x))]

    def dist(a, b):
        return np.mean([np.linalg.norm(x[i] - x[j]) for i in a for j in b])

    while len(clusters) > 1:
        best, ia, ib = min(
            (dist(a, b), ia, ib)
            for (ia, a), (ib, b) in itertools.combinations(enumerate(clusters), 2)
        )
        if best >= threshold and len(clusters) <= max_clusters:
            break
        clusters[ia] = clusters[ia] + clusters[ib]
        del clusters[ib]
    return sorted(sorted(c) for c in clusters)


def partition(labels: torch.Tensor) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(labels.tolist()):
        groups.setdefault(c, []).append(i)
    return sorted(groups.values())


def blobs(centres, per=4, spread=0.3, seed=0) -> np.ndarray:
    gen = np.random.default_rng(seed)
    return np.concatenate([np.asarray(c) + spread * gen.standard_normal((per, 2)) for c in centres])


# ---------------------------------------------------------------------------- clustering
@pytest.mark.parametrize("threshold", [0.2, 1.0, 3.0, 8.0, 12.0, 100.0])
def test_average_linkage_matches_the_definition(threshold):
    x = np.concatenate([blobs([(0, 0), (10, 0), (0, 10)]), blobs([(5, 5)], per=3, spread=2)])
    labels = average_linkage(torch.from_numpy(x), threshold)
    assert partition(labels) == naive_average_linkage(x, threshold)
    # Numbered by first member: cluster 0 holds image 0, new numbers appear in order.
    firsts = [labels.tolist().index(c) for c in range(int(labels.max()) + 1)]
    assert firsts == sorted(firsts)


def test_random_features_match_the_definition_and_max_clusters_forces_merges():
    x = np.random.default_rng(3).standard_normal((14, 5))
    for threshold, cap in ((2.0, 100), (3.0, 100), (2.0, 3), (0.1, 1)):
        got = partition(average_linkage(torch.from_numpy(x), threshold, cap))
        assert got == naive_average_linkage(x, threshold, cap)
    assert len(partition(average_linkage(torch.from_numpy(x), 0.1, 3))) == 3


def test_more_diverse_data_gives_more_clusters_at_one_threshold():
    tight = blobs([(0, 0)], per=12, spread=0.3)
    diverse = blobs([(0, 0), (9, 0), (0, 9), (9, 9)], per=3, spread=0.3)
    assert int(average_linkage(torch.from_numpy(tight), 3.0).max()) + 1 == 1
    assert partition(average_linkage(torch.from_numpy(diverse), 3.0)) == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7, 8],
        [9, 10, 11],
    ]


# ---------------------------------------------------------------------------- setup
def _images(n=10, side=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(3, 3, side, side, generator=gen)  # three "kinds" of image
    kinds = torch.arange(n) % 3
    return base[kinds] + 0.05 * torch.randn(n, 3, side, side, generator=gen), kinds


def test_setup_clusters_features_and_copies_the_meta_prompt(tiny_cnn):
    cfg = DamVPConfig(canvas_size=32, mapping="linear", threshold_ratio=0.7)
    torch.manual_seed(0)
    method = DamVP(tiny_cnn, CLASSES, cfg)
    start = method.prompts.detach().clone()  # 1 x 3 x 32 x 32, the method's own init
    images, labels = _images()
    method.setup(Data(images, labels))

    with torch.no_grad():
        feats = tiny_cnn.features(images).double()
    n = len(feats)
    mean = sum(float((feats[i] - feats[j]).norm()) for i in range(n) for j in range(n) if i != j)
    groups = naive_average_linkage(feats.numpy(), 0.7 * mean / (n * (n - 1)))
    assert len(groups) > 1
    firsts = sorted(groups, key=lambda g: g[0])
    expected = torch.stack([feats[g].mean(0) for g in firsts]).float()
    assert method.prototypes.shape == expected.shape
    assert torch.allclose(method.prototypes, expected, atol=1e-5)
    assert method.prompts.shape == (len(groups), 3, 32, 32)
    assert all(torch.equal(p, start[0]) for p in method.prompts.detach())
    frame = method.mask.bool().expand(3, -1, -1)
    assert torch.equal(method.prompts.detach()[:, ~frame], torch.zeros(len(groups), (~frame).sum()))
    assert method.config.pad_width == round(32 * 30 / 224)


def test_cluster_samples_draws_a_random_subset_in_dataset_order(tiny_cnn):
    cfg = DamVPConfig(canvas_size=32, distance_threshold=1e-12, cluster_samples=4)
    images, labels = _images(10)
    with torch.no_grad():
        feats = tiny_cnn.features(images)
    picked = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        method = DamVP(tiny_cnn, CLASSES, cfg)
        method.setup(Data(images, labels, batch=3))
        assert method.prototypes.shape[0] == 4  # one cluster per sampled image
        rows = [int((feats - p).abs().sum(1).argmin()) for p in method.prototypes]
        assert all(torch.equal(method.prototypes[i], feats[r]) for i, r in enumerate(rows))
        assert rows == sorted(set(rows))
        picked.append(rows)
    assert len({tuple(r) for r in picked}) > 1  # not always the first images


def test_diversity_unaware_keeps_one_prompt(tiny_cnn):
    method = DamVP(tiny_cnn, CLASSES, DamVPConfig(canvas_size=32, diversity_aware=False))
    images, labels = _images()
    method.setup(Data(images, labels))
    assert method.prompts.shape[0] == method.prototypes.shape[0] == 1
    assert torch.equal(method.route(images), torch.zeros(len(images), dtype=torch.long))


# ---------------------------------------------------------------------------- forward
def _with_clusters(backbone, k=3, mapping="random", canvas=32):
    torch.manual_seed(1)
    method = DamVP(backbone, CLASSES, DamVPConfig(canvas_size=canvas, mapping=mapping))
    dim = method.prototypes.shape[1]
    with torch.no_grad():
        method.prototypes.data = torch.randn(k, dim) * 3
        method.prompts.data = torch.randn(k, 3, canvas, canvas) * method.mask
    return method.eval()


def test_routing_picks_the_nearest_prototype(tiny_cnn):
    method = _with_clusters(tiny_cnn)
    images, _ = _images(8, seed=4)
    with torch.no_grad():
        feats = tiny_cnn.features(images)
    with torch.no_grad():  # one image of each kind: every cluster is used
        method.prototypes.data = feats[[0, 1, 2]].clone()
    expected = [int(np.argmin([float((f - p).norm()) for p in method.prototypes])) for f in feats]
    assert set(expected) == {0, 1, 2}
    assert method.route(images).tolist() == expected


def test_forward_applies_the_routed_cluster_prompt(tiny_cnn):
    method = _with_clusters(tiny_cnn)
    images, _ = _images(4, seed=5)
    with torch.no_grad():
        feats = tiny_cnn.features(images)
        method.prototypes.data = feats[[0, 1, 2]].clone()
        out = method(images).logits
        rows = []
        for i, x in enumerate(images):
            k = int(torch.cdist(feats[i : i + 1], method.prototypes).argmin())
            prompted = x + method.mask * method.prompts[k]  # frame added to the normalised image
            rows.append(method.mapping(tiny_cnn(prompted[None]))[0])
    assert len(set(method.route(images).tolist())) == 3  # every cluster's prompt is used
    assert torch.allclose(out, torch.stack(rows), rtol=1e-5, atol=1e-7)


def test_clip_clusters_on_zero_shot_logits_and_prompts_the_routed_image(tiny_clip):
    method = _with_clusters(tiny_clip, k=2, mapping="auto", canvas=tiny_clip.preprocess.size[0])
    side = method.config.canvas_size
    images = torch.randn(4, 3, side, side, generator=torch.Generator().manual_seed(2))
    text = encode_class_prompts(tiny_clip, [[f"a photo of a {c}"] for c in CLASSES])
    scale = tiny_clip.logit_scale.float()
    with torch.no_grad():
        zs = scale * F.normalize(tiny_clip.encode_image(images).float(), dim=-1) @ text.T
        assert torch.allclose(method.cluster_features(images), zs, atol=1e-5)
        method.prototypes.data = zs[[0, 1]].clone()
        out = method(images).logits
        rows = []
        for i, x in enumerate(images):
            k = int(torch.cdist(zs[i : i + 1], method.prototypes).argmin())
            feat = tiny_clip.encode_image((x + method.mask * method.prompts[k])[None]).float()
            rows.append(scale * F.normalize(feat, dim=-1)[0] @ text.T)
    assert torch.allclose(out, torch.stack(rows), atol=1e-4)


def test_each_image_trains_only_its_cluster_frame(tiny_cnn):
    method = _with_clusters(tiny_cnn)
    images, labels = _images(4, seed=6)
    with torch.no_grad():
        method.prototypes.data = tiny_cnn.features(images[[0, 1, 2]]).clone()
    routed = method.route(images[:2])
    method.train()
    F.cross_entropy(method(images[:2]).logits, labels[:2]).backward()
    grad = method.prompts.grad
    assert grad is not None
    for k in range(3):
        assert (grad[k].abs().sum() > 0) == (k in routed.tolist())
    assert torch.equal(grad[:, :, 10:20, 10:20], torch.zeros(3, 3, 10, 10))  # frame only


# ---------------------------------------------------------------------------- packs
def test_pack_round_trip_keeps_clusters_and_routing(tiny_cnn, tmp_path):
    method = DamVP(tiny_cnn, CLASSES, DamVPConfig(canvas_size=32, distance_threshold=1e-9))
    images, labels = _images(5)
    method.setup(Data(images, labels))
    assert method.prompts.shape[0] == 5  # a threshold below every distance: one per image
    with torch.no_grad():
        method.prompts.data = torch.randn_like(method.prompts) * method.mask
    method.eval()
    pack = load_pack(save_pack(method, tmp_path / "p.safetensors"))
    assert pack.tensors["prototypes"].shape == (5, tiny_cnn.feature_dim)
    rebuilt = build_from_pack(pack, backbone=tiny_cnn).eval()
    assert rebuilt.prompts.shape[0] == 5
    test, _ = _images(6, seed=9)
    assert torch.equal(rebuilt.route(test), method.route(test))
    with torch.no_grad():
        assert torch.equal(rebuilt(test).logits, method(test).logits)
    bad = dict(pack.tensors, prototypes=pack.tensors["prototypes"][:3])
    with pytest.raises(PackError, match="same number of rows"):
        rebuilt.load_prompt_state(bad)


def test_meta_prompt_initialises_every_cluster(tiny_cnn, tmp_path):
    source = _with_clusters(tiny_cnn, k=2)
    path = save_pack(source, tmp_path / "meta.safetensors")
    cfg = DamVPConfig(canvas_size=32, distance_threshold=1e-9, meta_prompt=str(path))
    method = DamVP(tiny_cnn, CLASSES, cfg)
    images, labels = _images(4)
    method.setup(Data(images, labels))
    expected = source.prompts.detach().mean(0)
    assert method.prompts.shape[0] == 4
    assert all(torch.allclose(p, expected) for p in method.prompts.detach())

    other = VisualPrompt(tiny_cnn, CLASSES, VisualPrompt.Config(canvas_size=32, inner_size=24))
    vp = save_pack(other, tmp_path / "vp.safetensors")
    refused = DamVP(tiny_cnn, CLASSES, DamVPConfig(canvas_size=32, meta_prompt=str(vp)))
    with pytest.raises(PackError, match="visual-prompt pack"):
        refused.setup(Data(images, labels))
    wrong = DamVP(tiny_cnn, CLASSES, DamVPConfig(canvas_size=40, meta_prompt=str(path)))
    with pytest.raises(PackError, match="expected K x 3 x 40 x 40"):
        wrong.setup(Data(images, labels))


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "override",
    [
        "canvas_size=0",
        "canvas_size=100000",
        "pad_width=-1",
        "distance_threshold=-1",
        "distance_threshold=0",
        "threshold_ratio=0",
        "threshold_ratio=abc",
        "cluster_samples=0",
        "cluster_samples=1000000000",
        "max_clusters=0",
        "max_clusters=1000000000",
        "prompt_init=ones",
        "mapping=bogus",
        "templates=[no placeholder]",
        "diversity_aware=3",
        "meta_prompt=7",
        "optim.warmup_epochs=60",
    ],
)
def test_config_validation(override):
    with pytest.raises(ConfigError):
        apply_overrides(DamVPConfig(), [override])


def test_backbone_dependent_settings_are_checked(tiny_cnn, tiny_clip):
    with pytest.raises(ConfigError, match="leaves no image"):
        DamVP(tiny_cnn, CLASSES, DamVPConfig(canvas_size=8, pad_width=4))
    with pytest.raises(ConfigError, match="mapping=text needs"):
        DamVP(tiny_cnn, CLASSES, DamVPConfig(canvas_size=32, mapping="text"))
    with pytest.raises(ConfigError, match="classifies through text"):
        DamVP(tiny_clip, CLASSES, DamVPConfig(mapping="frequency"))


# ---------------------------------------------------------------------------- CLI
def test_train_and_predict_through_the_cli(tiny_folder, run_cli, tmp_path):
    out = tmp_path / "dam"
    res = run_cli("train", "--method", "dam-vp", "--model", "torchvision:tiny", "--weights",
                  "none", "--data", f"folder:{tiny_folder}", "--out", out,
                  "--set", "optim.epochs=1", "--set", "optim.warmup_epochs=0",
                  "--set", "canvas_size=32", "--set", "distance_threshold=1e-9",
                  "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["test_images"] == 6
    pack = load_pack(out / "prompt.safetensors")
    assert pack.method == "dam-vp"
    assert pack.tensors["prompts"].shape == (12, 3, 32, 32)  # one cluster per training image
    assert pack.tensors["prototypes"].shape[0] == 12
    image = next((tiny_folder / "test" / "red_thing").glob("*.png"))
    pred = run_cli("predict", "--pack", out / "prompt.safetensors", image, "--json")
    assert pred.returncode == 0, pred.stderr
    labels = [p["label"] for p in json.loads(pred.stdout)["predictions"]]
    assert sorted(labels) == sorted(FOLDER_CLASSES)
