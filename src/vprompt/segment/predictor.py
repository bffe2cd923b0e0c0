"""A ``SamPredictor`` façade: code written for ``segment_anything``'s predictor, unchanged, on
any ``sam:`` model of vprompt (SAM, SAM-HQ, SAM 2, EdgeTAM).

Method names, argument names, defaults, shapes and dtypes follow Meta's ``SamPredictor``:
``set_image`` embeds an ``H x W x 3`` uint8 image once, ``predict`` decodes prompts given in
original-image ``(x, y)`` pixels, ``predict_torch`` decodes batched model-frame tensors
(mapped with ``predictor.transform``). Nothing is computed here that vprompt does not already
compute: embeddings come from :meth:`Segmenter.embed_image`, masks from
:meth:`SamBackbone.decode` and :func:`~vprompt.segment.segmenter.upsample_logits`, so a
prediction equals :meth:`Segmenter.decode` for the same prompts.

Differences from Meta's predictor: the low-res side is the model's own (256 for released
models, 64 for the tiny test models), weights are vprompt weight sources (Hugging Face
safetensors, not Meta's ``.pth`` files), and bad input raises :class:`PredictorInputError`
(a :class:`~vprompt.errors.PromptError` that is also an ``AssertionError``, which is what
Meta's predictor raises for the cases it checks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from vprompt.backbones.sam import SamBackbone
from vprompt.errors import ConfigError, PromptError
from vprompt.prompts.resize import MaskPostprocess, ResizeLongestSide
from vprompt.prompts.spatial import PromptArrays
from vprompt.segment.cache import EmbeddingCache
from vprompt.segment.segmenter import MASK_THRESHOLD, Segmenter, upsample_logits
from vprompt.utils.precision import precision_autocast

_CHUNK = 8  # prompts upsampled at once: bounds the full-resolution float buffer
_META_NAMES = {"vit_b": "vit-base", "vit_l": "vit-large", "vit_h": "vit-huge"}
_NO_IMAGE = "no image is set: call set_image(...) (or set_torch_image(...)) before {what}"


class PredictorInputError(PromptError, AssertionError):
    """Bad input to :class:`SamPredictor`; also an ``AssertionError``, as Meta's predictor
    asserts its inputs."""


def _fail(message: str) -> PredictorInputError:
    return PredictorInputError(message)


class FrameTransform:
    """Meta's ``ResizeLongestSide`` interface over the model's own frame.

    Sizes here are ``(H, W)``, as in ``segment_anything``. For SAM and SAM-HQ the frame is
    resize-longest-side; for SAM 2 and EdgeTAM it is a stretch to the full square.
    """

    def __init__(self, frame: ResizeLongestSide, resample: Any = Image.Resampling.BILINEAR):
        self.frame = frame
        self.target_length = frame.target
        self.resample = resample

    def _size(self, original_size: Any) -> tuple[int, int]:
        try:
            h, w = (int(v) for v in original_size)
        except (TypeError, ValueError):
            raise _fail(f"original_size: expected (H, W), got {original_size!r}") from None
        return w, h

    def get_preprocess_shape(self, oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """``(h', w')`` of an ``oldh x oldw`` image in this frame (``long_side_length`` must be
        the frame's side)."""
        if long_side_length != self.target_length:
            raise _fail(
                f"long_side_length: this model's frame side is {self.target_length}, "
                f"got {long_side_length}"
            )
        new_w, new_h = self.frame.resized_size(int(oldw), int(oldh))
        return new_h, new_w

    def apply_image(self, image: NDArray[np.uint8]) -> NDArray[np.uint8]:
        """``H x W x 3`` uint8 → the resized image (not padded), uint8."""
        arr = _check_image(image)
        h, w = arr.shape[:2]
        new_w, new_h = self.frame.resized_size(w, h)
        resized = Image.fromarray(arr).resize((new_w, new_h), resample=self.resample)
        return np.array(resized)

    def apply_coords(self, coords: NDArray[Any], original_size: Any) -> NDArray[np.float64]:
        """``... x 2`` original-image ``(x, y)`` → the model frame."""
        arr = np.asarray(coords, dtype=np.float64)
        if arr.ndim < 1 or arr.shape[-1] != 2:
            raise _fail(f"coords: expected an array of shape ... x 2, got {arr.shape}")
        out = self.frame.apply_points(arr.reshape(-1, 2), self._size(original_size))
        return out.reshape(arr.shape)

    def apply_boxes(self, boxes: NDArray[Any], original_size: Any) -> NDArray[np.float64]:
        """``... x 4`` original-image boxes ``(x0, y0, x1, y1)`` → the model frame."""
        arr = np.asarray(boxes, dtype=np.float64)
        if arr.ndim < 1 or arr.shape[-1] != 4:
            raise _fail(f"boxes: expected an array of shape ... x 4, got {arr.shape}")
        return self.apply_coords(arr.reshape(-1, 2, 2), original_size).reshape(arr.shape)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: Any) -> torch.Tensor:
        """Tensor version of :meth:`apply_coords` (float32, on the input's device)."""
        out = self.apply_coords(coords.detach().cpu().double().numpy(), original_size)
        return torch.as_tensor(out, dtype=torch.float32, device=coords.device)

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: Any) -> torch.Tensor:
        """Tensor version of :meth:`apply_boxes` (float32, on the input's device)."""
        out = self.apply_boxes(boxes.detach().cpu().double().numpy(), original_size)
        return torch.as_tensor(out, dtype=torch.float32, device=boxes.device)


def _check_image(image: Any) -> NDArray[np.uint8]:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise _fail(f"image: expected an H x W x 3 uint8 numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise _fail(f"image: expected an H x W x 3 array (HWC), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise _fail(f"image: expected dtype uint8 (pixel values 0..255), got {image.dtype}")
    return image


def _numbers(name: str, value: Any, shape_text: str) -> NDArray[np.float64]:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _fail(f"{name}: expected {shape_text} numbers, got {type(value).__name__}") from None
    if not np.isfinite(arr).all():
        raise _fail(f"{name}: values must be finite (got NaN or inf)")
    return arr


def resolve_name(name: str) -> str:
    """``sam:ARCH`` with Meta's model types (``vit_b``, ``vit_l``, ``vit_h``, with or without
    the ``sam:`` prefix) mapped to vprompt's architectures; other names are kept."""
    family, sep, arch = name.partition(":")
    if not sep:
        family, arch = "sam", name
    return f"sam:{_META_NAMES.get(arch, arch)}" if family == "sam" else name


class SamPredictor:
    """Embed an image once, then predict masks for many prompts, with Meta's API.

    Args:
        sam_model: A :class:`~vprompt.segment.segmenter.Segmenter` or a ``sam:`` backbone
            from :func:`~vprompt.backbones.load_backbone` (then no embedding cache is kept
            beyond the current image).

    Attributes:
        model: The backbone (``model.device``, ``model.frame``, ``model.name``).
        segmenter: The :class:`Segmenter` doing the work (its precision and cache apply).
        transform: Meta's ``ResizeLongestSide`` interface over the model's frame.
        is_image_set: Whether an image is set.
        original_size: ``(H, W)`` of the set image.
        input_size: ``(H, W)`` of the image in the model frame, before padding.
        features: The set image's ``1 x C x h x w`` embedding (``get_image_embedding``).
    """

    def __init__(self, sam_model: Segmenter | SamBackbone) -> None:
        if isinstance(sam_model, Segmenter):
            self.segmenter = sam_model
        elif isinstance(sam_model, SamBackbone):
            self.segmenter = Segmenter(sam_model, cache=EmbeddingCache(max_bytes=0))
        else:
            raise ConfigError(
                "SamPredictor: expected a vprompt Segmenter or sam: backbone, got "
                f"{type(sam_model).__name__}"
            )
        self.model = self.segmenter.backbone
        resample = getattr(self.model.image_processor, "resample", None)
        self.transform = FrameTransform(
            self.model.frame, Image.Resampling.BILINEAR if resample is None else resample
        )
        self.reset_image()

    @classmethod
    def from_name(
        cls,
        name: str = "sam:vit-base",
        weights: str | None = None,
        *,
        device: str | torch.device | None = "auto",
        precision: str = "auto",
    ) -> SamPredictor:
        """A predictor for ``sam:ARCH`` (Meta's ``vit_b``/``vit_l``/``vit_h`` are accepted too)."""
        seg = Segmenter.load(
            resolve_name(name),
            weights,
            device=device,
            precision=precision,
            cache=EmbeddingCache(max_bytes=0),
        )
        return cls(seg)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def reset_image(self) -> None:
        """Forget the current image."""
        self.is_image_set = False
        self.features: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None
        self._parts: dict[str, torch.Tensor] | None = None
        self._plan: MaskPostprocess | None = None

    def _set_parts(self, parts: dict[str, torch.Tensor], original: tuple[int, int]) -> None:
        h, w = original
        self._plan = self.model.frame.postprocess_sizes((w, h))
        self._parts = parts
        self.features = parts["embeddings"]
        self.original_size = (h, w)
        self.input_size = self._plan.crop
        self.is_image_set = True

    def set_image(self, image: NDArray[np.uint8] | Image.Image, image_format: str = "RGB") -> None:
        """Embed an ``H x W x 3`` uint8 image (or a PIL image) for the following predictions.

        Args:
            image: Pixels in ``[0, 255]``, HWC.
            image_format: ``RGB`` or ``BGR`` (channels are flipped for BGR, as OpenCV loads).
        """
        if image_format not in ("RGB", "BGR"):
            raise _fail(f"image_format: expected 'RGB' or 'BGR', got {image_format!r}")
        arr = _check_image(image)
        if image_format == "BGR":
            arr = arr[..., ::-1]
        self.reset_image()
        rgb = Image.fromarray(np.ascontiguousarray(arr))
        emb = self.segmenter.embed_image(rgb)
        self._set_parts(emb.parts, (arr.shape[0], arr.shape[1]))

    @torch.no_grad()
    def set_torch_image(
        self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]
    ) -> None:
        """Embed an image already mapped to the model frame with ``predictor.transform``.

        Args:
            transformed_image: ``1 x 3 x h' x w'`` pixels in ``[0, 255]`` (the output of
                ``transform.apply_image``, channels first); its long side is the frame side.
            original_image_size: ``(H, W)`` of the image before the transform.
        """
        side = self.model.frame.target
        shape = tuple(transformed_image.shape)
        if len(shape) != 4 or shape[:2] != (1, 3) or max(shape[2:]) != side:
            raise _fail(
                f"set_torch_image: expected a 1 x 3 x H x W tensor whose long side is {side}, "
                f"got shape {shape}"
            )
        w, h = self.transform._size(original_image_size)
        expected = self.transform.get_preprocess_shape(h, w, side)
        if shape[2:] != expected:
            raise _fail(
                f"set_torch_image: an image of (H, W) = {(h, w)} maps to {expected} in this "
                f"model's frame, got {shape[2:]}"
            )
        pixels = transformed_image[0].permute(1, 2, 0).float().round().clamp(0, 255)
        rgb = Image.fromarray(pixels.to(torch.uint8).cpu().numpy())
        self.reset_image()
        emb = self.segmenter.embed_image(rgb)
        self._set_parts(emb.parts, (h, w))

    def get_image_embedding(self) -> torch.Tensor:
        """The set image's ``1 x C x h x w`` embedding (C = 256, h = w = 64 for released SAM)."""
        if not self.is_image_set or self.features is None:
            raise RuntimeError(_NO_IMAGE.format(what="get_image_embedding()"))
        return self.features

    def predict(
        self,
        point_coords: NDArray[Any] | None = None,
        point_labels: NDArray[Any] | None = None,
        box: NDArray[Any] | None = None,
        mask_input: NDArray[Any] | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[NDArray[Any], NDArray[np.float32], NDArray[np.float32]]:
        """Masks for one object of the set image.

        Args:
            point_coords: N x 2 clicks ``(x, y)`` in original-image pixels.
            point_labels: N labels: 1 foreground, 0 background (-1: an ignored padding point).
            box: A box ``(x0, y0, x1, y1)`` (length 4) in original-image pixels.
            mask_input: ``1 x L x L`` low-res logits from a previous ``predict``.
            multimask_output: Three candidate masks instead of one.
            return_logits: Return the upsampled logits instead of bool masks.

        Returns:
            ``C x H x W`` masks (bool, float32 with ``return_logits``), ``C`` predicted IoU
            (float32) and ``C x L x L`` low-res logits (float32); C is 3 or 1.
        """
        if not self.is_image_set or self.original_size is None:
            raise RuntimeError(_NO_IMAGE.format(what="predict()"))
        coords_t = labels_t = box_t = mask_t = None
        if point_coords is not None:
            if point_labels is None:
                raise _fail("point_labels must be given with point_coords (one label per point)")
            coords = _numbers("point_coords", point_coords, "N x 2")
            if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] == 0:
                raise _fail(f"point_coords: expected an N x 2 array (N >= 1), got {coords.shape}")
            labels = np.asarray(point_labels)
            if labels.shape != (coords.shape[0],):
                raise _fail(
                    f"point_labels: expected shape ({coords.shape[0]},) to match point_coords "
                    f"{coords.shape}, got {labels.shape}"
                )
            coords_t = torch.as_tensor(
                self.transform.apply_coords(coords, self.original_size)[None], dtype=torch.float32
            )
            labels_t = torch.as_tensor(_check_labels(labels)[None])
        if box is not None:
            arr = _numbers("box", box, "4")
            if arr.shape not in ((4,), (1, 4)):
                raise _fail(f"box: expected a length-4 array (x0, y0, x1, y1), got {arr.shape}")
            box_t = torch.as_tensor(
                self.transform.apply_boxes(arr.reshape(1, 4), self.original_size),
                dtype=torch.float32,
            )
        if mask_input is not None:
            side = self.model.frame.low_res
            arr = _numbers("mask_input", mask_input, f"1 x {side} x {side}")
            if arr.shape != (1, side, side):
                raise _fail(
                    f"mask_input: expected the 1 x {side} x {side} low-res logits of a previous "
                    f"predict (e.g. low_res_masks[i][None]), got {arr.shape}"
                )
            mask_t = torch.as_tensor(arr[None], dtype=torch.float32)
        masks, iou, low = self.predict_torch(
            coords_t, labels_t, box_t, mask_t, multimask_output, return_logits=return_logits
        )
        return masks[0].cpu().numpy(), iou[0].cpu().numpy(), low[0].cpu().numpy()

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks for B objects given as model-frame tensors (map them with ``transform``).

        Args:
            point_coords: B x N x 2 model-frame points.
            point_labels: B x N labels.
            boxes: B x 4 model-frame boxes.
            mask_input: B x 1 x L x L low-res logits.
            multimask_output: Three candidate masks per object instead of one.
            return_logits: Return upsampled logits instead of bool masks.

        Returns:
            ``B x C x H x W`` masks, ``B x C`` predicted IoU and ``B x C x L x L`` low-res
            logits, on the model's device.
        """
        if not self.is_image_set or self._parts is None or self._plan is None:
            raise RuntimeError(_NO_IMAGE.format(what="predict_torch()"))
        arrays = self._arrays(point_coords, point_labels, boxes, mask_input)
        seg = self.segmenter
        with precision_autocast(seg.precision, self.device):
            low, iou = self.model.decode(self._parts, arrays, multimask=bool(multimask_output))
        chunks = []
        for start in range(0, low.shape[0], _CHUNK):
            full = upsample_logits(low[start : start + _CHUNK], self._plan)
            chunks.append(full if return_logits else full > MASK_THRESHOLD)
        return torch.cat(chunks), iou, low

    def _arrays(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
    ) -> PromptArrays:
        def as_np(name: str, t: Any, dtype: type) -> Any:
            if not isinstance(t, torch.Tensor):
                raise _fail(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            return t.detach().cpu().numpy().astype(dtype)

        points = labels = box_arr = masks = None
        sizes = []
        if point_coords is not None:
            if point_labels is None:
                raise _fail("point_labels must be given with point_coords (one label per point)")
            points = as_np("point_coords", point_coords, np.float32)
            labels = as_np("point_labels", point_labels, np.int64)
            if points.ndim != 3 or points.shape[2] != 2 or labels.shape != points.shape[:2]:
                raise _fail(
                    "point_coords / point_labels: expected B x N x 2 and B x N, got "
                    f"{points.shape} and {labels.shape}"
                )
            sizes.append(points.shape[0])
        if boxes is not None:
            box_arr = as_np("boxes", boxes, np.float32)
            if box_arr.ndim != 2 or box_arr.shape[1] != 4:
                raise _fail(f"boxes: expected a B x 4 tensor, got {box_arr.shape}")
            sizes.append(box_arr.shape[0])
        if mask_input is not None:
            side = self.model.frame.low_res
            masks = as_np("mask_input", mask_input, np.float32)
            if masks.ndim != 4 or masks.shape[1:] != (1, side, side):
                raise _fail(f"mask_input: expected B x 1 x {side} x {side}, got {masks.shape}")
            sizes.append(masks.shape[0])
        if not sizes:
            raise _fail("predict: give at least one of point_coords, box or mask_input")
        if len(set(sizes)) > 1 or sizes[0] == 0:
            raise _fail(f"prompts disagree on the batch size B (or it is 0): {sizes}")
        assert self._plan is not None
        return PromptArrays(
            points=points,
            labels=labels,
            boxes=box_arr,
            masks=masks,
            original_size=self._plan.original,
            resized_size=self._plan.crop,
        )


def _check_labels(labels: NDArray[Any]) -> NDArray[np.int64]:
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise _fail(f"point_labels: expected integers, got dtype {labels.dtype}")
    if not np.isin(labels, (-1, 0, 1)).all():
        raise _fail(
            "point_labels: expected 1 (foreground), 0 (background) or -1 (ignored), got "
            f"{sorted(set(labels.tolist()))}"
        )
    return labels.astype(np.int64)
