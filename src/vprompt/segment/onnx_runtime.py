"""Decode SAM prompts with ``onnxruntime``: the image encoder stays in PyTorch.

:class:`OnnxSamDecoder` has the decode interface of
:meth:`~vprompt.backbones.sam.SamBackbone.decode`, so a :class:`~vprompt.segment.Segmenter`
built with ``decoder=OnnxSamDecoder(...)`` decodes every object through the exported graph
(:mod:`vprompt.export.sam_onnx`). All objects of one prompt group go through one run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from vprompt.errors import ConfigError, PromptError
from vprompt.export.sam_onnx import (
    IMAGE_TENSORS,
    SamDecoderMeta,
    cache_path,
    export_sam_decoder,
    image_graph_path,
)
from vprompt.prompts.spatial import PromptArrays


def onnx_feeds(arrays: PromptArrays, low_res: int) -> dict[str, NDArray[np.float32]]:
    """Model-frame prompt arrays of B objects → the graph's point / mask inputs.

    Box corners follow the points with labels 2 and 3; without a box, the padding point
    ``(0, 0)`` with label -1 is appended, as SAM's prompt encoder does.
    """
    points, labels, boxes, masks = (
        arrays["points"],
        arrays["labels"],
        arrays["boxes"],
        arrays["masks"],
    )
    n = next((int(a.shape[0]) for a in (points, boxes, masks) if a is not None), 0)
    if n == 0:
        raise PromptError("decode: the prompt arrays hold no points, boxes or masks")
    coords = [np.zeros((n, 0, 2), np.float32)]
    labs = [np.zeros((n, 0), np.float32)]
    if points is not None and labels is not None:
        coords.append(points.astype(np.float32))
        labs.append(labels.astype(np.float32))
    if boxes is not None:
        coords.append(boxes.astype(np.float32).reshape(n, 2, 2))
        labs.append(np.tile(np.array([[2.0, 3.0]], np.float32), (n, 1)))
    elif points is not None:
        coords.append(np.zeros((n, 1, 2), np.float32))
        labs.append(np.full((n, 1), -1.0, np.float32))
    if masks is not None:
        mask_input = masks.astype(np.float32).reshape(n, 1, low_res, low_res)
        has = np.ones(n, np.float32)
    else:
        mask_input = np.zeros((n, 1, low_res, low_res), np.float32)
        has = np.zeros(n, np.float32)
    return {
        "point_coords": np.ascontiguousarray(np.concatenate(coords, axis=1)),
        "point_labels": np.ascontiguousarray(np.concatenate(labs, axis=1)),
        "mask_input": mask_input,
        "has_mask_input": has,
    }


def read_meta(path: Path, *, what: str | None = None) -> SamDecoderMeta:
    """The decoder metadata of an ``.onnx`` file, or a one-line ConfigError."""
    import onnx

    what = what or f"--onnx-decoder {path}"
    if not path.is_file():
        raise ConfigError(f"{what}: no such file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{what}: not a readable ONNX model ({first})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    return SamDecoderMeta.from_props(props, what=what)


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place write counter; inference tensors keep none (-1): they cannot
    be written outside inference mode."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return -1


def _check_meta(meta: SamDecoderMeta, backbone: Any, *, what: str) -> None:
    if meta.model != backbone.name or meta.fingerprint != backbone.fingerprint():
        raise ConfigError(
            f"{what} was exported from {meta.model} (weights {meta.weights}, fingerprint "
            f"{meta.fingerprint}), not from the loaded {backbone.name} (weights "
            f"{backbone.weights}, fingerprint {backbone.fingerprint()}); re-export it"
        )
    if meta.masks != "all":
        raise ConfigError(f"{what}: exported with masks={meta.masks!r}; decoding needs 'all'")


class OnnxSamDecoder:
    """SAM's prompt encoder + mask decoder in ``onnxruntime`` CPU sessions.

    A single-graph export decodes from ``image_embeddings`` on every call. A split export
    (``export_sam_decoder(..., split=True)``, what :meth:`for_backbone` caches) runs its
    image graph once per embedding and keeps the result for the next clicks on the same
    embedding tensor (one entry: another embedding replaces it).

    Args:
        path: An ``.onnx`` file from :func:`~vprompt.export.sam_onnx.export_sam_decoder`
            with ``masks="all"``: a single graph, or the prompt graph of a split export
            (its image graph next to it).
        backbone: The PyTorch backbone whose embeddings it decodes; the file must have been
            exported from the same model and weights (checked against its metadata).
        threads: onnxruntime intra-op threads (None: torch's thread count).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, backbone: Any, threads: int | None = None
    ) -> None:
        self.path = Path(path)
        meta = read_meta(self.path)
        what = f"--onnx-decoder {self.path}"
        _check_meta(meta, backbone, what=what)
        if meta.graph not in ("full", "prompt"):
            raise ConfigError(
                f"{what}: the {meta.graph!r} half of a split export; pass its prompt graph"
            )
        self.meta = meta
        self.backbone = backbone
        self.threads = int(threads or torch.get_num_threads())
        self.session = self._session(self.path, what=what)
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.image_session: Any | None = None
        if meta.graph == "prompt":
            if not meta.image_graph or Path(meta.image_graph).name != meta.image_graph:
                raise ConfigError(f"{what}: its image graph {meta.image_graph!r} is no file name")
            image_path = self.path.parent / meta.image_graph
            image_what = f"{what}: its image graph {image_path}"
            image_meta = read_meta(image_path, what=image_what)
            _check_meta(image_meta, backbone, what=image_what)
            if image_meta.graph != "image":
                raise ConfigError(f"{image_what}: a {image_meta.graph!r} graph, not 'image'")
            self.image_session = self._session(image_path, what=image_what)
        # (embedding tensor, its version, image-side arrays): the tensor is held so that its
        # memory cannot be reused by another embedding while the entry lives
        self._image: tuple[torch.Tensor, int, dict[str, NDArray[np.float32]]] | None = None

    def _session(self, path: Path, *, what: str) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Idle ORT workers would otherwise spin after each run, holding the cores that the
        # post-processing (torch / numpy) needs next.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            return ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{what}: onnxruntime cannot load it ({first})") from None

    @classmethod
    def for_backbone(
        cls,
        backbone: Any,
        *,
        path: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        threads: int | None = None,
    ) -> OnnxSamDecoder:
        """The decoder at ``path``, or the cached low-res export for ``backbone`` (exported
        into ``cache_dir`` on first use, default ``$VPROMPT_CACHE/onnx``)."""
        if path is None:
            base = (
                cache_dir
                or Path(os.environ.get("VPROMPT_CACHE", Path.home() / ".cache" / "vprompt"))
                / "onnx"
            )
            path = cache_path(backbone, base)
            if not (Path(path).is_file() and image_graph_path(path).is_file()):
                export_sam_decoder(backbone, path, masks="all", upscale=False, split=True)
        return cls(path, backbone=backbone, threads=threads)

    def run(
        self,
        embeddings: NDArray[np.float32] | torch.Tensor,
        feeds: dict[str, NDArray[np.float32]],
        orig_size: tuple[int, int] | None = None,
    ) -> list[Any]:
        """Raw session run: ``[iou_predictions, low_res_masks(, masks)]``.

        ``embeddings``: 1 x C x h x w, as an array or (cached across calls with a split
        export) the embedding tensor itself.
        """
        inputs: dict[str, Any] = dict(feeds)
        if self.image_session is None:
            if isinstance(embeddings, torch.Tensor):
                embeddings = embeddings.detach().float().cpu().numpy()
            inputs["image_embeddings"] = np.ascontiguousarray(embeddings, dtype=np.float32)
        else:
            inputs.update(self.image_tensors(embeddings))
        if "orig_im_size" in self.input_names:
            h, w = orig_size or (self.meta.side, self.meta.side)
            inputs["orig_im_size"] = np.array([h, w], np.float32)
        return list(self.session.run(None, inputs))

    def image_tensors(
        self, embeddings: NDArray[np.float32] | torch.Tensor
    ) -> dict[str, NDArray[np.float32]]:
        """The split export's image-graph outputs for ``embeddings`` (1 x C x h x w), reused
        while the same, unmodified embedding tensor comes back."""
        assert self.image_session is not None
        entry = self._image
        tensor = embeddings if isinstance(embeddings, torch.Tensor) else None
        version = _version(tensor) if tensor is not None else -1
        if entry is not None and entry[0] is tensor and entry[1] == version:
            return entry[2]
        if tensor is not None:
            array = tensor.detach().float().cpu().numpy()
        else:
            array = np.asarray(embeddings)
        outs = self.image_session.run(
            None, {"image_embeddings": np.ascontiguousarray(array, dtype=np.float32)}
        )
        image = dict(zip(IMAGE_TENSORS, outs, strict=True))
        if tensor is not None:
            self._image = (tensor, version, image)
        return image

    def decode(
        self,
        parts: dict[str, torch.Tensor],
        arrays: PromptArrays,
        *,
        multimask: bool = True,
        attention_similarity: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as :meth:`SamBackbone.decode`: B x K x L x L logits, B x K IoU.

        PerSAM's guidance is not in the graph: such calls go to the PyTorch decoder.
        """
        if attention_similarity is not None or target_embedding is not None:
            return self.backbone.decode(
                parts,
                arrays,
                multimask=multimask,
                attention_similarity=attention_similarity,
                target_embedding=target_embedding,
            )
        iou, low = self.run(parts["embeddings"], onnx_feeds(arrays, self.meta.low_res))[:2]
        pick = slice(1, None) if multimask else slice(0, 1)
        # views, not copies: callers pick / upsample from them (strides are positive)
        logits = torch.from_numpy(low[:, pick])
        scores = torch.from_numpy(iou[:, pick])
        device = parts["embeddings"].device
        return logits.to(device), scores.to(device)
