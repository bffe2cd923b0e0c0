"""Referring expressions with a frozen CLIP: mark each candidate, score the marked images.

Zero-shot referring expression comprehension (which of these regions does "the dog on the
left" mean?) as in Shtedritski, Rupprecht, Vedaldi, "What does CLIP know about a red
circle? Visual prompt engineering for VLMs" (ICCV 2023) and Yang et al., "Fine-Grained
Visual Prompting" (FGVP, NeurIPS 2023). Given candidate regions (a detector's boxes, SAM's
masks, or boxes drawn by hand):

1. Draw each candidate into its own copy of the image with a marker
   (:mod:`vprompt.detect.markers`; the red circle by default, FGVP's ``blur`` with masks).
2. Encode every marked image with the frozen CLIP, through its own preprocessing
   (``clip.transform``), in batches; encode ``"a photo of <expression>"`` (the text
   template of the FGVP code, ``--text_prompt 'a photo of <caption>'``, lower-cased there).
3. Score = logit scale × cosine similarity of each marked image with the expression.
4. Subtraction (the paper's bias removal): some candidates score high whatever the text
   says (large regions, salient objects, a circle in a busy spot). The paper removes this
   by subtracting, from each marked image's score, that *same image's* mean score over a
   set of unrelated ("negative") referring expressions; FGVP's code does exactly this with
   500 expressions sampled from the dataset's other captions
   (``pos - logits[1:].mean(0)``). Subtracting a per-candidate term is what matters: a
   per-expression constant would not change the softmax. Without a dataset at hand the
   default negatives here are :data:`NEGATIVE_EXPRESSIONS`, generic RefCOCO-style
   expressions; pass the expressions of your own data as ``negatives`` to follow the
   paper exactly. The paper's best setting uses it, so it is on by default.
5. The candidates' scores are summed over markers and CLIP models when several are given
   (the paper ensembles ViT-L/14@336px and RN50x16; FGVP sums several marks), and a softmax
   over candidates gives probabilities; the best candidate is the argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from vprompt.backbones.clip import ClipBackbone
from vprompt.detect.markers import Marker, Region, get_marker
from vprompt.detect.result import Detections
from vprompt.errors import PromptError

TEMPLATE = "a photo of {}"
MAX_CANDIDATES = 1000

# Unrelated referring expressions whose mean score estimates each marked image's bias
# (written for vprompt in the style of RefCOCO / RefCOCO+ / RefCOCOg).
NEGATIVE_EXPRESSIONS: tuple[str, ...] = (
    "the man on the left",
    "woman in the middle",
    "the person on the right",
    "child in a red shirt",
    "the tall guy in the back",
    "a black dog lying down",
    "the cat on the sofa",
    "the white car parked on the street",
    "bus in the background",
    "the bicycle leaning on the wall",
    "the wooden chair near the table",
    "the bottle on the left side",
    "a slice of pizza closest to us",
    "the cup of coffee",
    "bowl with salad",
    "the laptop screen",
    "the umbrella in the top right corner",
    "a horse standing in the field",
    "the elephant on the far right",
    "the bird on the branch",
    "the green plant in a pot",
    "the bed with white sheets",
    "the clock on the wall",
    "the surfboard in the water",
    "the sandwich on the plate",
    "a teddy bear",
    "the skateboard under his foot",
    "the giraffe eating leaves",
    "the boat near the shore",
    "the sign above the door",
    "bottom left corner",
    "the blue one",
)


@dataclass(frozen=True, eq=False)
class RankResult:
    """How well each candidate region matches the expression.

    Shapes: N candidates.

    Attributes:
        scores: N float32: the final score (logit scale × cosine similarity, minus the
            candidate's mean over the negatives with subtraction), summed over markers and
            models; what the softmax and the ranking use.
        probs: N float32 softmax of ``scores`` over the candidates.
        best: Index of the best candidate.
        logits: N float32: the scores before subtraction.
        bias: N float32: what subtraction removed (0 without it).
        expression: The expression as scored (whitespace normalised, before the template).
        markers: The markers' names, in the order their scores were summed.
        marked: The marked images, per marker then per candidate, when asked for.
    """

    scores: NDArray[np.float32]
    probs: NDArray[np.float32]
    best: int
    logits: NDArray[np.float32]
    bias: NDArray[np.float32]
    expression: str
    markers: tuple[str, ...]
    marked: tuple[tuple[Image.Image, ...], ...] | None = None

    def order(self) -> NDArray[np.int64]:
        """Candidate indices, best first (ties: input order)."""
        return np.argsort(-self.scores, kind="stable").astype(np.int64)

    def to_records(self, regions: Sequence[Region] | None = None) -> list[dict[str, Any]]:
        """One JSON-ready dict per candidate, best first: ``index``, ``score``, ``prob``,
        ``logit``, ``bias`` and, with ``regions``, its ``box``."""
        out = []
        for i in self.order():
            rec: dict[str, Any] = {
                "index": int(i),
                "score": round(float(self.scores[i]), 6),
                "prob": round(float(self.probs[i]), 6),
                "logit": round(float(self.logits[i]), 6),
                "bias": round(float(self.bias[i]), 6),
            }
            if regions is not None:
                rec["box"] = [round(v, 2) for v in regions[int(i)].box]
            out.append(rec)
        return out


# ------------------------------------------------------------------------------- regions


def regions_from_boxes(
    boxes: Any, *, masks: Any = None, image_size: tuple[int, int] | None = None
) -> list[Region]:
    """Regions from N x 4 ``x0, y0, x1, y1`` boxes, optionally with N x H x W masks.

    Args:
        boxes: N x 4 array-like of pixel boxes.
        masks: N x H x W bool masks, or None.
        image_size: ``(W, H)``: check every region against that image.

    Raises:
        PromptError: Not N x 4, a mask count that differs, or (with ``image_size``) a region
            outside the image.
    """
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        arr = arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise PromptError(f"boxes: expected N x 4 numbers X0,Y0,X1,Y1, got shape {arr.shape}")
    mask_list: list[Any] = [None] * len(arr)
    if masks is not None:
        m = np.asarray(masks)
        if m.ndim != 3 or m.shape[0] != len(arr):
            raise PromptError(
                f"masks: expected {len(arr)} x H x W for {len(arr)} boxes, got {m.shape}"
            )
        mask_list = list(m)
    regions = [
        Region(box=(b[0], b[1], b[2], b[3]), mask=mk)
        for b, mk in zip(arr.tolist(), mask_list, strict=True)
    ]
    if image_size is not None:
        for i, r in enumerate(regions):
            r.check(image_size, what=f"region {i}")
    return regions


def regions_from_detections(detections: Detections) -> list[Region]:
    """One region per detection, with its mask when the detections carry masks.

    Boxes are clipped to the image first (detectors may round a box a hair past it).
    """
    w, h = detections.image_size
    boxes = np.asarray(detections.boxes, dtype=np.float64).reshape(-1, 4).copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    return regions_from_boxes(boxes, masks=detections.masks, image_size=(w, h))


# ------------------------------------------------------------------------------- scoring


def check_expression(clip: ClipBackbone, text: str, *, what: str = "expression") -> str:
    """Whitespace-normalised ``text``; refuses empty text and text longer than CLIP's
    context (after the template and the start/end tokens)."""
    if not isinstance(text, str):
        raise PromptError(f"{what}: expected text, got {type(text).__name__}")
    cleaned = " ".join(text.split())
    if not cleaned:
        raise PromptError(f"{what} {text!r} is empty; expected a referring expression")
    n = _token_count(clip, TEMPLATE.format(cleaned))
    if n > clip.context_length:
        raise PromptError(
            f"{what} {cleaned[:40]!r}… has {n} tokens with its template; "
            f"{clip.name} reads at most {clip.context_length}"
        )
    return cleaned


def _token_count(clip: ClipBackbone, text: str) -> int:
    """Tokens of ``text`` with start and end tokens, counted past the context length where
    the tokenizer allows it (open_clip's tokenize truncates silently)."""
    encode = getattr(getattr(clip, "_tokenizer", None), "encode", None)
    if callable(encode):
        try:
            return len(encode(text)) + 2
        except Exception:  # a tokenizer whose encode takes other arguments
            pass
    tokens = clip.tokenize([text])
    eot = int(clip.eot_index(tokens)[0])
    # A prompt that fills the whole context may have been cut: count it as too long.
    return eot + 1 if eot + 1 < clip.context_length else clip.context_length + 1


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@torch.no_grad()
def encode_marked(
    clip: ClipBackbone, images: Sequence[Image.Image], *, batch_size: int = 32
) -> torch.Tensor:
    """N x D unit-norm CLIP features of images, through the model's own preprocessing."""
    device = clip.logit_scale.device
    feats = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([clip.transform(im) for im in images[start : start + batch_size]])
        feats.append(_normalise(clip.encode_image(pixels.to(device)).float()))
    return torch.cat(feats)


@torch.no_grad()
def encode_texts(clip: ClipBackbone, texts: Sequence[str]) -> torch.Tensor:
    """T x D unit-norm CLIP features of ``TEMPLATE``-filled texts."""
    tokens = clip.tokenize([TEMPLATE.format(t) for t in texts])
    return _normalise(clip.encode_text(tokens).float())


def rank_regions(
    clip: ClipBackbone | Sequence[ClipBackbone],
    image: Image.Image,
    expression: str,
    regions: Sequence[Region],
    *,
    marker: str | Marker | Sequence[str | Marker] = "red-circle",
    subtract: bool = True,
    negatives: Sequence[str] | None = None,
    batch_size: int = 32,
    keep_marked: bool = False,
) -> RankResult:
    """Rank candidate regions for a referring expression with a frozen CLIP.

    Args:
        clip: A CLIP backbone, or several whose scores are summed (the paper's ensemble).
        image: The image (W x H, any PIL mode).
        expression: What to find, e.g. ``"the man in the red shirt"``.
        regions: N candidates (see :func:`regions_from_boxes`,
            :func:`regions_from_detections`).
        marker: A marker name or ``+``-combination drawn on one image (``"red-circle"``,
            ``"blur"``, ``"red-circle+blur"``), a :class:`Marker`, or a sequence of those
            scored as separate images whose scores are summed (FGVP's mark ensembles).
        subtract: Subtract each marked image's mean score over ``negatives`` (the paper's
            bias removal).
        negatives: Unrelated expressions for the subtraction (default:
            :data:`NEGATIVE_EXPRESSIONS`); ideally other expressions from your data.
        batch_size: Marked images per image-encoder call (results do not depend on it
            beyond float rounding).
        keep_marked: Return the marked images too.

    Returns:
        Scores, probabilities and the best candidate.

    Raises:
        PromptError: No candidates or more than :data:`MAX_CANDIDATES`, an empty expression
            or one longer than CLIP's context, a region outside the image, an empty
            negative list, or a batch size below 1.
    """
    models = [clip] if isinstance(clip, ClipBackbone) else list(clip)
    if not models:
        raise PromptError("rank_regions: expected at least one CLIP model")
    if not isinstance(image, Image.Image):
        raise PromptError(f"rank_regions: expected a PIL image, got {type(image).__name__}")
    if not regions:
        raise PromptError("rank_regions: no candidate regions; expected at least one box")
    if len(regions) > MAX_CANDIDATES:
        raise PromptError(
            f"rank_regions: {len(regions)} candidates; expected at most {MAX_CANDIDATES}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PromptError(f"batch size: expected an integer >= 1, got {batch_size!r}")
    specs = [marker] if isinstance(marker, str | Marker) else list(marker)
    if not specs:
        raise PromptError("rank_regions: expected at least one marker")
    markers = [get_marker(s) for s in specs]
    rgb = image.convert("RGB")
    for i, region in enumerate(regions):
        if not isinstance(region, Region):
            raise PromptError(f"rank_regions: candidate {i} is a {type(region).__name__}")
        region.check(rgb.size, what=f"candidate {i}")
    expression = check_expression(models[0], expression)
    for other in models[1:]:
        check_expression(other, expression)
    negs = list(NEGATIVE_EXPRESSIONS if negatives is None else negatives)
    if subtract:
        if not negs:
            raise PromptError("rank_regions: subtraction needs at least one negative expression")
        negs = [check_expression(models[0], t, what="negative expression") for t in negs]

    texts = [
        encode_texts(model, [expression, *negs] if subtract else [expression]) for model in models
    ]  # per model: (1 + Q) x D
    scales = [float(model.logit_scale) for model in models]
    n = len(regions)
    logits = torch.zeros(n, dtype=torch.float64)
    bias = torch.zeros(n, dtype=torch.float64)
    kept: list[tuple[Image.Image, ...]] = []
    for mk in markers:
        rendered: list[Image.Image] = []
        # One batch of marked images at a time: N full-size copies of a large photo would
        # not fit in memory.
        for start in range(0, n, batch_size):
            batch = [mk.render(rgb, r) for r in regions[start : start + batch_size]]
            for model, text, scale in zip(models, texts, scales, strict=True):
                feats = encode_marked(model, batch, batch_size=batch_size)
                sims = (scale * feats @ text.T).double().cpu()  # b x (1 + Q)
                logits[start : start + len(batch)] += sims[:, 0]
                if subtract:
                    bias[start : start + len(batch)] += sims[:, 1:].mean(dim=1)
            if keep_marked:
                rendered.extend(batch)
        kept.append(tuple(rendered))
    scores = (logits - bias).numpy().astype(np.float32)
    probs = torch.softmax(logits - bias, dim=0)
    return RankResult(
        scores=scores,
        probs=probs.numpy().astype(np.float32),
        best=int(np.argmax(scores)),  # the first of equal scores, as order() ranks them
        logits=logits.numpy().astype(np.float32),
        bias=bias.numpy().astype(np.float32),
        expression=expression,
        markers=tuple(m.name for m in markers),
        marked=tuple(kept) if keep_marked else None,
    )
