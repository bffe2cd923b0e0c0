"""fit / evaluate / checkpoints / schedule / reports, with a toy pixel prompt on ``clip:tiny``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vprompt import ConfigError, build_from_pack, load_pack
from vprompt.engine import EvalResult, FitEvent, FitResult, LRSchedule, evaluate, fit
from vprompt.errors import VPromptError
from vprompt.methods.base import (
    Capabilities,
    MethodData,
    MethodExample,
    MethodOutput,
    PromptMethod,
)
from vprompt.methods.config import OptimConfig
from vprompt.methods.registry import register_method
from vprompt.methods.zeroshot import encode_class_prompts

CLASSES = ["red", "blue"]
EPOCHS = 3


@dataclass(frozen=True)
class AdditiveConfig:
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(optimizer="adam", lr=0.1, epochs=EPOCHS, batch_size=8)
    )


@register_method("test-engine-additive")
class AdditivePrompt(PromptMethod):
    """A learned 3 x 32 x 32 pattern added to the (normalized) image; CLIP text head."""

    Config = AdditiveConfig
    capabilities = Capabilities(inputs="images")

    def __init__(
        self, backbone: Any, classnames: Sequence[str], config: AdditiveConfig | None = None
    ) -> None:
        super().__init__(backbone, classnames, config)
        self.prompt = nn.Parameter(torch.zeros(3, 32, 32))
        prompts = [[f"a photo of a {c}."] for c in self.classnames]
        self.register_buffer(
            "class_embeddings", encode_class_prompts(backbone, prompts), persistent=False
        )
        self.hook_calls: list[tuple[int, int]] = []
        self.after_calls: list[int] = []

    @classmethod
    def examples(cls) -> list[MethodExample]:
        return [MethodExample("clip:tiny")]

    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        from torchvision import transforms as T

        if train:
            return T.Compose([T.RandomHorizontalFlip(), self.backbone.transform])
        return self.backbone.transform

    def forward(self, images: torch.Tensor) -> MethodOutput:
        feats = F.normalize(self.backbone.encode_image(images + self.prompt).float(), dim=-1)
        logits = self.backbone.logit_scale.float() * feats @ self.class_embeddings.T
        return MethodOutput(logits=logits, aux_loss={"l2": 1e-3 * self.prompt.pow(2).mean()})

    def before_epoch(self, epoch: int, data: MethodData) -> None:
        self.hook_calls.append((epoch, sum(len(labels) for _, labels in data.train())))

    def after_epoch(self, epoch: int, data: MethodData) -> None:
        # Changes the prompt, so a checkpoint written before this hook would resume differently.
        assert not self.training
        self.after_calls.append(epoch)
        with torch.no_grad():
            self.prompt.mul_(0.9)

    def visualizations(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        p = self.prompt.detach()
        shown = (p - p.min()) / (p.max() - p.min() + 1e-8)
        batch = (images + p).clamp(-2, 2) / 4 + 0.5
        return {"prompt": shown, "prompted examples": batch}


class ColorData:
    """Noisy reddish vs bluish 32 x 32 images."""

    def __init__(self, n: int, seed: int, *, flip_labels: bool = False) -> None:
        rng = np.random.default_rng(seed)
        self.classnames = list(CLASSES)
        self.items: list[tuple[Image.Image, int]] = []
        for i in range(n):
            label = i % 2
            base = np.array([170, 60, 60] if label == 0 else [60, 60, 170], dtype=float)
            pixels = np.clip(base + rng.normal(0, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            self.items.append((Image.fromarray(pixels), 1 - label if flip_labels else label))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.items[index]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: extra threads only add contention on shared CI cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> tuple[ColorData, ColorData]:
    return ColorData(64, seed=1), ColorData(32, seed=2)


@pytest.fixture(scope="module")
def make_method(tiny_clip) -> Callable[..., AdditivePrompt]:
    def make(**optim: Any) -> AdditivePrompt:
        config = AdditiveConfig()
        if optim:
            config = replace(config, optim=replace(config.optim, **optim))
        return AdditivePrompt(tiny_clip, CLASSES, config)

    return make


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, make_method, data, tiny_clip):
    """One uninterrupted run (dir A) that several tests inspect."""
    train, val = data
    before = {k: v.clone() for k, v in tiny_clip.state_dict().items()}
    method = make_method()
    untrained = evaluate(method, val, progress=False)
    out = tmp_path_factory.mktemp("run-a")
    result = fit(method, train, val=val, out_dir=out, progress=False)
    return {
        "method": method,
        "result": result,
        "out": out,
        "untrained": untrained,
        "before": before,
    }


def test_toy_method_satisfies_protocol(make_method):
    assert isinstance(make_method(), PromptMethod)


def test_fit_learns_and_keeps_backbone_frozen(baseline, tiny_clip, data):
    result: FitResult = baseline["result"]
    method: AdditivePrompt = baseline["method"]
    history = result.history
    assert result.epochs_run == EPOCHS
    assert len(history) == EPOCHS
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    trained = evaluate(method, data[1], progress=False)
    assert trained.accuracy > baseline["untrained"].accuracy
    assert trained.accuracy >= 0.9
    assert result.best_val_acc == max(h["val_acc"] for h in history)
    after = tiny_clip.state_dict()
    assert all(torch.equal(baseline["before"][k], after[k]) for k in after)
    assert all(p.grad is None for p in tiny_clip.parameters())
    assert method.prompt.grad is not None
    # The hook saw the whole training set (no augmentation, no cap) before every epoch.
    assert method.hook_calls == [(e, len(data[0])) for e in range(EPOCHS)]
    assert method.after_calls == list(range(EPOCHS))


def test_metrics_jsonl_one_line_per_epoch(baseline):
    lines = (baseline["out"] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == EPOCHS
    keys = {"epoch", "train_loss", "train_acc", "lr", "val_acc", "val_loss", "seconds"}
    for epoch, line in enumerate(lines):
        record = json.loads(line)
        assert keys | {"images_per_s"} <= set(record)
        assert record["epoch"] == epoch
        assert 0 <= record["val_acc"] <= 1


def test_artifacts_pack_config_and_plots(baseline, tiny_clip, data):
    out: Path = baseline["out"]
    pack = load_pack(out / "prompt.safetensors")
    assert pack.method == "test-engine-additive"
    assert set(pack.tensors) == {"prompt"}
    assert torch.equal(pack.tensors["prompt"], baseline["method"].prompt.detach())
    assert pack.metrics["selected"] == "best-val"
    assert pack.metrics["val_acc"] == baseline["result"].best_val_acc
    rebuilt = build_from_pack(pack, backbone=tiny_clip)
    assert evaluate(rebuilt, data[1], progress=False) == evaluate(
        baseline["method"], data[1], progress=False
    )
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "test-engine-additive"
    assert config["config"]["optim"]["epochs"] == EPOCHS
    assert config["data"] == {"train": 64, "val": 32}
    assert config["backbone"]["name"] == "clip:tiny"
    for name, size in (
        ("learning_curves", None),
        ("prompt", (256, 256)),  # the 32 x 32 prompt, enlarged 8x (nearest neighbour)
        ("prompted_examples", None),
    ):
        path = out / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            im.verify()
        if size:
            with Image.open(path) as im:
                assert im.size == size


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_after_interrupt_is_bit_identical(optimizer, baseline, make_method, data, tmp_path):
    train, val = data
    if optimizer == "adam":
        reference, reference_result = baseline["method"], baseline["result"]
    else:
        reference = make_method(optimizer="sgd", lr=0.5)
        reference_result = fit(reference, train, val=val, out_dir=tmp_path / "a", progress=False)

    def interrupt(event: FitEvent) -> None:
        if event.kind == "step" and event.epoch == 1 and event.step == 10:
            raise KeyboardInterrupt

    kw: dict[str, Any] = {"optimizer": "sgd", "lr": 0.5} if optimizer == "sgd" else {}
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        fit(make_method(**kw), train, val=val, out_dir=out, progress=False, callbacks=[interrupt])
    progress = json.loads((out / "checkpoint.json").read_text())
    assert progress["epochs_done"] == 1
    assert progress["global_step"] == 8
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (out / "prompt.safetensors").exists()

    resumed = make_method(**kw)
    result = fit(resumed, train, val=val, out_dir=out, progress=False)
    assert resumed.hook_calls == [(1, 64), (2, 64)]  # epoch 0 was not rerun
    assert resumed.after_calls == [1, 2]
    assert torch.equal(resumed.prompt.detach(), reference.prompt.detach())
    volatile = {"seconds", "images_per_s"}
    strip = [{k: v for k, v in h.items() if k not in volatile} for h in result.history]
    expected = [{k: v for k, v in h.items() if k not in volatile} for h in reference_result.history]
    assert strip == expected
    assert result.best_epoch == reference_result.best_epoch


def test_finished_run_returns_at_once(baseline, make_method, data):
    steps: list[FitEvent] = []
    method = make_method()
    result = fit(
        method,
        data[0],
        val=data[1],
        out_dir=baseline["out"],
        progress=False,
        callbacks=[steps.append],
    )
    assert steps == []
    assert method.hook_calls == []
    assert torch.equal(method.prompt.detach(), baseline["method"].prompt.detach())
    assert result.history == baseline["result"].history
    assert result.pack_path == baseline["out"] / "prompt.safetensors"


def test_resume_with_other_config_is_refused(baseline, make_method, data, tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)optim\.lr.*--overwrite"):
        fit(make_method(lr=0.5), data[0], val=data[1], out_dir=baseline["out"], progress=False)
    with pytest.raises(ConfigError, match="seed"):
        fit(make_method(), data[0], val=data[1], out_dir=baseline["out"], seed=1, progress=False)


def test_checkpoint_from_before_a_new_config_field_still_resumes(make_method, data, tmp_path):
    """A config field added in a later version is absent from older checkpoints: resuming takes
    its default as the saved value (same run when the current value is the default)."""
    from vprompt.engine.checkpoint import load_checkpoint, save_checkpoint

    fit(make_method(epochs=1), data[0], out_dir=tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None
    del ckpt.run["config"]["optim"]["warmup_type"]  # as written before the field existed
    save_checkpoint(tmp_path, ckpt)
    result = fit(make_method(epochs=1), data[0], out_dir=tmp_path, progress=False)
    assert result.epochs_run == 1
    with pytest.raises(ConfigError, match="warmup_type"):
        fit(
            make_method(epochs=1, warmup_type="constant", warmup_lr=0.001, warmup_epochs=1),
            data[0],
            out_dir=tmp_path,
            progress=False,
        )


def test_no_resume_starts_this_run_over_and_overwrite_replaces_another(make_method, data, tmp_path):
    fit(make_method(epochs=2), data[0], out_dir=tmp_path, progress=False)
    same = make_method(epochs=2)
    result = fit(same, data[0], out_dir=tmp_path, resume=False, progress=False)
    assert result.epochs_run == 2
    assert [e for e, _ in same.hook_calls] == [0, 1]
    other = make_method(epochs=2, lr=1.0)
    with pytest.raises(ConfigError, match="different run"):  # --no-resume is not --overwrite
        fit(other, data[0], out_dir=tmp_path, resume=False, progress=False)
    result = fit(other, data[0], out_dir=tmp_path, overwrite=True, progress=False)
    assert result.epochs_run == 2
    assert [e for e, _ in other.hook_calls] == [0, 1]
    again = make_method(epochs=2, lr=1.0)  # now this run's own: --overwrite resumes it
    fit(again, data[0], out_dir=tmp_path, overwrite=True, progress=False)
    assert again.hook_calls == []


def test_best_vs_last_selection_uses_val_only(make_method, data, tmp_path):
    train, _ = data
    # Validation labels are flipped: the better the prompt fits, the worse it validates, so the
    # first epoch must be kept.
    inverted = ColorData(32, seed=2, flip_labels=True)
    snapshots: dict[int, torch.Tensor] = {}

    def snapshot(event: FitEvent) -> None:
        if event.kind == "epoch":
            snapshots[event.epoch] = method.prompt.detach().clone()

    method = make_method()
    result = fit(
        method, train, val=inverted, out_dir=tmp_path / "val", progress=False, callbacks=[snapshot]
    )
    assert result.selected == "best-val"
    accs = [(h["val_acc"], -h["val_loss"]) for h in result.history]
    assert result.best_epoch == accs.index(max(accs)) == 0
    assert torch.equal(method.prompt.detach(), snapshots[0])
    assert not torch.equal(snapshots[0], snapshots[EPOCHS - 1])

    last = make_method()
    result = fit(last, train, out_dir=tmp_path / "noval", progress=False)
    assert result.selected == "last"
    assert result.best_epoch == EPOCHS - 1
    assert result.best_val_acc is None
    assert all(h["val_acc"] is None for h in result.history)
    assert torch.equal(last.prompt.detach(), snapshots[EPOCHS - 1])


def test_max_steps_per_epoch_and_adam(make_method, data, tmp_path):
    seen: list[FitEvent] = []
    method = make_method(optimizer="adamw", lr=0.05, epochs=2, warmup_epochs=1)
    result = fit(
        method,
        data[0],
        out_dir=tmp_path,
        progress=False,
        max_steps_per_epoch=2,
        callbacks=[seen.append],
    )
    steps = [e for e in seen if e.kind == "step"]
    assert [e.step for e in steps] == [1, 2, 3, 4]
    assert [e.metrics["lr"] for e in steps] == pytest.approx([0.0, 0.025, 0.05, 0.025])
    assert result.history[-1]["step"] == 4


def test_zero_epochs_runs_hook_once_and_packs(make_method, data, tmp_path):
    method = make_method(epochs=0)
    result = fit(method, data[0], val=data[1], out_dir=tmp_path, progress=False)
    assert method.hook_calls == [(0, 64)]
    assert result.epochs_run == 0
    assert result.best_epoch is None
    assert result.selected == "last"
    assert "val_acc" in load_pack(result.pack_path).metrics


def test_class_mismatch_is_refused(make_method, data, tmp_path):
    other = ColorData(8, seed=3)
    other.classnames = ["blue", "red"]
    with pytest.raises(ConfigError, match="classes"):
        fit(make_method(), other, out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="classes"):
        evaluate(make_method(), other, progress=False)


def test_schedule_warmup_then_cosine():
    optim = OptimConfig(lr=0.1, epochs=3, warmup_epochs=1)
    s = LRSchedule.from_config(optim, steps_per_epoch=10)
    assert s.total_steps == 30
    assert s.warmup_steps == 10
    assert [s(0), s(5), s(10), s(20), s(30)] == pytest.approx([0.0, 0.05, 0.1, 0.05, 0.0])
    assert s(25) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.75)))
    w = LRSchedule.from_config(replace(optim, warmup_lr=0.01), steps_per_epoch=10)
    assert [w(0), w(5)] == pytest.approx([0.01, 0.055])
    plain = LRSchedule.from_config(OptimConfig(lr=0.2, epochs=2), steps_per_epoch=4)
    assert [plain(0), plain(4), plain(8)] == pytest.approx([0.2, 0.1, 0.0])


def test_evaluate_confusion_consistent_with_accuracy(baseline, data):
    result: EvalResult = evaluate(baseline["method"], data[1], batch_size=5, progress=False)
    confusion = torch.tensor(result.confusion)
    assert confusion.shape == (2, 2)
    assert int(confusion.sum()) == result.n == 32
    assert result.accuracy == pytest.approx(float(confusion.diagonal().sum()) / 32)
    assert confusion.sum(dim=1).tolist() == [16, 16]
    for i, name in enumerate(CLASSES):
        assert result.per_class_accuracy[name] == pytest.approx(float(confusion[i, i]) / 16)
    assert math.isfinite(result.loss)
    assert result.loss > 0
    assert result.to_dict()["n"] == 32


@pytest.mark.parametrize("with_callbacks", [False, True])
def test_a_non_finite_loss_names_its_step_and_keeps_the_last_checkpoint(
    make_method, data, tmp_path, with_callbacks
):
    """Losses are read back once per curve window (each step with callbacks); either way the
    first non-finite step is the one reported, and the previous epoch's checkpoint survives."""
    method = make_method(epochs=3)
    clean_forward = method.forward
    calls = {"n": 0}

    def forward(images: torch.Tensor) -> MethodOutput:
        out = clean_forward(images)
        calls["n"] += 1
        if method.training and calls["n"] > 8 + 3:  # 8 steps per epoch; breaks epoch 2's 4th
            return MethodOutput(logits=out.logits * float("nan"), aux_loss=out.aux_loss)
        return out

    method.forward = forward  # type: ignore[method-assign]
    seen: list[Any] = []
    with pytest.raises(VPromptError, match=r"became nan at epoch 1, step 11;"):
        fit(
            method,
            data[0],
            out_dir=tmp_path,
            progress=False,
            callbacks=[seen.append] if with_callbacks else [],
        )
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 0
    if with_callbacks:
        assert [e.step for e in seen if e.kind == "step"][-1] == 11


# ---------------------------------------------------------------------------- damaged checkpoints


def _tampered(source: Path, folder: Path, change: Callable[[dict, dict], None]) -> Path:
    """A copy of ``source``'s run folder whose checkpoint is cut back to epoch 1 of 3 (so it
    resumes), then changed by ``change(progress, tensors)``."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    path = folder / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as fh:
        progress = json.loads(fh.metadata()["vprompt-checkpoint"])
    tensors = load_file(str(path))
    progress.update(finished=False, epochs_done=1, history=progress["history"][:1])
    progress.update(best_epoch=0)  # the best tensors stay: a consistent mid-run checkpoint
    (folder / "prompt.safetensors").unlink()
    change(progress, tensors)
    save_file(tensors, str(path), metadata={"vprompt-checkpoint": json.dumps(progress)})
    return folder


def _set(**values: Any) -> Callable[[dict, dict], None]:
    return lambda progress, tensors: progress.update(values)


def _tensor(name: str, value: Any) -> Callable[[dict, dict], None]:
    return lambda progress, tensors: tensors.__setitem__(name, value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set(run="x"), "'run' is 'x', expected dict"),
        (_set(epochs_done="abc"), "'epochs_done' is 'abc', expected int"),
        (_set(epochs_done=-1), "negative progress"),
        (_set(epochs_done=10**9), "1 epochs of history for epochs_done 1000000000"),
        (_set(history="x"), "'history' is 'x'"),
        (_set(history=[{}]), "history entry 0 is not the record of epoch 0"),
        (_set(history=[{"epoch": 0, "train_loss": "nan"}]), "history entry 0 has train_loss"),
        (_set(best_epoch=99), "best_epoch 99 is not one of the 1 epochs run"),
        (_set(best_metric="x"), "'best_metric' is 'x'"),
        (_set(best_metric={"val_acc": 1}), "lacks numeric val_acc and val_loss"),
        (_set(selected=5), "'selected' is 5"),
        (_set(setup_done="no"), "'setup_done' is 'no'"),
        (_set(optimizer_scalars=[1]), "'optimizer_scalars' is"),
        (_set(optimizer_scalars={"0": 5}), "optimizer_scalars must map parameters to objects"),
        (_set(version=2), "checkpoint version 2 is not supported"),
        (lambda p, t: p.clear(), "checkpoint version None"),
        (lambda p, t: t.pop("prompt.prompt"), "no prompt tensors after set-up"),
        (_tensor("prompt.prompt", torch.full((3, 32, 32), float("nan"))), "holds NaN"),
        (_tensor("prompt.prompt", torch.zeros(2, 2)), "has shape (2, 2)"),
    ],
)
def test_a_damaged_checkpoint_is_one_clear_error_and_overwrite_starts_over(
    baseline, make_method, data, tmp_path, change, message
):
    folder = _tampered(baseline["out"], tmp_path / "run", change)
    with pytest.raises(ConfigError) as info:
        fit(make_method(), data[0], val=data[1], out_dir=folder, progress=False)
    text = str(info.value)
    assert message in text
    assert str(folder / "checkpoint.safetensors") in text
    assert "--overwrite" in text
    method = make_method()
    result = fit(method, data[0], val=data[1], out_dir=folder, overwrite=True, progress=False)
    assert result.epochs_run == EPOCHS
    assert torch.equal(method.prompt.detach(), baseline["method"].prompt.detach())


def test_unreadable_checkpoint_bytes_are_one_clear_error(baseline, make_method, data, tmp_path):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(baseline["out"], folder)
    path = folder / "checkpoint.safetensors"
    for damage in (path.read_bytes()[:100], b"\x00" * 7, b"not a checkpoint at all"):
        path.write_bytes(damage)
        with pytest.raises(ConfigError, match=r"unreadable checkpoint.*--overwrite"):
            fit(make_method(), data[0], val=data[1], out_dir=folder, progress=False)


def test_optimizer_state_that_does_not_fit_is_refused(baseline, make_method, data, tmp_path):
    folder = _tampered(
        baseline["out"], tmp_path / "run", _tensor("optim.0.exp_avg", torch.zeros(3))
    )
    with pytest.raises(ConfigError, match=r"optim.0.exp_avg' has shape \(3,\).*--no-resume"):
        fit(make_method(), data[0], val=data[1], out_dir=folder, progress=False)
    result = fit(make_method(), data[0], val=data[1], out_dir=folder, resume=False, progress=False)
    assert result.epochs_run == EPOCHS


def test_run_files_without_a_checkpoint_are_not_written_over(baseline, make_method, data, tmp_path):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(baseline["out"], folder)
    (folder / "checkpoint.safetensors").unlink()
    pack = (folder / "prompt.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"holds a run's files .* but no checkpoint"):
        fit(make_method(), data[0], val=data[1], out_dir=folder, progress=False)
    assert (folder / "prompt.safetensors").read_bytes() == pack
    fit(make_method(), data[0], val=data[1], out_dir=folder, overwrite=True, progress=False)


def test_hooks_reading_images_show_progress(make_method, data, capsys) -> None:
    """A set-up that reads every training image (a frequency label mapping over 60,000
    images) shows a progress bar instead of a silent wait; quiet runs stay quiet."""
    from vprompt.engine.fit_data import FitData

    method = make_method()
    for progress, shown in ((True, True), (False, False)):
        fit_data = FitData(method, data[0], None, train_source=None, val_source=None,
                           batch_size=8, device=torch.device("cpu"), progress=progress)  # fmt: skip
        seen = sum(len(labels) for _, labels in fit_data.train())
        assert seen == len(data[0])
        err = capsys.readouterr().err
        assert ("reading images (plain view)" in err) is shown
        assert (f"/{len(data[0])}" in err) is shown  # counted in images


def test_small_visualizations_are_enlarged_and_example_grids_captioned(tmp_path) -> None:
    import numpy as np

    from vprompt.engine.report import save_image, save_visualizations

    tokens = torch.rand(3, 10, 64)  # e.g. VPT's 10 x 64 token map
    path = save_image(tokens, tmp_path / "tokens.png")
    with Image.open(path) as im:
        pixels = np.asarray(im)
    assert pixels.shape == (260, 1664, 3)  # 26x: the short side reaches 256 px
    assert (pixels[:26, :26] == pixels[0, 0]).all()  # each value one solid block
    batch = torch.rand(3, 3, 32, 32)
    (tmp_path / "capt").mkdir()
    (tmp_path / "plain").mkdir()
    plain = save_visualizations({"a": batch}, tmp_path / "plain")
    captioned = save_visualizations({"a": batch}, tmp_path / "capt", ["cat", "dog -> cat", "cat"])
    with Image.open(plain[0]) as a, Image.open(captioned[0]) as b:
        assert b.height == a.height + 16  # one caption line under the row
        assert b.width == a.width

    from vprompt.methods.base import ValueImage

    raw = torch.linspace(-2.0, 6.0, 3 * 32 * 32).reshape(3, 32, 32)
    shown = ValueImage.stretch(raw)
    assert (shown.low, shown.high) == (-2.0, 6.0)
    (tmp_path / "bar").mkdir()
    (barred,) = save_visualizations({"prompt": shown}, tmp_path / "bar")
    (bare,) = save_visualizations({"prompt": shown.image}, tmp_path / "plain")
    with Image.open(barred) as a, Image.open(bare) as b:
        with_bar, without = np.asarray(a), np.asarray(b)
    assert with_bar.shape[1] > without.shape[1]  # the bar and its labels on the right
    assert (with_bar[:, : without.shape[1]] == without).all()  # the image itself unchanged
    column = with_bar[: without.shape[0], without.shape[1] + 6 + 8, 0].astype(int)
    assert column[0] == 255
    assert column[-1] == 0
    assert (np.diff(column) <= 0).all()
