"""SAM's prompt encoder + mask decoder as one export-friendly module (SAM's ONNX contract).

Inputs follow segment-anything's ``SamOnnxModel`` (its web demo), with objects on a batch
axis B instead of a batch of one:

- ``image_embeddings``: 1 x C x h x w, one image shared by every object,
- ``point_coords``: B x N x 2 model-frame ``(x, y)`` (box corners ride here with labels 2, 3;
  without a box, append the padding point ``(0, 0)`` with label -1, as SAM does),
- ``point_labels``: B x N float: 1 positive, 0 negative, 2 / 3 box corners, -1 not-a-point,
  -10 ignored (transformers' padding: a zero embedding),
- ``mask_input``: B x 1 x 4h x 4w low-res logits, ``has_mask_input``: B (1 or 0),
- ``orig_im_size``: ``(H, W)`` float, only when the graph upsamples to the original size.

Outputs: ``iou_predictions`` B x K, ``low_res_masks`` B x K x 4h x 4w and, with upsampling,
``masks`` B x K x H x W. K = 4 (index 0 the single-mask output, 1..3 the multimask candidates)
or 1 with ``masks="best"`` (SAM's ``return_single_mask`` rule).

The weights are transformers' ``SamModel`` ones; the arithmetic is re-associated so that
decoding B objects costs less than B decodes of one (every step is exact algebra; only the
float rounding differs from the eager model):

- first layer: the image's key / value / query projections run once for all objects; an
  object's mask input enters through the 16-channel features before the mask embedding's
  last 1 x 1 convolution (linear, so folded into the projections), and row-constant terms
  that a softmax cancels are dropped;
- token → image attention: ``softmax(q Wk Xᵀ) X Wvᵀ`` instead of projecting all h·w image
  tokens to keys and values (T tokens ≪ h·w);
- image → token attention: ``X (Wqᵀ Kᵀ)`` and ``A (V Woᵀ)`` instead of projecting every
  image token to a query and back through the output projection.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MaskSelection = Literal["all", "best"]


def _heads(x: Tensor, heads: int) -> Tensor:
    """B x T x D → B x heads x T x D/heads."""
    b, t, d = x.shape
    return x.reshape(b, t, heads, d // heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """B x heads x T x d → B x T x heads·d."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def _split_weight(weight: Tensor, heads: int) -> Tensor:
    """A projection's D_out x D_in weight → heads x d x D_in."""
    out, inp = weight.shape
    return weight.reshape(heads, out // heads, inp)


class SamDecoderGraph(nn.Module):
    """Prompt encoder + mask decoder of a transformers ``SamModel`` (see the module doc).

    Args:
        model: The frozen ``SamModel`` (kind ``sam``).
        masks: ``all`` K = 4 masks, or ``best``: one per object, picked like SAM's ONNX
            ``return_single_mask``.
        upscale: Also return ``masks`` at ``orig_im_size`` (SAM's post-processing).
    """

    image_pe: Tensor
    gk: Tensor
    gv: Tensor
    cv_b3: Tensor
    cv_nm: Tensor
    gq: Tensor
    cq_b3: Tensor
    cq_nm: Tensor
    nm: Tensor

    def __init__(self, *, model: Any, masks: MaskSelection = "all", upscale: bool = True) -> None:
        super().__init__()
        enc, dec = model.prompt_encoder, model.mask_decoder
        self.enc: Any = enc
        self.dec: Any = dec
        self.masks = masks
        self.upscale = upscale
        self.side = int(enc.input_image_size)
        layer0 = dec.transformer.layers[0]
        t2i, i2t = layer0.cross_attn_token_to_image, layer0.cross_attn_image_to_token
        with torch.no_grad():
            pe = model.get_image_wide_positional_embeddings().float()  # 1 x C x h x w
            conv3 = enc.mask_embed.conv3
            w3 = conv3.weight.double().flatten(1)  # C x 16
            b3, nm = conv3.bias.double(), enc.no_mask_embed.weight.double()[0]

            def fold(lin: nn.Linear) -> tuple[Tensor, Tensor, Tensor]:
                w = lin.weight.double()
                return (w @ w3).float(), (w @ b3).float(), (w @ nm).float()

            gk, _, _ = fold(t2i.k_proj)
            gv, cv_b3, cv_nm = fold(t2i.v_proj)
            gq, cq_b3, cq_nm = fold(i2t.q_proj)
        self.register_buffer("image_pe", pe.flatten(2).transpose(1, 2).contiguous())  # 1 x HW x C
        self.register_buffer("gk", _split_weight(gk, t2i.num_attention_heads))  # h x d x 16
        self.register_buffer("gv", _split_weight(gv, t2i.num_attention_heads))  # h x d x 16
        self.register_buffer("cv_b3", cv_b3)
        self.register_buffer("cv_nm", cv_nm)
        self.register_buffer("gq", _split_weight(gq, i2t.num_attention_heads))  # h x d x 16
        self.register_buffer("cq_b3", cq_b3)
        self.register_buffer("cq_nm", cq_nm)
        self.register_buffer("nm", nm.float())

    # -- prompt encoder ---------------------------------------------------------------

    def _embed_points(self, coords: Tensor, labels: Tensor) -> Tensor:
        """B x N x 2 model-frame coords, B x N labels → B x N x C sparse embeddings."""
        gauss = self.enc.shared_embedding.positional_embedding  # 2 x C/2
        xy = (coords + 0.5) / self.side
        proj = (2 * xy - 1) @ gauss * (2 * math.pi)
        emb = torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)
        lab = labels.unsqueeze(-1)
        emb = torch.where(lab == -1, self.enc.not_a_point_embed.weight, emb)
        emb = torch.where(lab == -10, torch.zeros_like(emb), emb)
        for i, point_embed in enumerate(self.enc.point_embed):
            emb = emb + point_embed.weight * (lab == i).to(emb.dtype)
        return emb

    def _mask_features(self, mask_input: Tensor) -> Tensor:
        """B x 1 x 4h x 4w → B x HW x 16: the mask embedding before its last 1 x 1 conv."""
        me = self.enc.mask_embed
        x = me.activation(me.layer_norm1(me.conv1(mask_input)))
        x = me.activation(me.layer_norm2(me.conv2(x)))
        return x.flatten(2).transpose(1, 2)

    # -- attention pieces -------------------------------------------------------------

    @staticmethod
    def _self_attn(attn: nn.Module, q_in: Tensor, v_in: Tensor) -> Tensor:
        a: Any = attn
        h = a.num_attention_heads
        q = _heads(a.q_proj(q_in), h)
        k = _heads(a.k_proj(q_in), h)
        v = _heads(a.v_proj(v_in), h)
        w = torch.softmax(q @ k.transpose(-1, -2) * a.scaling, dim=-1)
        return a.out_proj(_merge(w @ v))

    @staticmethod
    def _token_to_image(attn: nn.Module, q_in: Tensor, x_pe: Tensor, x: Tensor) -> Tensor:
        """Tokens (B x T x C) attend to image tokens; keys ``x_pe``, values ``x`` (B x HW x C)."""
        a: Any = attn
        h = a.num_attention_heads
        b, t, _ = q_in.shape
        q = _heads(a.q_proj(q_in), h)  # B x h x T x d
        qk = (q @ _split_weight(a.k_proj.weight, h)).reshape(b, h * t, -1)  # B x hT x C
        w = torch.softmax(qk @ x_pe.transpose(1, 2) * a.scaling, dim=-1)  # B x hT x HW
        ax = (w @ x).reshape(b, h, t, -1)  # B x h x T x C
        v = ax @ _split_weight(a.v_proj.weight, h).transpose(1, 2)  # B x h x T x d
        v = v + a.v_proj.bias.reshape(h, 1, -1)
        return a.out_proj(_merge(v))

    @staticmethod
    def _image_to_token_parts(
        attn: nn.Module, tokens_pe: Tensor, tokens: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head keys (B x h x T x d), the query side ``Wqᵀ Kᵀ`` (B x C x hT) and
        ``V Woᵀ`` (B x hT x C) of image → token attention."""
        a: Any = attn
        h = a.num_attention_heads
        b, t, _ = tokens.shape
        k = _heads(a.k_proj(tokens_pe), h)  # B x h x T x d
        v = _heads(a.v_proj(tokens), h)
        wq = _split_weight(a.q_proj.weight, h)  # h x d x C
        m = (wq.transpose(1, 2) @ k.transpose(-1, -2)).permute(0, 2, 1, 3)  # B x C x h x T
        wo = a.out_proj.weight.reshape(a.out_proj.weight.shape[0], h, -1).permute(1, 2, 0)
        vo = (v @ wo).reshape(b, h * t, -1)  # B x hT x C
        return k, m.reshape(b, m.shape[1], h * t), vo

    @staticmethod
    def _softmax_heads(scores: Tensor, heads: int) -> Tensor:
        """B x HW x hT scores → per-head softmax over the T tokens, same shape."""
        b, n, ht = scores.shape
        w = torch.softmax(scores.reshape(b, n, heads, ht // heads), dim=-1)
        return w.reshape(b, n, ht)

    def _image_to_token(
        self, attn: nn.Module, x_pe: Tensor, tokens_pe: Tensor, tokens: Tensor
    ) -> Tensor:
        a: Any = attn
        h = a.num_attention_heads
        k, m, vo = self._image_to_token_parts(attn, tokens_pe, tokens)
        bias = (a.q_proj.bias.reshape(1, h, 1, -1) @ k.transpose(-1, -2)).flatten(1)  # B x hT
        w = self._softmax_heads((x_pe @ m + bias.unsqueeze(1)) * a.scaling, h)
        return w @ vo + a.out_proj.bias

    # -- the first block, image side shared across objects ----------------------------

    def image_side(self, image_embeddings: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """What the decoder computes from the image alone, the same for every prompt.

        image_embeddings: 1 x C x h x w → image tokens 1 x HW x C and layer 0's image keys
        (token → image), values (token → image) and queries (image → token), each
        1 x heads x HW x d.
        """
        layer: Any = self.dec.transformer.layers[0]
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        img = image_embeddings.flatten(2).transpose(1, 2)  # 1 x HW x C
        img_pe = img + self.image_pe
        k1 = _heads(t2i.k_proj(img_pe), t2i.num_attention_heads)
        v1 = _heads(t2i.v_proj(img), t2i.num_attention_heads)
        q1 = _heads(i2t.q_proj(img_pe), i2t.num_attention_heads)
        return img, k1, v1, q1

    def _first_block(
        self,
        tokens: Tensor,
        tpe: Tensor,
        image: tuple[Tensor, Tensor, Tensor, Tensor],
        feat: Tensor,
        has: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Layer 0 with the image side (:meth:`image_side`) shared; ``feat`` B x HW x 16 mask
        features, ``has`` B x 1 x 1."""
        layer: Any = self.dec.transformer.layers[0]
        img, k1, v1, q1 = image
        tokens = layer.layer_norm1(self._self_attn(layer.self_attn, tokens, tokens))

        # tokens → image; K = K1 + has·feat·Gkᵀ (+ a row constant the softmax cancels)
        a: Any = layer.cross_attn_token_to_image
        h = a.num_attention_heads
        b, t, _ = tokens.shape
        q = _heads(a.q_proj(tokens + tpe), h)  # B x h x T x d
        fk = (q @ self.gk).reshape(b, h * t, -1)  # B x hT x 16
        scores = (q @ k1.transpose(-1, -2)).reshape(b, h * t, -1)
        scores = scores + has * (fk @ feat.transpose(1, 2))
        w = torch.softmax(scores * a.scaling, dim=-1)  # B x hT x HW
        av = w.reshape(b, h, t, -1) @ v1  # B x h x T x d
        af = w @ feat  # B x hT x 16
        corr = af.reshape(b, h, t, -1) @ self.gv.transpose(1, 2)  # B x h x T x d
        const = (has * self.cv_b3 + (1 - has) * self.cv_nm).reshape(b, h, 1, -1)
        out = a.out_proj(_merge(av + has.reshape(b, 1, 1, 1) * corr + const))
        tokens = layer.layer_norm2(tokens + out)
        tokens = layer.layer_norm3(tokens + layer.mlp(tokens))

        # image → tokens; Q = Q1 + has·feat·Gqᵀ + (has·Wq b3 + (1-has)·Wq nm)
        a = layer.cross_attn_image_to_token
        k, _, vo = self._image_to_token_parts(a, tokens + tpe, tokens)
        scores = q1 @ k.transpose(-1, -2)  # B x h x HW x T
        scores = scores.permute(0, 2, 1, 3).reshape(b, -1, h * t)  # B x HW x hT
        gk_t = (self.gq.transpose(1, 2) @ k.transpose(-1, -2)).permute(0, 2, 1, 3)  # B x 16 x h x T
        scores = scores + has * (feat @ gk_t.reshape(b, -1, h * t))
        cq = (has * self.cq_b3 + (1 - has) * self.cq_nm).reshape(b, h, 1, -1)
        scores = scores + (cq @ k.transpose(-1, -2)).reshape(b, 1, h * t)
        w = self._softmax_heads(scores * a.scaling, h)
        x = (
            img
            + has
            * (
                feat @ self.enc.mask_embed.conv3.weight.flatten(1).t()
                + self.enc.mask_embed.conv3.bias
            )
            + (1 - has) * self.nm
        )
        keys = layer.layer_norm4(x + w @ vo + a.out_proj.bias)
        return tokens, keys

    # -- forward ----------------------------------------------------------------------

    def forward(
        self,
        image_embeddings: Tensor,
        point_coords: Tensor,
        point_labels: Tensor,
        mask_input: Tensor,
        has_mask_input: Tensor,
        orig_im_size: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        image = self.image_side(image_embeddings)
        return self.prompt_side(
            image, point_coords, point_labels, mask_input, has_mask_input, orig_im_size
        )

    def prompt_side(
        self,
        image: tuple[Tensor, Tensor, Tensor, Tensor],
        point_coords: Tensor,
        point_labels: Tensor,
        mask_input: Tensor,
        has_mask_input: Tensor,
        orig_im_size: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        """:meth:`forward` from :meth:`image_side`'s tensors."""
        dec: Any = self.dec
        b = point_coords.shape[0]
        side = 4 * math.isqrt(int(image[0].shape[1]))  # low-res side, 4 x the embedding's
        sparse = self._embed_points(point_coords, point_labels)
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tpe = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)  # B x T x C
        feat = self._mask_features(mask_input)
        has = has_mask_input.reshape(b, 1, 1)
        tokens, keys = self._first_block(tpe, tpe, image, feat, has)
        pe = self.image_pe
        for layer in dec.transformer.layers[1:]:
            attn = self._self_attn(layer.self_attn, tokens + tpe, tokens)
            tokens = layer.layer_norm1(tokens + attn)
            kpe = keys + pe
            out = self._token_to_image(layer.cross_attn_token_to_image, tokens + tpe, kpe, keys)
            tokens = layer.layer_norm2(tokens + out)
            tokens = layer.layer_norm3(tokens + layer.mlp(tokens))
            out = self._image_to_token(layer.cross_attn_image_to_token, kpe, tokens + tpe, tokens)
            keys = layer.layer_norm4(keys + out)
        tr = dec.transformer
        out = self._token_to_image(tr.final_attn_token_to_image, tokens + tpe, keys + pe, keys)
        tokens = tr.layer_norm_final_attn(tokens + out)

        n_masks = dec.num_mask_tokens
        hyper = torch.stack(
            [mlp(tokens[:, 1 + i]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1
        )  # B x K x C/8
        low = self._upscale_masks(keys, hyper).reshape(b, n_masks, side, side)
        iou = dec.iou_prediction_head(tokens[:, 0])  # B x K
        if self.masks == "best":
            weight = torch.zeros(n_masks, dtype=iou.dtype)
            weight[0] = 1000.0
            score = iou + (point_coords.shape[1] - 2.5) * weight
            best = score.argmax(dim=1)
            rows = torch.arange(b)
            low, iou = low[rows, best].unsqueeze(1), iou[rows, best].unsqueeze(1)
        if not self.upscale:
            return iou, low
        assert orig_im_size is not None
        return iou, low, self._postprocess(low, orig_im_size)

    def _upscale_masks(self, keys: Tensor, hyper: Tensor) -> Tensor:
        """The decoder's two 2 x 2 stride-2 transposed convolutions, channels-last, as matmuls
        (each output pixel sees one input pixel), then the hypernetwork product.

        keys: B x h·w x C; hyper: B x K x C/8 → B x K x 4h x 4w logits (flattened rows).
        """
        dec: Any = self.dec
        b, hw, _ = keys.shape
        side = math.isqrt(hw)
        c1, c2 = dec.upscale_conv1, dec.upscale_conv2
        o1, o2 = c1.weight.shape[1], c2.weight.shape[1]
        w1 = c1.weight.permute(0, 2, 3, 1).reshape(c1.weight.shape[0], 4 * o1)  # C x (2·2·O1)
        # 2-D products with the bias added right after, which onnxruntime fuses into Gemm
        y = (keys.reshape(-1, keys.shape[-1]) @ w1 + c1.bias.repeat(4)).reshape(b, hw * 4, o1)
        ln = dec.upscale_layer_norm
        y = dec.activation(F.layer_norm(y, (o1,), ln.weight, ln.bias, ln.eps))
        w2 = c2.weight.permute(0, 2, 3, 1).reshape(o1, 4 * o2)
        z = y.reshape(-1, o1) @ w2 + c2.bias.repeat(4)
        z = dec.activation(z).reshape(b, hw * 16, o2)
        m = z @ hyper.transpose(1, 2)  # B x (h·w·2·2·2·2) x K
        k = hyper.shape[1]
        # rows: i, j, di, dj, di2, dj2 → row 4i + 2di + di2, column 4j + 2dj + dj2
        m = m.reshape(b, side, side, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return m.reshape(b, k, 16 * hw)

    def _postprocess(self, low: Tensor, orig_im_size: Tensor) -> Tensor:
        """SAM's mask post-processing: to the padded square, crop, to ``(H, W)``."""
        up = F.interpolate(low, size=(self.side, self.side), mode="bilinear", align_corners=False)
        scale = self.side / orig_im_size.max()
        pre = torch.floor(orig_im_size * scale + 0.5).to(torch.int64)
        up = up[..., : pre[0], : pre[1]]
        size = orig_im_size.to(torch.int64)
        # tensors, not ints: the traced graph takes the size from the orig_im_size input
        hw: Any = (size[0], size[1])
        return F.interpolate(up, size=hw, mode="bilinear", align_corners=False)


class SamImageGraph(nn.Module):
    """:meth:`SamDecoderGraph.image_side` as a module of its own (the split export's image
    graph, run once per image embedding)."""

    def __init__(self, graph: SamDecoderGraph) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, image_embeddings: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.graph.image_side(image_embeddings)


class SamPromptGraph(nn.Module):
    """:meth:`SamDecoderGraph.prompt_side` with the image side as four inputs (the split
    export's prompt graph, run per click)."""

    def __init__(self, graph: SamDecoderGraph) -> None:
        super().__init__()
        self.graph = graph

    def forward(
        self,
        image_tokens: Tensor,
        image_keys: Tensor,
        image_values: Tensor,
        image_queries: Tensor,
        point_coords: Tensor,
        point_labels: Tensor,
        mask_input: Tensor,
        has_mask_input: Tensor,
        orig_im_size: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        image = (image_tokens, image_keys, image_values, image_queries)
        return self.graph.prompt_side(
            image, point_coords, point_labels, mask_input, has_mask_input, orig_im_size
        )
