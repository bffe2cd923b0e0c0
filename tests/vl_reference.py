"""Deep vision-language prompting written from the papers for the tests, on open_clip's modules.

Independent of vprompt's seam: the towers are run token by token here, sequence-first like the
reference ``clip/model.py`` of multimodal-prompt-learning, over whole 77-token prompts (no
truncation, no shared prefix), with each block's attention and MLP called directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _block(block, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One open_clip ResidualAttentionBlock on L x N x W (sequence-first) tokens."""
    h = block.ln_1(x)
    a = F.multi_head_attention_forward(
        h,
        h,
        h,
        block.attn.embed_dim,
        block.attn.num_heads,
        block.attn.in_proj_weight,
        block.attn.in_proj_bias,
        None,
        None,
        False,
        0.0,
        block.attn.out_proj.weight,
        block.attn.out_proj.bias,
        training=False,
        need_weights=False,
        attn_mask=mask,
    )[0]
    x = x + block.ls_1(a)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def text_features(
    model,
    tokenizer,
    classnames: Sequence[str],
    ctx: torch.Tensor,
    deep: Sequence[torch.Tensor],
    prompt_prefix: str,
    normalize: bool = True,
) -> torch.Tensor:
    """C x E text features (unit with ``normalize``) of ``[SOS] ctx <prefix tokens after M>
    NAME . [EOT]`` over all 77 positions, ``deep[k]`` replacing positions 1 … M entering
    block k + 1."""
    m = ctx.shape[0]
    names = [n.replace("_", " ") for n in classnames]
    tokens = tokenizer([f"{prompt_prefix} {n}." for n in names])
    emb = model.token_embedding(tokens)
    x = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(len(names), -1, -1), emb[:, 1 + m :]], 1)
    x = (x + model.positional_embedding).permute(1, 0, 2)  # L x C x W
    for i, block in enumerate(model.transformer.resblocks):
        if 1 <= i <= len(deep):
            layer = deep[i - 1].unsqueeze(1).expand(-1, x.shape[1], -1)
            x = torch.cat([x[:1], layer, x[1 + m :]], dim=0)
        x = _block(block, x, model.attn_mask)
    x = model.ln_final(x.permute(1, 0, 2))
    x = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ model.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def image_features(
    model, images: torch.Tensor, prompts: Sequence[torch.Tensor], normalize: bool = True
) -> torch.Tensor:
    """B x E image features (unit with ``normalize``) of a ViT tower with prompts appended
    after the patch tokens before ``ln_pre`` and replaced before blocks 1 … J - 1
    (``VisionTransformer_MaPLe``)."""
    v = model.visual
    x = v.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1) + v.positional_embedding
    if prompts:
        x = torch.cat([x, prompts[0].expand(x.shape[0], -1, -1)], dim=1)
    x = v.ln_pre(x).permute(1, 0, 2)  # L x B x D
    n = prompts[0].shape[0] if prompts else 0
    for i, block in enumerate(v.transformer.resblocks):
        if 1 <= i < len(prompts):
            layer = prompts[i].unsqueeze(1).expand(-1, x.shape[1], -1)
            x = torch.cat([x[: x.shape[0] - n], layer], dim=0)
        x = _block(block, x, None)
    x = v.ln_post(x.permute(1, 0, 2)[:, 0]) @ v.proj
    return F.normalize(x, dim=-1) if normalize else x


def logits(model, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return model.logit_scale.exp() * image @ text.T
