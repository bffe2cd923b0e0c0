"""TPT against its reference (azshue/TPT tpt_classification.py), written from the paper in the
test: confidence selection, the averaged entropy, one AdamW step, the reset between images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vl_reference as ref
from vprompt.engine.experiment import Experiment
from vprompt.engine.pack import save_pack
from vprompt.errors import ConfigError
from vprompt.methods.coop import CoOp, CoOpConfig
from vprompt.methods.tpt import TPT, TPTConfig, TPTViews, average_entropy, select_confident

CLASSES = ["cat", "golden_retriever", "moth"]


def _photo(seed: int, size=(40, 48)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def reference_select(logits: torch.Tensor, top: float):
    """``select_confident_samples``."""
    batch_entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    idx = torch.argsort(batch_entropy, descending=False)[: int(batch_entropy.size()[0] * top)]
    return logits[idx], idx


def reference_avg_entropy(outputs: torch.Tensor) -> torch.Tensor:
    """``avg_entropy``."""
    logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    avg_logits = logits.logsumexp(dim=0) - np.log(logits.shape[0])
    avg_logits = torch.clamp(avg_logits, min=torch.finfo(avg_logits.dtype).min)
    return -(avg_logits * torch.exp(avg_logits)).sum(dim=-1)


def test_selection_and_averaged_entropy_equal_the_reference() -> None:
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 3
    _, want = reference_select(logits, 0.1)
    assert torch.equal(select_confident(logits, 0.1), want)
    assert len(want) == 6
    torch.testing.assert_close(average_entropy(logits[want]), reference_avg_entropy(logits[want]))
    # The entropy of the mean prediction, not the mean of the entropies.
    probs = logits[want].softmax(1).mean(0)
    torch.testing.assert_close(average_entropy(logits[want]), -(probs * probs.log()).sum())


def test_one_image_is_tuned_and_predicted_as_the_reference_does(tiny_clip) -> None:
    method = TPT(tiny_clip, CLASSES, TPTConfig(views=15, selection=0.25))
    views = method.input_transform(False)(_photo(1))
    assert views.shape == (16, 3, 32, 32)
    with torch.no_grad():
        got = method(views[None]).logits
    # The reference: reset, one AdamW step on the averaged entropy of the confident views
    # (whole 77-token prompts), then predict the original view.
    model = tiny_clip.model
    ctx = tiny_clip.embed_tokens(tiny_clip.tokenize(["a photo of a"]))[0, 1:5].detach().clone()
    ctx.requires_grad_(True)
    optimizer = torch.optim.AdamW([ctx], 5e-3)
    with torch.no_grad():
        image = model.encode_image(views)
        image = image / image.norm(dim=-1, keepdim=True)
    text = ref.text_features(model, tiny_clip._tokenizer, CLASSES, ctx, [], "a photo of a")
    output, _ = reference_select(model.logit_scale.exp() * image @ text.t(), 0.25)
    loss = reference_avg_entropy(output)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        text = ref.text_features(model, tiny_clip._tokenizer, CLASSES, ctx, [], "a photo of a")
        want = model.logit_scale.exp() * image[:1] @ text.t()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    with torch.no_grad():  # tuning changed the prediction
        assert not torch.allclose(method(views[:1]).logits, want, atol=1e-6)


def test_every_image_starts_from_the_same_context(tiny_clip) -> None:
    method = TPT(tiny_clip, CLASSES, TPTConfig(views=7, selection=0.5, steps=2))
    transform = method.input_transform(False)
    a, b = transform(_photo(2)), transform(_photo(3))
    start = method.ctx.detach().clone()
    with torch.no_grad():
        together = method(torch.stack([a, b])).logits
        alone = method(b[None]).logits
    assert torch.equal(together[1:], alone)  # image 2 does not depend on image 1
    assert torch.equal(method.ctx.detach(), start)  # the test-time updates never stay


def test_views_are_seeded_by_the_image_and_the_seed(tiny_clip) -> None:
    photo = _photo(4, size=(60, 30))
    views = TPTViews(tiny_clip, 5, augmix=True, seed=0)
    first, again = views(photo), views(photo.copy())
    assert torch.equal(first, again)
    assert torch.equal(first[0], tiny_clip.transform(photo))  # the original, preprocessed
    assert not torch.equal(first[1], first[2])
    assert not torch.equal(TPTViews(tiny_clip, 5, augmix=True, seed=1)(photo), first)
    plain = TPTViews(tiny_clip, 5, augmix=False, seed=0)(photo)
    assert not torch.equal(plain[1:], first[1:])  # AugMix changes the crops
    assert plain.shape == first.shape == (6, 3, 32, 32)


def test_starts_from_a_coop_pack(tiny_clip, tmp_path) -> None:
    torch.manual_seed(0)
    coop = CoOp(tiny_clip, ["ant", "bee"], CoOpConfig(n_ctx=3))
    pack = save_pack(coop, tmp_path / "coop.safetensors")
    method = TPT(tiny_clip, CLASSES, TPTConfig(init_pack=str(pack)))
    assert torch.equal(method.ctx.detach(), coop.ctx.detach())
    csc = CoOp(tiny_clip, CLASSES, CoOpConfig(n_ctx=2, class_specific=True))
    csc_pack = str(save_pack(csc, tmp_path / "csc.safetensors"))
    with pytest.raises(ConfigError, match="no shared text context"):
        TPT(tiny_clip, CLASSES, TPTConfig(init_pack=csc_pack))
    from vprompt import load_backbone

    other = load_backbone("clip:tiny", "none")
    with torch.no_grad():
        other.model.logit_scale.add_(1.0)
    with pytest.raises(ConfigError, match="not on these clip:tiny weights"):
        TPT(other, CLASSES, TPTConfig(init_pack=str(pack)))


def test_reference_settings_and_validation() -> None:
    assert Experiment("tpt").config(dataset="imagenet_a")[0].augmix is False
    assert Experiment("tpt").config(dataset="dtd")[0].augmix is True
    for bad, message in (
        ({"selection": 0.0}, "selection must be in"),
        ({"views": 10**9}, "views must be an integer"),
        ({"lr": -1.0}, "lr"),
    ):
        with pytest.raises(ConfigError, match=message):
            TPTConfig(**bad)


def test_eval_runs_tpt_through_the_cli(tiny_folder, tiny_clip, run_cli, tmp_path) -> None:
    from conftest import FOLDER_CLASSES

    res = run_cli("eval", "--method", "tpt", "--model", "clip:tiny", "--weights", "none",
                  "--data", f"folder:{tiny_folder}", "--set", "views=3", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["method"] == "tpt"
    assert report["images"] == 6
    torch.manual_seed(0)
    coop = CoOp(tiny_clip, list(FOLDER_CLASSES), CoOpConfig(n_ctx=2))
    pack = save_pack(coop, tmp_path / "coop.safetensors")
    res = run_cli("eval", "--method", "tpt", "--pack", pack, "--data", f"folder:{tiny_folder}",
                  "--set", "views=3", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    refused = run_cli("eval", "--method", "coop", "--model", "clip:tiny", "--weights", "none",
                      "--data", f"folder:{tiny_folder}")  # fmt: skip
    assert refused.returncode != 0
    assert "coop learns from training data" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_cross_dataset_protocol_runs_tpt_on_every_target(run_cli, tmp_path) -> None:
    from vprompt.data.suite.synthetic import write_fake_dataset

    root = tmp_path / "suite"
    write_fake_dataset("imagenet", root, num_classes=2, images_per_class=(1, 1, 1))
    write_fake_dataset("dtd", root, num_classes=2, images_per_class=(1, 1, 2))
    res = run_cli("protocol", "cross-dataset", "--method", "tpt", "--model", "clip:tiny",
                  "--weights", "none", "--data-root", root, "--datasets", "dtd",
                  "--set", "views=3", "--out", tmp_path / "xd", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    job = tmp_path / "xd" / "jobs" / "imagenet" / "shots_0" / "seed_1"  # learns no shots
    record = json.loads((job / "result.json").read_text())
    assert set(record["metrics"]["targets"]) == {"dtd"}
    assert "| Method | Source | DTD | Average |" in (tmp_path / "xd" / "table.md").read_text()


def test_domain_gen_protocol_runs_tpt_on_the_imagenet_variants(tiny_clip, tmp_path) -> None:
    """domain-gen through the protocol runner's library API: one job (TPT learns no shots), its
    prompt tuned per image on every ImageNet variant, each score that of TPT built for ImageNet
    (its reference settings: no AugMix) and retargeted to the variant's classes."""
    from vprompt.data.suite.synthetic import write_fake_dataset
    from vprompt.data.tasks import load_suite_task
    from vprompt.engine import evaluate
    from vprompt.engine.protocol import DOMAIN_TARGETS, ProtocolRun, plan_jobs, run_protocol

    root = tmp_path / "suite"
    write_fake_dataset("imagenet", root, num_classes=4, images_per_class=(1, 0, 1))
    for name in DOMAIN_TARGETS:
        write_fake_dataset(name, root, num_classes=4, images_per_class=(0, 0, 2))
    (job,) = plan_jobs("domain-gen", method="tpt", seeds=[1])
    assert (job.dataset, job.shots, job.targets) == ("imagenet", None, DOMAIN_TARGETS)
    run = ProtocolRun("domain-gen", "tpt", "clip:tiny", root, tmp_path / "dg", weights="none",
                      overrides=("views=3",), progress=False)  # fmt: skip
    summary = run_protocol(run, [job])
    (record,) = summary["records"]
    assert record["job"]["shots"] is None
    targets = record["metrics"]["targets"]
    assert set(targets) == set(DOMAIN_TARGETS)
    source = Experiment("tpt", overrides=("views=3",)).build(
        tiny_clip, load_suite_task("imagenet", root).classnames, dataset="imagenet"
    )
    assert source.config.augmix is False
    for name in DOMAIN_TARGETS:
        task = load_suite_task(name, root)
        moved = source.retarget(task.classnames)
        assert targets[name] == evaluate(moved, task.test, progress=False).accuracy
    assert "ImageNet-Sketch" in (tmp_path / "dg" / "table.md").read_text()


def test_a_retargeted_tpt_follows_its_target_datasets_augmix(tiny_clip, tmp_path) -> None:
    """The reference picks AugMix by the *test* set: TPT built on ImageNet (no AugMix) and moved
    to DTD by the cross-dataset protocol AugMixes there, unless the user set ``augmix``."""
    from vprompt.engine.protocol import ProtocolRun, _Runner

    def runner(*overrides: str) -> _Runner:
        run = ProtocolRun("cross-dataset", "tpt", "clip:tiny", tmp_path, tmp_path / "x",
                          weights="none", overrides=overrides, progress=False)  # fmt: skip
        return _Runner(run)

    plain = runner("views=3")
    assert plain.target_settings("dtd") == {"augmix": True}
    assert plain.target_settings("imagenet_sketch") == {"augmix": False}
    assert runner("augmix=false").target_settings("dtd") == {"augmix": False}
    source = Experiment("tpt", overrides=("views=3",)).build(
        tiny_clip, ["a", "b"], dataset="imagenet"
    )
    assert source.config.augmix is False
    moved = source.retarget(["c", "d"], settings=plain.target_settings("dtd"))
    assert moved.config.augmix is True
    assert moved.config.views == 3  # everything else stays the source's
    with pytest.raises(ConfigError, match="keeps"):
        source.retarget(["c"], settings={"views": 5})
