"""DiffTPT against its reference (chunmeifeng/DiffTPT: image_generator_R.py, difftpt_utils.py,
tpt_classification.py), written from the paper and that code in the test, on a tiny
random-weight image-variation pipeline built here (nothing is downloaded)."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vl_reference as ref
from vprompt.errors import ConfigError
from vprompt.methods.difftpt import DiffTPT, DiffTPTConfig, cosine_keep

diffusers = pytest.importorskip("diffusers")

CLASSES = ["cat", "golden_retriever", "moth"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY = {"diffusion_steps": 2, "generated_size": 32}


def _photo(seed: int, size=(40, 48)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random-weight StableDiffusionImageVariationPipeline (32 px), saved to a folder."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8,
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
    )  # fmt: skip
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=4, intermediate_size=37,
    ))  # fmt: skip
    pipe = diffusers.StableDiffusionImageVariationPipeline(
        vae=vae, image_encoder=encoder, unet=unet,
        scheduler=diffusers.PNDMScheduler(skip_prk_steps=True), safety_checker=None,
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
        requires_safety_checker=False,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("sd-variations") / "pipe"
    pipe.save_pretrained(folder)
    return str(folder)


def reference_cosine_select(logits: torch.Tensor, cos_top: float, ent_top: float):
    """``select_confident_samples_cosine``: cosine of every view's logits to the original's,
    the top ``cos_top`` behind the original, then the ``ent_top`` lowest-entropy of those."""
    sims = torch.stack([
        torch.nn.CosineSimilarity(dim=0)(logits[0], logits[i]) for i in range(1, len(logits))
    ])  # fmt: skip
    idx_cos = torch.argsort(sims, descending=True)[: int(sims.size()[0] * cos_top)] + 1
    kept = torch.cat((logits[:1], logits[idx_cos]), dim=0)
    entropy = -(kept.softmax(1) * kept.log_softmax(1)).sum(1)
    idx = torch.argsort(entropy, descending=False)[: int(entropy.size()[0] * ent_top)]
    return kept[idx], (idx_cos, idx)


def reference_avg_entropy(outputs: torch.Tensor) -> torch.Tensor:
    logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    avg = logits.logsumexp(dim=0) - np.log(logits.shape[0])
    avg = torch.clamp(avg, min=torch.finfo(avg.dtype).min)
    return -(avg * torch.exp(avg)).sum(dim=-1)


def test_cosine_filter_equals_the_reference() -> None:
    logits = torch.randn(128, 10, generator=torch.Generator().manual_seed(0)) * 3
    _, (idx_cos, _) = reference_cosine_select(logits, 0.8, 0.3)
    keep = cosine_keep(logits, 0.8)
    assert keep[0] == 0
    assert torch.equal(keep[1:], idx_cos)
    assert len(keep) == 1 + int(127 * 0.8)
    assert torch.equal(cosine_keep(logits[:1], 0.8), torch.tensor([0]))


def test_generated_views_are_the_pipelines_variations(tiny_clip, pipeline_dir) -> None:
    cfg = DiffTPTConfig(pipeline=pipeline_dir, views=3, generated=5, generation_batch=3, **TINY)
    method = DiffTPT(tiny_clip, CLASSES, cfg)
    photo = _photo(1)
    views = method.input_transform(False)(photo)
    assert views.shape == (1 + 3 + 5, 3, 32, 32)
    # The reference: the image as a tensor (bicubic resize, no antialias, CLIP-normalised),
    # guidance 3, the safety checker off; each variation preprocessed as the original.
    from torchvision import transforms as T

    pipe = diffusers.StableDiffusionImageVariationPipeline.from_pretrained(
        pipeline_dir, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    image = T.Normalize(CLIP_MEAN, CLIP_STD)(
        T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC, antialias=False)(
            T.ToTensor()(photo)
        )
    )[None]
    gen = method.noise_generator(photo)
    made = []
    for count in (3, 2):
        made += pipe(image, height=32, width=32, num_inference_steps=2, guidance_scale=3.0,
                     num_images_per_prompt=count, generator=gen).images  # fmt: skip
    want = torch.stack([tiny_clip.transform(m) for m in made])
    torch.testing.assert_close(views[4:], want, atol=1e-6, rtol=0)
    assert torch.equal(views[0], tiny_clip.transform(photo))
    assert not torch.equal(views[4], views[5])


def test_one_image_is_filtered_and_tuned_as_the_reference_does(tiny_clip, pipeline_dir) -> None:
    cfg = DiffTPTConfig(pipeline=pipeline_dir, views=6, generated=5, steps=2, **TINY)
    method = DiffTPT(tiny_clip, CLASSES, cfg)
    views = method.input_transform(False)(_photo(2))
    with torch.no_grad():
        got = method(views[None]).logits
    # The reference: reset, score every view, cosine filter (0.8) then entropy (0.3), fixed
    # after the first step; AdamW steps on the averaged entropy; predict the original.
    model = tiny_clip.model
    ctx = tiny_clip.embed_tokens(tiny_clip.tokenize(["a photo of a"]))[0, 1:5].detach().clone()
    ctx.requires_grad_(True)
    optimizer = torch.optim.AdamW([ctx], 5e-3)
    with torch.no_grad():
        image = model.encode_image(views)
        image = image / image.norm(dim=-1, keepdim=True)
    selected = None
    for _ in range(2):
        text = ref.text_features(model, tiny_clip._tokenizer, CLASSES, ctx, [], "a photo of a")
        output = model.logit_scale.exp() * image @ text.t()
        if selected is None:
            output, selected = reference_cosine_select(output, 0.8, 0.3)
        else:
            output = torch.cat((output[:1], output[selected[0]]))[selected[1]]
        loss = reference_avg_entropy(output)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert len(selected[0]) == int(11 * 0.8)
    assert len(selected[1]) == int(9 * 0.3)
    assert (selected[0] > 6).any()  # generated views took part
    with torch.no_grad():
        text = ref.text_features(model, tiny_clip._tokenizer, CLASSES, ctx, [], "a photo of a")
        want = model.logit_scale.exp() * image[:1] @ text.t()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    with torch.no_grad():  # tuning changed the prediction
        assert not torch.allclose(method(views[:1]).logits, want, atol=1e-6)


def test_features_filter_uses_clip_image_features(tiny_clip) -> None:
    method = DiffTPT(tiny_clip, CLASSES, DiffTPTConfig(views=9, generated=0, cosine_on="features"))
    views = method.input_transform(False)(_photo(3))
    with torch.no_grad():
        image = tiny_clip.model.encode_image(views)
    sims = torch.nn.functional.cosine_similarity(image[:1], image[1:], dim=1)
    want = torch.argsort(sims, descending=True)[: int(9 * 0.8)] + 1
    kept = method.filter_views(method.encode_views(views))
    assert torch.equal(kept, torch.cat([torch.tensor([0]), want]))


def test_views_are_deterministic_per_image_and_seed(tiny_clip, pipeline_dir) -> None:
    cfg = DiffTPTConfig(pipeline=pipeline_dir, views=2, generated=2, **TINY)
    photo = _photo(4, size=(60, 30))
    transform = DiffTPT(tiny_clip, CLASSES, cfg).input_transform(False)
    first = transform(photo)
    assert torch.equal(first, transform(photo.copy()))
    assert not torch.equal(transform(_photo(5, size=(60, 30)))[3:], first[3:])
    other = DiffTPT(tiny_clip, CLASSES, dataclasses.replace(cfg, seed=1))
    assert not torch.equal(other.input_transform(False)(photo)[3:], first[3:])


def test_every_image_starts_from_the_same_context(tiny_clip, pipeline_dir) -> None:
    cfg = DiffTPTConfig(pipeline=pipeline_dir, views=3, generated=2, selection=0.5, **TINY)
    method = DiffTPT(tiny_clip, CLASSES, cfg)
    transform = method.input_transform(False)
    a, b = transform(_photo(6)), transform(_photo(7))
    start = method.ctx.detach().clone()
    with torch.no_grad():
        together = method(torch.stack([a, b])).logits
        alone = method(b[None]).logits
    assert torch.equal(together[1:], alone)
    assert torch.equal(method.ctx.detach(), start)


def test_missing_diffusers_and_missing_pipeline_are_one_line_errors(
    tiny_clip, tmp_path, monkeypatch
) -> None:
    with pytest.raises(ConfigError, match="cannot load the image-variation pipeline") as err:
        DiffTPT(tiny_clip, CLASSES, DiffTPTConfig(pipeline=str(tmp_path)))
    assert "\n" not in str(err.value)
    assert "allow_download=true" in str(err.value)
    with pytest.raises(ConfigError, match="local Hugging Face cache") as err:
        DiffTPT(tiny_clip, CLASSES, DiffTPTConfig(pipeline="nobody/no-such-pipeline"))
    assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ConfigError, match=r"pip install 'vprompt\[diffusion\]'") as err:
        DiffTPT(tiny_clip, CLASSES, DiffTPTConfig(pipeline=str(tmp_path)))
    assert "\n" not in str(err.value)
    DiffTPT(tiny_clip, CLASSES, DiffTPTConfig(generated=0))  # no pipeline needed


def test_defaults_and_validation() -> None:
    cfg = DiffTPTConfig()
    assert (cfg.views, cfg.generated, cfg.selection, cfg.cosine_selection, cfg.steps) == (
        64, 63, 0.3, 0.8, 4)  # fmt: skip
    assert (cfg.guidance, cfg.diffusion_steps, cfg.lr, cfg.allow_download) == (3.0, 50, 5e-3, False)
    for bad, message in (
        ({"cosine_selection": 0.0}, "cosine_selection must be in"),
        ({"cosine_selection": 1.5}, "cosine_selection must be in"),
        ({"cosine_on": "pixels"}, "cosine_on must be one of"),
        ({"generated": 10**9}, "generated must be an integer"),
        ({"generated": -1}, "generated must be an integer"),
        ({"diffusion_steps": 0}, "diffusion_steps"),
        ({"generated_size": 30}, "multiple of 8"),
        ({"guidance": -1.0}, "guidance"),
        ({"pipeline": ""}, "needs pipeline="),
        ({"allow_download": "yes"}, "allow_download"),
        ({"selection": 0.0}, "selection must be in"),
    ):
        with pytest.raises(ConfigError, match=message):
            DiffTPTConfig(**bad)


def test_eval_runs_difftpt_through_the_cli(tiny_folder, run_cli, pipeline_dir) -> None:
    res = run_cli("eval", "--method", "difftpt", "--model", "clip:tiny", "--weights", "none",
                  "--data", f"folder:{tiny_folder}", "--set", f"pipeline={pipeline_dir}",
                  "--set", "views=3", "--set", "generated=2", "--set", "diffusion_steps=2",
                  "--set", "generated_size=32", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["method"] == "difftpt"
    assert report["images"] == 6
    missing = run_cli("eval", "--method", "difftpt", "--model", "clip:tiny", "--weights", "none",
                      "--data", f"folder:{tiny_folder}", "--set", "pipeline=/no/dir")  # fmt: skip
    assert missing.returncode != 0
    assert "cannot load the image-variation pipeline" in missing.stderr
    assert "Traceback" not in missing.stderr
