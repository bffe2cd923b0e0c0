"""Batch prediction over image files, reporting each unreadable file without stopping."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vprompt.data.images import DEFAULT_MAX_PIXELS, load_image
from vprompt.errors import ImageLoadError
from vprompt.methods.base import Prediction, PromptMethod, topk_predictions


@dataclass(frozen=True)
class FileResult:
    """The outcome for one input file: predictions, or the reason it failed."""

    path: Path
    predictions: list[Prediction] | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"image": str(self.path), "error": self.error}
        assert self.predictions is not None
        return {
            "image": str(self.path),
            "predictions": [{"label": p.label, "score": p.score} for p in self.predictions],
        }


NON_FINITE = "the model gave non-finite scores (NaN or infinity) for this image"


def predict_files(
    classifier: PromptMethod,
    paths: Sequence[Path],
    *,
    top_k: int = 5,
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 4,
    progress: bool | None = None,
) -> Iterator[FileResult]:
    """Yield one :class:`FileResult` per path, in input order.

    Args:
        classifier: The method that classifies (its ``input_transform(False)`` prepares the
            images, its ``predict_proba`` scores them).
        max_pixels: Files larger than this are reported as errors, not decoded.
    """
    transform = classifier.input_transform(False)

    def prepare(path: Path) -> torch.Tensor | str:
        try:
            return transform(load_image(path, max_pixels=max_pixels))
        except ImageLoadError as exc:
            return exc.reason
        except Exception as exc:  # a decoder bug must not stop the other files
            return f"cannot process image ({type(exc).__name__}: {exc})"

    quiet = progress is False or (progress is None and len(paths) < 64)
    # disable=None lets tqdm hide itself when stderr is not a terminal.
    bar = tqdm(
        total=len(paths),
        desc="images",
        unit="img",
        leave=False,
        disable=True if quiet else (None if progress is None else False),
    )
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start : start + batch_size])
            prepared = list(pool.map(prepare, chunk))
            good = [i for i, x in enumerate(prepared) if isinstance(x, torch.Tensor)]
            results: dict[int, list[Prediction]] = {}
            if good:
                pixels = torch.stack([prepared[i] for i in good])  # type: ignore[misc]
                probs = classifier.predict_proba(pixels)
                finite = torch.isfinite(probs).all(dim=1).tolist()
                for i, preds, ok in zip(
                    good,
                    topk_predictions(probs, classifier.classnames, top_k),
                    finite,
                    strict=True,
                ):
                    if ok:
                        results[i] = preds
                    else:
                        prepared[i] = NON_FINITE
            for i, path in enumerate(chunk):
                item = prepared[i]
                if isinstance(item, str):
                    yield FileResult(path, error=item)
                else:
                    yield FileResult(path, predictions=results[i])
            bar.update(len(chunk))
    bar.close()
