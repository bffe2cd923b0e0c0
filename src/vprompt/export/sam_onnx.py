"""Export SAM's prompt encoder + mask decoder to ONNX (segment-anything's web-demo contract).

The graph is :class:`~vprompt.export.sam_decoder_graph.SamDecoderGraph`; the image encoder
stays in PyTorch. The file's ``metadata_props`` record what it was exported from, so a
runtime refuses a decoder that does not match its backbone (see
:mod:`vprompt.segment.onnx_runtime`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vprompt.errors import ConfigError
from vprompt.export.onnx_graph import trace_to_onnx
from vprompt.export.sam_decoder_graph import (
    MaskSelection,
    SamDecoderGraph,
    SamImageGraph,
    SamPromptGraph,
)
from vprompt.utils.io import atomic_path

FORMAT = "vprompt.sam-decoder/1"
DEFAULT_OPSET = 17
IMAGE_TENSORS = ("image_tokens", "image_keys", "image_values", "image_queries")
"""The split export's image-graph outputs, its prompt graph's first inputs."""


@dataclass(frozen=True, kw_only=True)
class SamDecoderMeta:
    """What an exported decoder was made from (stored as ONNX ``metadata_props``).

    Attributes:
        model: ``sam:ARCH``.
        weights: The weight source.
        fingerprint: The backbone's weights fingerprint.
        side: Model input side S (coordinates live in the S x S frame).
        low_res: Side of ``low_res_masks``.
        masks: ``all`` (K = 4) or ``best`` (K = 1).
        upscale: Whether the graph also outputs ``masks`` at ``orig_im_size``.
        vprompt: Version that exported it.
        graph: ``full`` (SAM's web-demo contract), or one half of a split export:
            ``image`` (image embedding → image tensors, run once per embedding) or
            ``prompt`` (those tensors + prompts → outputs, run per click).
        image_graph: For ``prompt``: the file name of its image graph (same folder).
    """

    model: str
    weights: str
    fingerprint: str
    side: int
    low_res: int
    masks: str
    upscale: bool
    vprompt: str
    graph: str = "full"
    image_graph: str = ""

    def props(self) -> dict[str, str]:
        extra = {"image_graph": self.image_graph} if self.image_graph else {}
        return {
            "graph": self.graph,
            **extra,
            "format": FORMAT,
            "model": self.model,
            "weights": self.weights,
            "fingerprint": self.fingerprint,
            "side": str(self.side),
            "low_res": str(self.low_res),
            "masks": self.masks,
            "upscale": json.dumps(self.upscale),
            "vprompt": self.vprompt,
        }

    @classmethod
    def from_props(cls, props: dict[str, str], *, what: str) -> SamDecoderMeta:
        if props.get("format") != FORMAT:
            raise ConfigError(
                f"{what}: not a vprompt SAM decoder (metadata format {props.get('format')!r}, "
                f"expected {FORMAT!r}); export one with `vprompt export onnx`"
            )
        try:
            return cls(
                model=props["model"],
                weights=props["weights"],
                fingerprint=props["fingerprint"],
                side=int(props["side"]),
                low_res=int(props["low_res"]),
                masks=props["masks"],
                upscale=bool(json.loads(props["upscale"])),
                vprompt=props["vprompt"],
                graph=props.get("graph", "full"),
                image_graph=props.get("image_graph", ""),
            )
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"{what}: incomplete decoder metadata ({exc})") from None


def decoder_meta(backbone: Any, *, masks: str, upscale: bool) -> SamDecoderMeta:
    """The metadata a decoder exported from ``backbone`` carries."""
    import vprompt

    return SamDecoderMeta(
        model=backbone.name,
        weights=str(backbone.weights),
        fingerprint=backbone.fingerprint(),
        side=int(backbone.frame.target),
        low_res=int(backbone.frame.low_res),
        masks=masks,
        upscale=upscale,
        vprompt=vprompt.__version__,
    )


def image_graph_path(path: str | os.PathLike[str]) -> Path:
    """Where a split export puts the image graph of the prompt graph at ``path``."""
    target = Path(path)
    return target.with_name(f"{target.stem}.image{target.suffix or '.onnx'}")


def export_sam_decoder(
    backbone: Any,
    path: str | os.PathLike[str],
    *,
    masks: MaskSelection = "all",
    upscale: bool = True,
    opset: int = DEFAULT_OPSET,
    split: bool = False,
) -> SamDecoderMeta:
    """Write ``backbone``'s prompt encoder + mask decoder to ``path`` (atomically).

    Args:
        backbone: A :class:`~vprompt.backbones.sam.SamBackbone` of kind ``sam``.
        path: The ``.onnx`` file to write.
        masks: ``all``: the 4 masks per object (0: single-mask output, 1..3: candidates);
            ``best``: one, chosen like SAM's ``return_single_mask``.
        upscale: Also output ``masks`` upsampled to ``orig_im_size`` (SAM's web demo
            contract); without it the graph needs no ``orig_im_size`` and returns low-res only.
        opset: ONNX opset (>= 17).
        split: Write two graphs instead of one: at ``path`` the prompt graph, whose inputs
            are ``image_tokens`` (1 x HW x C), ``image_keys`` / ``image_values`` /
            ``image_queries`` (1 x heads x HW x d) in place of ``image_embeddings``, plus
            the usual prompt inputs and outputs; next to it (:func:`image_graph_path`) the
            image graph, ``image_embeddings`` → those four tensors. The image graph runs
            once per embedding and the prompt graph once per click (what
            :class:`~vprompt.segment.onnx_runtime.OnnxSamDecoder` does with it); the
            outputs equal the single graph's up to float rounding.

    Returns:
        The metadata written into the file (the prompt graph's with ``split``).

    Raises:
        ConfigError: A backbone other than SAM / an opset below 17.
    """
    if getattr(backbone, "kind", None) != "sam":
        raise ConfigError(
            f"ONNX export covers sam:vit-* decoders; {getattr(backbone, 'name', backbone)} is "
            f"{getattr(backbone, 'kind', 'not a SAM backbone')}"
        )
    if opset < 17:
        raise ConfigError(f"opset: expected >= 17, got {opset}")
    meta = decoder_meta(backbone, masks=masks, upscale=upscale)
    graph = SamDecoderGraph(model=backbone.model, masks=masks, upscale=upscale).cpu().float()
    graph.eval()
    c = int(backbone.model.config.mask_decoder_config.hidden_size)
    e = meta.low_res // 4
    embeddings = torch.randn(1, c, e, e)
    prompt_inputs: list[torch.Tensor] = [
        torch.randint(0, meta.side, (2, 3, 2)).float(),
        torch.tensor([[1.0, 0.0, -1.0], [1.0, 2.0, 3.0]]),
        torch.randn(2, 1, meta.low_res, meta.low_res),
        torch.tensor([1.0, 0.0]),
    ]
    prompt_names = ["point_coords", "point_labels", "mask_input", "has_mask_input"]
    dynamic: dict[str, dict[int, str]] = {
        "point_coords": {0: "objects", 1: "points"},
        "point_labels": {0: "objects", 1: "points"},
        "mask_input": {0: "objects"},
        "has_mask_input": {0: "objects"},
        "iou_predictions": {0: "objects"},
        "low_res_masks": {0: "objects"},
    }
    outputs = ["iou_predictions", "low_res_masks"]
    if upscale:
        prompt_inputs.append(torch.tensor([480.0, 640.0]))
        prompt_names.append("orig_im_size")
        outputs.append("masks")
        dynamic["masks"] = {0: "objects", 2: "height", 3: "width"}
    if not split:
        _write(
            graph, [embeddings, *prompt_inputs], path, meta,
            names=["image_embeddings", *prompt_names], outputs=outputs, dynamic=dynamic,
            opset=opset,
        )  # fmt: skip
        return meta
    image_path = image_graph_path(path)
    with torch.no_grad():
        image = graph.image_side(embeddings)
    _write(
        SamImageGraph(graph), [embeddings], image_path, replace(meta, graph="image"),
        names=["image_embeddings"], outputs=list(IMAGE_TENSORS), dynamic={}, opset=opset,
    )  # fmt: skip
    prompt_meta = replace(meta, graph="prompt", image_graph=image_path.name)
    _write(
        SamPromptGraph(graph), [*image, *prompt_inputs], path, prompt_meta,
        names=[*IMAGE_TENSORS, *prompt_names], outputs=outputs, dynamic=dynamic, opset=opset,
    )  # fmt: skip
    return prompt_meta


def _write(
    module: torch.nn.Module,
    inputs: list[torch.Tensor],
    path: str | os.PathLike[str],
    meta: SamDecoderMeta,
    *,
    names: list[str],
    outputs: list[str],
    dynamic: dict[str, dict[int, str]],
    opset: int,
) -> None:
    """Trace ``module`` to an ONNX file at ``path`` (atomically) carrying ``meta``."""
    import onnx

    model = trace_to_onnx(
        module,
        inputs,
        input_names=names,
        output_names=outputs,
        dynamic_axes=dynamic,
        opset=opset,
        props=meta.props(),
    )
    with atomic_path(Path(path)) as tmp:
        onnx.save(model, str(tmp))


def cache_path(backbone: Any, cache_dir: str | os.PathLike[str]) -> Path:
    """Where the runtime's low-res split decoder (prompt graph) for ``backbone`` is cached."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", backbone.name)
    return Path(cache_dir) / f"{safe}-{backbone.fingerprint()}-lowres-split.onnx"
