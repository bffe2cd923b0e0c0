"""Grounding DINO and MM-Grounding-DINO through ``transformers``: text-grounded detection.

The queries become one caption the way the reference builds it (lower-cased phrases joined
by ``". "``, closed by ``"."``); every decoder query of the model is one candidate box. A
candidate's score is the library's box score — the highest sigmoid token logit over the
whole caption, what ``post_process_grounded_object_detection`` thresholds — and its label is
the query whose own tokens hold the highest logit. Tokens are mapped to queries through the
tokenizer's character offsets, so a word that occurs in two queries is never confused.

Deliberate differences from the references:

- The official demo's ``text_threshold`` only chooses which words of the caption to print
  as a label; here the label is always a whole query, so it has no role.
- MM-Grounding-DINO's own code (mmdetection) scores a (box, phrase) pair by the *mean* of
  the phrase's token probabilities and keeps the top pairs; this module scores every family
  the transformers way (max over tokens, one label per box), so thresholds mean the same for
  both families.

With random weights (``--weights none``) the highest token can be ``[CLS]``, a ``"."`` or
``[SEP]``; the score is still the library's, the label still the best query.

Weight sources: a Hugging Face repo id (``IDEA-Research/grounding-dino-tiny``, also
``hf-hub:ORG/REPO``), a local folder written by ``save_pretrained`` (model and processor),
or ``none`` (deterministic random init from :mod:`vprompt.backbones.grounding_dino_configs`
with vprompt's offline WordPiece tokenizer). Only safetensors checkpoints are read.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from vprompt.backbones.detection import (
    DetectorCapabilities,
    DetectorOutput,
    DetectorSpec,
    Exemplar,
    check_queries,
    register_detector,
)
from vprompt.backbones.grounding_dino_configs import (
    GROUNDING_DINO_ARCHS,
    MAX_TEXT_LEN,
    MM_GROUNDING_DINO_ARCHS,
    MODEL_TYPES,
    TINY_ARCHS,
    GroundingArch,
    GroundingKind,
)
from vprompt.backbones.hf_loading import (
    HubCatalogue,
    load_pretrained,
    load_pretrained_processor,
    random_init,
)
from vprompt.backbones.hf_module import HFBackbone
from vprompt.backbones.hf_tokenizers import wordpiece_tokenizer, wordpiece_vocab_size
from vprompt.backbones.registry import RANDOM_INIT, register_family
from vprompt.errors import PromptError, WeightsError

# The tokens the model splits a caption at ([CLS], [SEP], "." and "?"): transformers hard-codes
# bert-base-uncased's ids for them, so they are set from the tokenizer the model is paired with.
DELIMITERS = ("[CLS]", "[SEP]", ".", "?")

# Caption = [CLS] + per query (its tokens + ".") + [SEP]: one query of 253 tokens, or 127
# queries of one token each.
CAPABILITIES = DetectorCapabilities(
    text=True,
    exemplars=False,
    phrases=True,
    max_queries=(MAX_TEXT_LEN - 2) // 2,
    max_query_tokens=MAX_TEXT_LEN - 3,
)


def model_class(kind: GroundingKind) -> Any:
    """The transformers detection model class of a kind (imports transformers lazily)."""
    import transformers as tf

    if kind == "grounding-dino":
        return tf.GroundingDinoForObjectDetection
    return tf.MMGroundingDinoForObjectDetection


def random_config(kind: GroundingKind, spec: GroundingArch) -> Any:
    """The config of a random-init build: the table's overrides, with a text tower sized for
    the offline WordPiece vocabulary the random-init processor uses."""
    import transformers as tf

    config_cls = tf.GroundingDinoConfig if kind == "grounding-dino" else tf.MMGroundingDinoConfig
    overrides = dict(spec.config)
    overrides["text_config"] = {**overrides["text_config"], "vocab_size": wordpiece_vocab_size()}
    return config_cls(**overrides)


@functools.cache
def _offline_tokenizer() -> Any:
    # Building the 30k-word vocabulary takes seconds; the tokenizer is only read afterwards.
    return wordpiece_tokenizer(max_length=MAX_TEXT_LEN)


def random_init_processor(image_size: tuple[int, int]) -> Any:
    """The processor of a random-init build: the released image pipeline at ``image_size``
    (shortest, longest edge) and vprompt's offline WordPiece tokenizer."""
    import transformers as tf

    shortest, longest = image_size
    images = tf.GroundingDinoImageProcessor(
        size={"shortest_edge": shortest, "longest_edge": longest}
    )
    return tf.GroundingDinoProcessor(image_processor=images, tokenizer=_offline_tokenizer())


def build_caption(queries: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """Queries → the reference caption (``"a cat. a remote."``) and each query's character
    span in it.

    Raises:
        PromptError: A query holding "." or "?" inside it (the model would split it into two
            phrases); trailing ones are dropped, the caption adds its own.
    """
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    start = 0
    for raw in queries:
        phrase = raw.lower().rstrip(". ").strip()
        if not phrase:
            raise PromptError(f"query {raw!r} is empty; expected a word or a phrase")
        if "." in phrase or "?" in phrase:
            raise PromptError(
                f"query {raw!r} holds '.' or '?', which split a Grounding DINO caption into "
                "phrases; expected one phrase without them"
            )
        parts.append(phrase)
        spans.append((start, start + len(phrase)))
        start += len(phrase) + 2  # the ". " after it
    return ". ".join(parts) + ".", spans


def token_owners(offsets: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Which query each token belongs to, from the tokenizer's character offsets.

    Args:
        offsets: T x 2 ``(start, end)`` character offsets; special tokens have ``(0, 0)``.
        spans: Each query's ``(start, end)`` in the caption.

    Returns:
        T int64: the query index, or -1 for special tokens and the "." separators.
    """
    owners = torch.full((offsets.shape[0],), -1, dtype=torch.long)
    start, end = offsets[:, 0], offsets[:, 1]
    real = end > start
    for k, (s, e) in enumerate(spans):
        owners[real & (start >= s) & (end <= e)] = k
    return owners


def grounded_candidates(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    owners: torch.Tensor,
    num_queries: int,
    image_size: tuple[int, int],
) -> DetectorOutput:
    """One candidate per decoder query.

    Args:
        logits: Q x L token logits (``-inf`` past the caption).
        pred_boxes: Q x 4 ``cx, cy, w, h`` relative to the image.
        owners: T query index per caption token (:func:`token_owners`), T <= L.
        num_queries: K text queries.
        image_size: ``(W, H)`` of the original image.
    """
    probs = logits.float().sigmoid()  # Q x L
    scores = probs.max(dim=-1).values
    tokens = probs[:, : owners.shape[0]]  # Q x T
    member = owners[None, :] == torch.arange(num_queries, device=owners.device)[:, None]  # K x T
    member = member.to(tokens.device)
    per_query = torch.where(member[None], tokens[:, None, :], -1.0).amax(dim=-1)  # Q x K
    labels = per_query.argmax(dim=-1)
    w, h = image_size
    cx, cy, bw, bh = pred_boxes.float().unbind(-1)
    # The library's centre → corners conversion, then its scaling, then a clip to the image.
    corners = torch.stack([cx - 0.5 * bw, cy - 0.5 * bh, cx + 0.5 * bw, cy + 0.5 * bh], dim=-1)
    scale = torch.tensor([w, h, w, h], dtype=corners.dtype, device=corners.device)
    boxes = corners * scale
    limit = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
    boxes = torch.minimum(boxes.clamp(min=0), limit)
    return DetectorOutput(boxes=boxes.cpu(), scores=scores.cpu(), labels=labels.cpu())


class GroundingDinoBackbone(HFBackbone):
    """A frozen text-grounded detector (Grounding DINO or MM-Grounding-DINO).

    Shapes: Q decoder queries (900 for released models), L = 256 caption tokens.

    Attributes:
        name: ``grounding-dino:ARCH`` or ``mm-grounding-dino:ARCH``.
        weights: The weight source it was built from.
        capabilities: Text queries grounded as phrases of one caption; no exemplars.
        processor: The model's ``GroundingDinoProcessor`` (image pipeline and tokenizer).
    """

    capabilities = CAPABILITIES

    def __init__(self, *, model: nn.Module, processor: Any, name: str, weights: str) -> None:
        super().__init__(model=model, name=name, weights=weights)
        self.processor = processor
        config: Any = model.config
        self.max_text_len = int(config.max_text_len)
        ids = processor.tokenizer.convert_tokens_to_ids(list(DELIMITERS))
        unk = processor.tokenizer.unk_token_id
        if any(i is None or i == unk for i in ids):
            raise WeightsError(f"{weights}: {name}'s tokenizer lacks one of {list(DELIMITERS)}")
        inner: Any = model.model
        with torch.no_grad():
            inner.special_tokens.copy_(torch.tensor(ids, dtype=torch.long))

    def encode_caption(
        self, queries: Sequence[str]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Queries → the tokenized caption (1 x T tensors) and each token's query (T).

        Raises:
            PromptError: A query with no tokens, or a caption longer than the model reads
                (naming the first query that does not fit).
        """
        caption, spans = build_caption(queries)
        enc = self.processor.tokenizer(
            caption,
            return_offsets_mapping=True,
            return_token_type_ids=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        offsets = enc.pop("offset_mapping")[0]
        owners = token_owners(offsets, spans)
        for k, q in enumerate(queries):
            if not bool((owners == k).any()):
                raise PromptError(f"query {q!r} has no tokens the model knows")
        length = int(enc["input_ids"].shape[1])
        if length > self.max_text_len:
            # The first query whose tokens, its "." and the closing [SEP] pass the limit.
            last = [int(torch.nonzero(owners == k).max()) for k in range(len(queries))]
            k = next(i for i, t in enumerate(last) if t + 3 > self.max_text_len)
            raise PromptError(
                f"query {queries[k]!r} does not fit {self.name}'s {self.max_text_len}-token "
                f"caption (the {len(queries)} queries take {length} tokens joined as "
                "'a. b.'); pass fewer or shorter queries per call"
            )
        return {key: value for key, value in enc.items()}, owners

    @torch.inference_mode()
    def detect(
        self,
        image: Image.Image,
        *,
        queries: Sequence[str] = (),
        exemplars: Sequence[Exemplar] = (),
    ) -> DetectorOutput:
        """Score every decoder query's box against the text queries.

        Returns:
            Q candidates: boxes in ``image``'s pixels (clipped), the library's box scores, and
            the query each box grounds (the one holding its highest token).

        Raises:
            PromptError: Exemplars given, no queries, or queries the caption cannot hold.
        """
        if exemplars:
            raise PromptError(f"{self.name} takes no exemplars; it finds objects from text queries")
        cleaned = check_queries(queries, self.capabilities, name=self.name)
        if not cleaned:
            raise PromptError(f"{self.name} needs at least one text query")
        text, owners = self.encode_caption(cleaned)
        rgb = image.convert("RGB")
        pixels = self.processor.image_processor(images=[rgb], return_tensors="pt")
        device = self.device
        dtype = next(self.model.parameters()).dtype
        out = self.model(
            pixel_values=pixels["pixel_values"].to(device, dtype),
            pixel_mask=pixels["pixel_mask"].to(device),
            **{key: value.to(device) for key, value in text.items()},
        )
        return grounded_candidates(
            out.logits[0], out.pred_boxes[0], owners.to(device), len(cleaned), rgb.size
        )


# ---------------------------------------------------------------------------- building


def _family_parts(family: str, kind: GroundingKind, archs: dict[str, GroundingArch]) -> Any:
    catalogue = HubCatalogue(archs)

    def random_model(arch: str) -> nn.Module:
        return random_init(
            f"{family}:{arch}", lambda: random_config(kind, archs[arch]), model_class(kind)
        )

    def pretrained_model(arch: str, weights: str) -> nn.Module:
        return load_pretrained(
            f"{family}:{arch}",
            weights,
            model_cls=model_class(kind),
            model_type=MODEL_TYPES[kind],
            tags=catalogue.list_tags(arch),
        )

    def build(arch: str, weights: str, device: torch.device) -> GroundingDinoBackbone:
        import transformers as tf

        name = f"{family}:{arch}"
        model = catalogue.model(
            family, arch, weights, random=random_model, pretrained=pretrained_model
        )
        if weights == RANDOM_INIT:
            processor = random_init_processor(archs[arch].image_size)
        else:
            processor = load_pretrained_processor(name, weights, tf.GroundingDinoProcessor)
        backbone = GroundingDinoBackbone(
            model=model.eval(), processor=processor, name=name, weights=weights
        )
        return backbone.to(device)

    return catalogue, build


_GD_CATALOGUE, build_grounding_dino = _family_parts(
    "grounding-dino", "grounding-dino", GROUNDING_DINO_ARCHS
)
_MM_CATALOGUE, build_mm_grounding_dino = _family_parts(
    "mm-grounding-dino", "mm-grounding-dino", MM_GROUNDING_DINO_ARCHS
)

GROUNDING_DINO_FAMILY = register_family(
    _GD_CATALOGUE.family(
        "grounding-dino",
        "Grounding DINO text-grounded detectors from transformers (IDEA-Research)",
        build=build_grounding_dino,
        tiny=TINY_ARCHS,
    )
)
MM_GROUNDING_DINO_FAMILY = register_family(
    _MM_CATALOGUE.family(
        "mm-grounding-dino",
        "MM-Grounding-DINO and LLMDet text-grounded detectors from transformers",
        build=build_mm_grounding_dino,
        tiny=TINY_ARCHS,
    )
)

register_detector(
    DetectorSpec(
        family="grounding-dino",
        description="Grounding DINO: phrases and referring expressions grounded in one caption",
        capabilities=CAPABILITIES,
        default_model="grounding-dino:swin-t",
        tiny_model="grounding-dino:tiny",
        # The official demo's and transformers' example box threshold; DETR-style set
        # prediction needs no NMS (neither reference applies one).
        score_threshold=0.35,
        nms_iou=1.0,
    )
)
register_detector(
    DetectorSpec(
        family="mm-grounding-dino",
        description="MM-Grounding-DINO / LLMDet: phrases grounded in one caption",
        capabilities=CAPABILITIES,
        default_model="mm-grounding-dino:swin-t",
        tiny_model="mm-grounding-dino:tiny",
        # mmdetection's demo default (pred_score_thr); no NMS in its Grounding DINO head.
        score_threshold=0.3,
        nms_iou=1.0,
    )
)
