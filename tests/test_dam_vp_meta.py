"""DAM-VP's meta-prompt: Reptile over several datasets, active-neuron read-out, the
multi-dataset run (``--data A --data B``) and ``dam-vp`` starting from the meta pack."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import vprompt
from vprompt.data.union import DatasetUnion
from vprompt.engine.experiment import run
from vprompt.engine.pack import load_pack
from vprompt.errors import ConfigError, DatasetError
from vprompt.methods.base import DataTask
from vprompt.methods.config import apply_overrides
from vprompt.methods.dam_vp import DamVP, DamVPConfig
from vprompt.methods.dam_vp_meta import DamVPMeta, DamVPMetaConfig, inner_lr, reptile_update
from vprompt.methods.feature_clusters import active_neurons


@pytest.fixture(scope="module")
def tiny_cnn():
    return vprompt.load_backbone("torchvision:tiny", "none")


class TaskData:
    """``MethodData`` over several tasks of ready-made (normalised) image tensors."""

    views = 0
    has_val = False

    def __init__(self, parts: list[tuple[str, list[str], torch.Tensor, torch.Tensor]]) -> None:
        self.parts, offset = [], 0
        for name, classes, x, y in parts:
            self.parts.append((DataTask(name, tuple(classes), offset, len(x)), x, y + offset))
            offset += len(classes)

    @property
    def tasks(self):
        return tuple(t for t, _, _ in self.parts)

    def train(self, view=None, *, task=None):
        for _, x, y in self.parts if task is None else [self.parts[task]]:
            yield x, y

    def shuffled(self, generator, *, task=None, batch_size=None):
        _, x, y = self.parts[task]
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            yield x[order[i : i + batch_size]], y[order[i : i + batch_size]]

    def val(self):
        raise ConfigError("no validation data")


def make_method(backbone, classes, **overrides) -> DamVPMeta:
    base = {"canvas_size": 16, "pad_width": 3, "active_samples": 32, "optim.batch_size": 4}
    base |= overrides
    config = apply_overrides(DamVPMetaConfig(), [f"{k}={v}" for k, v in base.items()])
    torch.manual_seed(0)
    return DamVPMeta(backbone, classes, config)


def two_tasks(n: int = 8):
    gen = torch.Generator().manual_seed(3)
    xa, xb = torch.randn(n, 3, 16, 16, generator=gen), torch.randn(n, 3, 16, 16, generator=gen)
    ya, yb = torch.arange(n) % 2, torch.arange(n) % 3
    return TaskData([("a", ["a0", "a1"], xa, ya), ("b", ["b0", "b1", "b2"], xb, yb)])


# ---------------------------------------------------------------------------- the formulas
def test_reptile_update_moves_towards_the_mean_of_all_fast_copies():
    theta = torch.ones(1, 1, 2, 2)
    fast = [torch.tensor([2.0, 4.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2), torch.zeros(1, 1, 2, 2)]
    # Σₜ (K_t θ − Σₖ φ) / Σ K = ((2 − 6) + (1 − 0)) / 3 = −1; θ − 0.5 · (−1) = 1.5
    assert torch.equal(reptile_update(theta, fast, 0.5), torch.full((1, 1, 2, 2), 1.5))
    # one copy per task (diversity-unaware): the plain mean of θ − φ
    plain = reptile_update(theta, [torch.full((1, 1, 2, 2), 3.0), torch.zeros(1, 1, 2, 2)], 1.0)
    assert torch.equal(plain, torch.full((1, 1, 2, 2), 1.5))


def test_inner_lr_is_the_references_cosine_from_the_first_step():
    assert inner_lr(1.0, 0, 10) == 1.0
    assert inner_lr(0.5, 10, 10) == pytest.approx(0.0, abs=1e-12)
    assert inner_lr(1.0, 1, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_active_neurons_rank_by_population_std_over_seeded_noise():
    weights = torch.tensor([[0.0, 3.0, 1.0, 2.0]])

    def features(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3), keepdim=False)[:, None] * weights

    order = active_neurons(features, 4, samples=50, seed=1, device=torch.device("cpu"))
    assert order.tolist() == [1, 3, 2, 0]
    noise = torch.randn(50, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    spread = features(noise).std(dim=0, unbiased=False)
    assert torch.equal(order, spread.argsort(descending=True, stable=True))


# ---------------------------------------------------------------------------- against the paper
class PadPrompter(nn.Module):
    """The reference's pad prompter: four learned pads around a zero centre."""

    def __init__(self, theta: torch.Tensor, pad: int) -> None:
        super().__init__()
        size = theta.shape[-1]
        self.pad, self.size = pad, size
        self.up = nn.Parameter(theta[:, :, :pad].clone())
        self.down = nn.Parameter(theta[:, :, size - pad :].clone())
        self.left = nn.Parameter(theta[:, :, pad : size - pad, :pad].clone())
        self.right = nn.Parameter(theta[:, :, pad : size - pad, size - pad :].clone())

    def full(self) -> torch.Tensor:
        base = torch.zeros(1, 3, self.size - 2 * self.pad, self.size - 2 * self.pad)
        middle = torch.cat([self.left, base, self.right], dim=3)
        return torch.cat([self.up, middle, self.down], dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.full()


def reference_meta_step(method, theta, batches, protos, lr, inner_steps, step_size):
    """One step of the reference's ``Meta.forward`` (head-freezing): per task, one deep copy of
    the prompter per cluster, one Adam over all of them, each image prompted by its cluster's
    copy, the loss on the active neurons; then ``computer_diff`` / ``computer_meta_weight``."""
    meta = PadPrompter(theta, method.config.pad_width)
    backbone = method.backbone
    diffs, total_k = [], 0
    for (x, y, offset, span), proto in zip(batches, protos, strict=True):
        copies = [copy.deepcopy(meta) for _ in range(len(proto))]
        opt = torch.optim.Adam([{"params": c.parameters()} for c in copies], lr=lr)
        index = method.readout_index[span[0] : span[1]]
        for _ in range(inner_steps):
            with torch.no_grad():
                rep = backbone.features(x).float()
                dist = torch.sqrt(
                    (rep**2).sum(-1, keepdim=True)
                    + (proto**2).sum(-1, keepdim=True).T
                    - 2 * rep @ proto.T
                )
                chosen = dist.argmin(-1)
            prompted = torch.cat([copies[int(k)](x[i : i + 1]) for i, k in enumerate(chosen)])
            loss = F.cross_entropy(backbone.features(prompted).float()[:, index], y - offset)
            opt.zero_grad()
            loss.backward()
            opt.step()
        diffs.append(len(copies) * meta.full().detach() - sum(c.full().detach() for c in copies))
        total_k += len(copies)
    return meta.full().detach() - step_size * sum(diffs) / total_k


def test_one_meta_step_matches_the_reference_loop(tiny_cnn):
    data = two_tasks()
    method = make_method(tiny_cnn, ["a: a0", "a: a1", "b: b0", "b: b1", "b: b2"])
    method._set_readouts(data.tasks)
    gen = torch.Generator().manual_seed(5)
    protos = [tiny_cnn.features(x[:3]).float() + 0.01 * torch.randn(3, 1, generator=gen)
              for _, x, _ in data.parts]  # fmt: skip
    batches = [(x, y) for _, x, y in data.parts]
    theta = method.prompts.detach().clone()
    ours, _ = method._meta_step(theta, batches, data.tasks, protos, 0.3, torch.device("cpu"))
    spans = method._task_spans
    shaped = [
        (x, y, t.offset, s) for (_, x, y), t, s in zip(data.parts, data.tasks, spans, strict=True)
    ]
    expected = reference_meta_step(method, theta, shaped, protos, 0.3, 4, 0.5)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours, theta)
    assert torch.equal(ours * (1 - method.mask), torch.zeros_like(ours))  # only the frame moves


def test_readouts_pick_each_tasks_most_active_neurons_in_index_order(tiny_cnn):
    data = two_tasks()
    method = make_method(tiny_cnn, ["a: a0", "a: a1", "b: b0", "b: b1", "b: b2"])
    method._set_readouts(data.tasks)
    order = active_neurons(tiny_cnn.features, 16, samples=32, seed=0, device=torch.device("cpu"))
    assert method.readout_index[:2].tolist() == sorted(order[:2].tolist())
    assert method.readout_index[2:].tolist() == sorted(order[:3].tolist())
    x = torch.randn(2, 3, 16, 16)
    logits = method(x).logits
    feats = tiny_cnn.features(x + method.mask * method.prompts).float()
    torch.testing.assert_close(logits, feats[:, method.readout_index])


def test_setup_runs_the_meta_steps_and_keeps_the_best_loss(tiny_cnn):
    data = two_tasks()
    classes = ["a: a0", "a: a1", "b: b0", "b: b1", "b: b2"]
    kept = {}
    for keep in ("best-loss", "last"):
        method = make_method(tiny_cnn, classes, keep=keep, **{"optim.epochs": 3})
        torch.manual_seed(1)
        method.setup(data)
        notes = method.pack_notes()
        losses = notes["meta_losses"]
        assert len(losses) == 3 * 2  # 3 epochs x min(8/4, 8/4) steps
        want = min(range(len(losses)), key=losses.__getitem__) if keep == "best-loss" else 5
        assert notes["kept_step"] == want + 1
        kept[keep] = method.prompts.detach().clone()
    assert not torch.equal(kept["best-loss"], torch.zeros_like(kept["last"]))


def test_clip_readout_uses_each_tasks_class_prompts(tiny_clip):
    from vprompt.methods.zeroshot import encode_class_prompts

    data = two_tasks()
    data.parts = [(t, F.interpolate(x, size=32), y) for t, x, y in data.parts]
    classes = ["a: a0", "a: a1", "b: b0", "b: b1", "b: b2"]
    method = make_method(tiny_clip, classes, canvas_size="null", pad_width="null")
    assert method.config.readout == "text"
    assert method.config.canvas_size == 32
    method._set_readouts(data.tasks)
    text = encode_class_prompts(
        tiny_clip, [["a photo of a b0"], ["a photo of a b1"], ["a photo of a b2"]]
    )
    torch.testing.assert_close(method.class_embeddings[2:], text)


def test_config_and_backbone_checks(tiny_cnn, tiny_clip):
    for bad in ("inner_steps=0", "meta_step_size=0", "meta_step_size=1.5", "keep=best",
                "readout=linear", "active_samples=1", "optim.optimizer=sgd",
                "optim.warmup_epochs=1"):  # fmt: skip
        with pytest.raises(ConfigError):
            apply_overrides(DamVPMetaConfig(), [bad])
    with pytest.raises(ConfigError, match="readout=text"):
        make_method(tiny_cnn, ["x"], readout="text")
    with pytest.raises(ConfigError, match="readout=active"):
        make_method(tiny_clip, ["x"], readout="active")


# ---------------------------------------------------------------------------- several datasets
def test_union_offsets_labels_names_and_identities(tiny_folder):
    from vprompt.data.sources import load_data

    part = load_data(f"folder:{tiny_folder}").train
    union = DatasetUnion([("one", part), ("two", part)])
    c = len(part.classnames)
    assert union.classnames[:c] == [f"one: {n}" for n in part.classnames]
    assert union.classnames[c:] == [f"two: {n}" for n in part.classnames]
    assert len(union) == 2 * len(part)
    labels = union.all_labels()
    assert labels[len(part) :] == [y + c for y in labels[: len(part)]]
    assert union[len(part)][1] == part[0][1] + c
    assert isinstance(union[0][0], Image.Image)
    assert union.identity(0) != union.identity(len(part))
    with pytest.raises(DatasetError, match="given twice"):
        DatasetUnion([("one", part), ("one", part)])


def test_meta_training_across_two_folders_then_dam_vp_starts_from_it(
    tiny_folder, tmp_path, run_cli
):
    common = dict(model="torchvision:tiny", weights="none", progress=False, device="cpu")
    sets = ["canvas_size=32", "active_samples=16", "optim.epochs=1", "optim.batch_size=4",
            "distance_threshold=1e-6", "max_clusters=2", "inner_steps=1"]  # fmt: skip
    data = [f"folder:{tiny_folder}", f"folder:{tiny_folder / 'train'}"]
    res = run_cli("train", "--method", "dam-vp-meta", "--model", "torchvision:tiny",
                  "--weights", "none", "--data", data[0], "--data", data[1],
                  "--out", tmp_path / "m1", "--json",
                  *[a for o in sets for a in ("--set", o)])  # fmt: skip
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["data"] == data
    assert summary["test_images"] > 0
    refused = run_cli("train", "--method", "visual-prompt", "--model", "torchvision:tiny",
                      "--weights", "none", "--data", data[0], "--data", data[1],
                      "--out", tmp_path / "vp")  # fmt: skip
    assert refused.returncode != 0
    assert "Traceback" not in refused.stderr
    assert "visual-prompt trains on one dataset (one --data)" in refused.stderr
    with pytest.raises(ConfigError, match="given twice"):
        run(
            "dam-vp-meta", data=[data[0], data[0]], out_dir=tmp_path / "x", overrides=sets, **common
        )

    again = run("dam-vp-meta", data=data, out_dir=tmp_path / "m2", overrides=sets, seed=0, **common)
    other = run("dam-vp-meta", data=data, out_dir=tmp_path / "m3", overrides=sets, seed=1, **common)
    packs = [load_pack(p) for p in (summary["pack"], again.fit.pack_path, other.fit.pack_path)]
    assert torch.equal(packs[0].tensors["prompts"], packs[1].tensors["prompts"])  # CLI = API
    assert not torch.equal(packs[0].tensors["prompts"], packs[2].tensors["prompts"])
    assert packs[0].classnames[0].startswith(f"folder:{tiny_folder}: ")
    assert len(packs[0].classnames) == 6  # both folders' three classes
    # 1 epoch x 3 steps: the smaller dataset (the 80/20 split: 9 images) has 3 batches of 4
    assert len(packs[0].extra["meta_losses"]) == 3

    backbone = vprompt.load_backbone("torchvision:tiny", "none")
    config = DamVPConfig(canvas_size=32, mapping="linear", meta_prompt=summary["pack"])
    dam = DamVP(backbone, ["x", "y"], config)
    assert torch.equal(dam._meta_prompt(), packs[0].tensors["prompts"] * dam.mask)


def test_dam_vp_active_readout_adapts_with_the_same_neurons(tiny_cnn):
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.arange(8) % 3
    data = TaskData([("t", ["p", "q", "r"], x, y)])
    config = DamVPConfig(canvas_size=16, pad_width=3, mapping="active", active_samples=32,
                         distance_threshold=1e-6, max_clusters=2)  # fmt: skip
    dam = DamVP(tiny_cnn, ["p", "q", "r"], config)
    assert dam.trainable_parameters() == [dam.prompts]  # no head: the read-out is fixed
    dam.setup(data)
    order = active_neurons(tiny_cnn.features, 16, samples=32, seed=0, device=torch.device("cpu"))
    assert dam.readout_index.tolist() == sorted(order[:3].tolist())
    routed = dam.apply_prompts(x, dam.route(x))
    expected = tiny_cnn.features(routed).float()[:, dam.readout_index]
    torch.testing.assert_close(dam(x).logits, expected)
    with pytest.raises(ConfigError, match="mapping=text"):
        DamVP(vprompt.load_backbone("clip:tiny", "none"), ["p"], config)
