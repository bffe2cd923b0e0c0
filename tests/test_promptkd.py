"""PromptKD against its reference (zhengli97/PromptKD trainers/promptkd.py), written from the
paper in the test: the student's logits, the distillation loss, learning without labels."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vl_reference as ref
from vprompt.data.folder import UnlabeledImages
from vprompt.engine import fit
from vprompt.engine.pack import load_pack, save_pack
from vprompt.errors import ConfigError, DatasetError
from vprompt.methods.ivlp import IVLP, IVLPConfig
from vprompt.methods.promptkd import PromptKD, PromptKDConfig

CLASSES = ["cat", "golden_retriever", "moth"]
TINY = {"teacher_model": "clip:tiny", "teacher_weights": "none", "teacher_dim": 32}


def _student(backbone, seed: int = 0, classes=CLASSES, **config) -> PromptKD:
    if "optim" in config:
        config["optim"] = dataclasses.replace(PromptKDConfig().optim, **config["optim"])
    torch.manual_seed(seed)
    cfg = PromptKDConfig(**{**TINY, "vision_depth": 2, **config})
    return PromptKD(backbone, classes, cfg)


class ReferenceProjector(nn.Module):
    """``Feature_Trans_Module_two_layer(512, 768)``: 1x1 conv → BN → ReLU → 1x1 conv."""

    def __init__(self, input_dim: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(input_dim, out_dim, 1),
            nn.BatchNorm2d(out_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_dim, out_dim, 1),
        )

    def forward(self, input_feat: torch.Tensor) -> torch.Tensor:
        final_feat = self.conv1(input_feat.unsqueeze(-1).unsqueeze(-1))
        return final_feat.squeeze(-1).squeeze(-1)


def test_projector_starts_as_the_reference_module(tiny_clip) -> None:
    student = _student(tiny_clip, seed=2)
    torch.manual_seed(2)
    [torch.empty(4, 64).normal_(std=0.02) for _ in range(2)]  # the vision prompts come first
    theirs = ReferenceProjector(32, 32)
    assert torch.equal(student.projector.fc1.weight, theirs.conv1[0].weight[:, :, 0, 0])
    assert torch.equal(student.projector.fc1.bias, theirs.conv1[0].bias)
    assert torch.equal(student.projector.fc2.weight, theirs.conv1[3].weight[:, :, 0, 0])


def test_student_logits_and_distillation_equal_the_reference(tiny_clip) -> None:
    student = _student(tiny_clip, kd_weight=1000.0, temperature=2.0)
    student.setup(data=None)  # type: ignore[arg-type]  # loads the (zero-shot) teacher
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    student.train()
    out = student(images)
    out.aux_loss["kd"].backward()
    ours = {n: p.grad.clone() for n, p in student.named_parameters() if p.requires_grad}

    model = tiny_clip.model
    projector = ReferenceProjector(32, 32).train()
    with torch.no_grad():
        projector.conv1[0].weight.copy_(student.projector.fc1.weight[:, :, None, None])
        projector.conv1[0].bias.copy_(student.projector.fc1.bias)
        projector.conv1[3].weight.copy_(student.projector.fc2.weight[:, :, None, None])
        projector.conv1[3].bias.copy_(student.projector.fc2.bias)
    vision = [p.detach().clone().requires_grad_(True) for p in student.vision]
    image_ft = projector(ref.image_features(model, images, vision, normalize=False))
    image_ft = image_ft / image_ft.norm(dim=-1, keepdim=True)
    with torch.no_grad():  # the zero-shot teacher on the same images
        tea_text = F.normalize(
            model.encode_text(
                tiny_clip.tokenize(
                    ["a photo of a cat.", "a photo of a golden retriever.", "a photo of a moth."]
                )
            ),
            dim=-1,
        )
        tea_image = F.normalize(model.encode_image(images), dim=-1)
        tea_logits = model.logit_scale.exp() * tea_image @ tea_text.t()
    stu_logits = model.logit_scale.exp() * image_ft @ tea_text.t().detach()
    temperature = 2.0
    l_ukd = (
        F.kl_div(
            F.log_softmax(stu_logits / temperature, dim=1),
            F.softmax(tea_logits / temperature, dim=1),
            reduction="sum",
        )
        * (temperature * temperature)
        / stu_logits.numel()
    )
    loss = 1000.0 * l_ukd  # fmt: skip
    torch.testing.assert_close(student.teacher_text, tea_text, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.logits, stu_logits, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.aux_loss["kd"], loss, atol=1e-5, rtol=1e-4)
    loss.backward()
    want = {f"vision.{k}": v.grad for k, v in enumerate(vision)}
    want["projector.fc1.weight"] = projector.conv1[0].weight.grad[:, :, 0, 0]
    want["projector.fc2.bias"] = projector.conv1[3].bias.grad
    for name, grad in want.items():
        scale = float(grad.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(ours[name], grad, atol=1e-5 * scale, rtol=1e-3)


def test_a_teacher_pack_scores_with_its_prompted_features(tiny_clip, tmp_path) -> None:
    torch.manual_seed(0)
    teacher = IVLP(tiny_clip, ["moth", "cat", "golden_retriever"],
                   IVLPConfig(text_depth=2, vision_depth=2))  # fmt: skip
    pack = save_pack(teacher, tmp_path / "teacher.safetensors")
    student = _student(tiny_clip, teacher_pack=str(pack))
    student.setup(data=None)  # type: ignore[arg-type]
    with torch.no_grad():
        want = teacher.eval().retarget(CLASSES).text_features()
    torch.testing.assert_close(student.teacher_text, want, atol=1e-6, rtol=1e-6)
    assert "_teacher" not in dict(student.named_modules())
    assert not any(k.startswith("_teacher") for k in student.prompt_state())


def test_retarget_takes_stored_rows_and_asks_the_teacher_for_new_classes(tiny_clip) -> None:
    student = _student(tiny_clip)
    student.setup(data=None)  # type: ignore[arg-type]
    sub = student.retarget(["moth", "cat"])
    assert sub.__dict__["_teacher"] is None  # rows taken, no teacher loaded
    assert torch.equal(sub.teacher_text, student.teacher_text[[2, 0]])
    other = student.retarget(["rocket"])
    assert other.teacher_text.abs().sum() > 0


def test_learns_from_unlabelled_images_without_cross_entropy(tiny_clip, tiny_folder, tmp_path):
    from conftest import FOLDER_CLASSES

    images = UnlabeledImages(tiny_folder / "train", list(FOLDER_CLASSES))
    assert len(images) == 12
    assert set(images.all_labels()) == {-1}
    student = _student(tiny_clip, classes=list(FOLDER_CLASSES),
                       optim={"epochs": 2, "batch_size": 4})  # fmt: skip
    result = fit(student, images, out_dir=tmp_path / "run", progress=False)
    assert result.epochs_run == 2
    assert result.history[-1]["train_acc"] == 0.0  # unlabelled images never count as hits
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="holds no images"):
        UnlabeledImages(empty, [])


def test_settings_are_checked(tiny_clip) -> None:
    with pytest.raises(ConfigError, match="teacher_model must be FAMILY:ARCH"):
        PromptKDConfig(teacher_model="ViT-L-14")
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        PromptKDConfig(temperature=0.0)
    student = _student(tiny_clip, teacher_dim=48)
    with pytest.raises(ConfigError, match="has 32-d features; set teacher_dim=32"):
        student.setup(data=None)  # type: ignore[arg-type]


def test_train_on_an_unlabelled_folder_then_predict_through_the_cli(
    tiny_folder, run_cli, tmp_path
) -> None:
    out = tmp_path / "kd"
    sets = [f"{k}={v}" for k, v in TINY.items()] + ["vision_depth=2", "optim.epochs=1"]
    args = [a for s in sets for a in ("--set", s)]
    res = run_cli("train", "--method", "promptkd", "--model", "clip:tiny", "--weights", "none",
                  "--data", f"folder:{tiny_folder}", "--unlabeled", tiny_folder / "val",
                  "--out", out, *args, "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["unlabeled"] == str(tiny_folder / "val")
    assert report["test_images"] == 6
    pack = load_pack(out / "prompt.safetensors")
    assert pack.tensors["teacher_text"].shape == (3, 32)
    image = next((tiny_folder / "test" / "red_thing").glob("*.png"))
    pred = run_cli("predict", "--pack", out / "prompt.safetensors", image, "--json")
    assert pred.returncode == 0, pred.stderr
    refused = run_cli("train", "--method", "coop", "--model", "clip:tiny", "--weights", "none",
                      "--data", f"folder:{tiny_folder}", "--unlabeled", tiny_folder / "val",
                      "--out", tmp_path / "coop")  # fmt: skip
    assert refused.returncode != 0
    assert "coop learns from labels" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_base_to_novel_is_transductive(run_cli, tmp_path) -> None:
    from vprompt.data.suite.synthetic import write_fake_dataset

    root = tmp_path / "suite"
    write_fake_dataset("dtd", root, num_classes=4, images_per_class=(3, 2, 2))
    sets = [f"{k}={v}" for k, v in TINY.items()] + ["vision_depth=2", "optim.epochs=1"]
    res = run_cli("protocol", "base-to-novel", "--method", "promptkd", "--model", "clip:tiny",
                  "--weights", "none", "--data-root", root, "--datasets", "dtd", "--shots", "2",
                  "--seeds", "1", "--out", tmp_path / "b2n",
                  *[a for s in sets for a in ("--set", s)])  # fmt: skip
    assert res.returncode == 0, res.stderr
    record = json.loads(
        (tmp_path / "b2n" / "jobs" / "dtd" / "shots_2" / "seed_1" / "result.json").read_text()
    )
    assert record["train"]["train_images"] == 8  # 2 shots of all 4 classes, unlabelled
    assert "transductive" in record["train"]["note"]
    assert set(record["metrics"]) == {"base", "new", "hm"}
