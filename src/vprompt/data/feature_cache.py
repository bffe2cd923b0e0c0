"""An on-disk, memory-mapped cache of frozen image features (DESIGN.md: never recompute what is
frozen).

A cache *space* holds one kind of feature of one frozen encoder under one exact preprocessing and
one augmentation view. Its :class:`FeatureKey` (feature kind, backbone name, weight source,
weight fingerprint, preprocessing, view, numeric precision) and the storage dtype are hashed to
the folder ``root/<sha256[:2]>/<sha256>/`` (layout and crash safety:
:mod:`vprompt.data.feature_store`). Any change of the key lands in another space: that is the
invalidation. Rows are keyed by the dataset's ``identity(index)``, a string that changes when
the image changes, so an edited image is simply a new row; only missing rows are ever encoded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import re
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from vprompt.data.feature_store import FORMAT_VERSION, CacheDtype, FeatureSpace, MemorySpace
from vprompt.errors import WeightsError, describe_os_error
from vprompt.utils import jsonio

# Rows encoded between two index updates: bounds the work an interruption loses without
# rewriting a large index after every batch.
_FLUSH_ROWS = 4096
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class ImageItems(Protocol):
    """Indexable (image, label) pairs."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Image.Image, int]: ...


class IdentifiedDataset(Protocol):
    """A dataset whose images have stable identities (what the cache keys rows by)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Image.Image, int]: ...

    def identity(self, index: int) -> str:
        """A key that changes whenever image ``index`` changes."""
        ...


def has_identity(data: Any) -> bool:
    """Whether ``data`` exposes ``identity(index)`` (only such datasets are cached)."""
    return callable(getattr(data, "identity", None))


def describe_transform(transform: Any) -> str:
    """A deterministic description of a PIL → tensor transform, for cache keys.

    torchvision ops describe themselves (sizes, interpolation, mean/std); plain functions and
    lambdas are named by module and qualified name, and objects without their own ``repr`` by
    class and attributes, so no memory address ever enters a key. A lambda's body is not part
    of the description: changing what it computes needs a new :data:`FORMAT_VERSION`.
    """
    inner = getattr(transform, "transforms", None)
    if isinstance(inner, list | tuple):
        parts = ", ".join(describe_transform(t) for t in inner)
        return f"{type(transform).__name__}([{parts}])"
    if isinstance(transform, types.FunctionType | types.BuiltinFunctionType | types.MethodType):
        return f"{transform.__module__}.{transform.__qualname__}"
    lambd = getattr(transform, "lambd", None)  # torchvision's Lambda hides its function
    if callable(lambd):
        return f"{type(transform).__name__}({describe_transform(lambd)})"
    if type(transform).__repr__ is object.__repr__:
        fields = ", ".join(
            f"{k}={_ADDRESS.sub('', repr(v))}" for k, v in sorted(vars(transform).items())
        )
        return f"{type(transform).__module__}.{type(transform).__qualname__}({fields})"
    return _ADDRESS.sub("", " ".join(repr(transform).split()))


@dataclass(frozen=True)
class FeatureKey:
    """Everything a cached feature depends on besides the image itself.

    Attributes:
        kind: What the method extracts (e.g. ``clip-image-embedding``); the method names it.
        backbone: Registered backbone name.
        weights: Weight source.
        fingerprint: ``backbone.fingerprint()``.
        preprocessing: :func:`describe_transform` of the PIL → tensor transform.
        view: ``None`` for the evaluation view (no augmentation); ``v`` for augmented view v,
            drawn with the training transform under a seed derived from
            ``(view_seed, v, image identity)``. Views do not depend on how many are used, so
            asking for more views later reuses the ones already cached.
        view_seed: Seed of the augmented views (ignored for the evaluation view).
        compute: Numeric precision the encoder ran in (``float32``, ``bf16-autocast``).
    """

    kind: str
    backbone: str
    weights: str
    fingerprint: str
    preprocessing: str
    view: int | None = None
    view_seed: int = 0
    compute: str = "float32"

    @classmethod
    def create(
        cls,
        *,
        kind: str,
        backbone: Any,
        transform: Any,
        view: int | None = None,
        view_seed: int = 0,
        compute: str = "float32",
    ) -> FeatureKey:
        """The key of ``backbone``'s ``kind`` features under ``transform`` (hashes the weights)."""
        return cls(
            kind=kind,
            backbone=str(backbone.name),
            weights=str(backbone.weights),
            fingerprint=str(backbone.fingerprint()),
            preprocessing=describe_transform(transform),
            view=view,
            view_seed=view_seed,
            compute=compute,
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.view is None:
            data["view_seed"] = None  # the evaluation view draws nothing
        return data


class FeatureCache:
    """Features of frozen encoders on disk, one space per :class:`FeatureKey`.

    Args:
        root: Folder of the cache (created on first write).
        dtype: Storage type; ``float32`` keeps cached features bit-equal to computed ones,
            ``float16`` halves the disk and memory footprint.
        view_seed: Seed of the augmented training views (see :attr:`FeatureKey.view`).
    """

    def __init__(
        self, root: str | os.PathLike[str], *, dtype: CacheDtype = "float32", view_seed: int = 0
    ) -> None:
        if dtype not in ("float32", "float16"):
            raise ValueError(f"feature cache dtype must be float32 or float16, got {dtype!r}")
        self.root = Path(root).expanduser()
        self.dtype: CacheDtype = dtype
        self.view_seed = int(view_seed)
        self.unwritable: str | None = None
        """Why the cache could not be written, once it could not (features are then kept in
        memory for the rest of this object's life, and a warning said so)."""
        self._memory: dict[Path, MemorySpace] = {}

    def space_dir(self, key: FeatureKey) -> Path:
        """The folder of ``key``'s space."""
        record = {"format": FORMAT_VERSION, "dtype": self.dtype, "key": key.to_dict()}
        digest = hashlib.sha256(jsonio.dumps(record, sort_keys=True).encode()).hexdigest()
        return self.root / digest[:2] / digest

    def features(
        self,
        data: IdentifiedDataset,
        encode: Callable[[torch.Tensor], torch.Tensor],
        *,
        transform: Callable[[Image.Image], torch.Tensor],
        key: FeatureKey,
        identities: Sequence[str] | None = None,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
        progress: bool = True,
    ) -> torch.Tensor:
        """N x D float32 features of ``data`` in dataset order, encoding only uncached images.

        Args:
            encode: B x 3 x H x W pixels on ``device`` → B x D features (frozen, deterministic);
                called without gradients.
            transform: The PIL → tensor transform ``key.preprocessing`` describes (the
                training transform for an augmented view).
            identities: ``data.identity(i)`` for every i, when the caller already has them.
            num_workers: DataLoader workers decoding and transforming the missing images.

        Raises:
            ValueError: ``transform`` is not the one ``key`` describes, or ``encode`` returned
                something other than B x D.
        """
        ids = self._identities(data, identities)
        args: dict[str, Any] = {
            "transform": transform,
            "key": key,
            "identities": ids,
            "batch_size": batch_size,
            "device": device,
            "num_workers": num_workers,
            "progress": progress,
        }
        space = self._ensure(data, encode, **args)
        rows = space.gather(ids)
        if bool(torch.isfinite(rows).all()):
            return rows
        # Stored rows the encoder never wrote (the writer refuses non-finite ones): the file
        # was damaged. Rebuild the space once.
        warnings.warn(
            f"feature cache {space.path}: cached features hold NaN or infinite values; "
            "rebuilding it",
            RuntimeWarning,
            stacklevel=2,
        )
        if isinstance(space, FeatureSpace):
            space.clear()
        return self._ensure(data, encode, **args).gather(ids)

    def ensure(
        self,
        data: IdentifiedDataset,
        encode: Callable[[torch.Tensor], torch.Tensor],
        *,
        transform: Callable[[Image.Image], torch.Tensor],
        key: FeatureKey,
        identities: Sequence[str] | None = None,
        batch_size: int = 256,
        device: str | torch.device = "cpu",
        num_workers: int = 0,
        progress: bool = True,
    ) -> None:
        """Like :meth:`features`, without reading the features back (warms the cache)."""
        self._ensure(
            data,
            encode,
            transform=transform,
            key=key,
            identities=identities,
            batch_size=batch_size,
            device=device,
            num_workers=num_workers,
            progress=progress,
        )

    def _ensure(
        self,
        data: IdentifiedDataset,
        encode: Callable[[torch.Tensor], torch.Tensor],
        *,
        transform: Callable[[Image.Image], torch.Tensor],
        key: FeatureKey,
        identities: Sequence[str] | None,
        batch_size: int,
        device: str | torch.device,
        num_workers: int,
        progress: bool,
    ) -> FeatureSpace | MemorySpace:
        if describe_transform(transform) != key.preprocessing:
            raise ValueError(
                "the transform does not match the feature key's preprocessing "
                f"({describe_transform(transform)!r} vs {key.preprocessing!r})"
            )
        ids = self._identities(data, identities)
        space = self._space(key)
        # A second pass only happens when the space was rebuilt while encoding (another
        # process found it damaged, or the encoder's output size changed under the same key),
        # or when the disk refused a write and the space moved to memory.
        for _ in range(3):
            try:
                known = set(_disk(space.read)().identities)
                pending: dict[str, int] = {}
                for index, ident in enumerate(ids):
                    if ident not in known and ident not in pending:
                        pending[ident] = index
                if not pending:
                    return space
                self._encode_missing(
                    space,
                    data,
                    encode,
                    pending,
                    transform=transform,
                    key=key,
                    batch_size=batch_size,
                    device=torch.device(device),
                    num_workers=num_workers,
                    progress=progress,
                )
            except _DiskRefused as refused:
                self._give_up_disk(refused.error)
                space = self._space(key)
                if refused.rows is not None:  # what was encoded for the failed write
                    space.append(*refused.rows)
        raise RuntimeError(f"feature cache {space.path}: rows keep disappearing while encoding")

    def _space(self, key: FeatureKey) -> FeatureSpace | MemorySpace:
        path = self.space_dir(key)
        if self.unwritable is None:
            return FeatureSpace(path, key.to_dict(), self.dtype)
        if path not in self._memory:
            self._memory[path] = MemorySpace(path, key.to_dict(), self.dtype)
        return self._memory[path]

    def _give_up_disk(self, exc: OSError) -> None:
        """Keep features in memory from now on, saying why once."""
        self.unwritable = describe_os_error(exc, "cannot write")
        warnings.warn(
            f"feature cache {self.root}: {self.unwritable}; going on without it (features are "
            "computed and kept in memory for this run)",
            RuntimeWarning,
            stacklevel=4,
        )

    @staticmethod
    def _identities(data: IdentifiedDataset, identities: Sequence[str] | None) -> list[str]:
        ids = list(identities) if identities is not None else identities_of(data)
        if len(ids) != len(data):
            raise ValueError(f"{len(ids)} identities for a dataset of {len(data)} images")
        return ids

    def _encode_missing(
        self,
        space: FeatureSpace | MemorySpace,
        data: IdentifiedDataset,
        encode: Callable[[torch.Tensor], torch.Tensor],
        pending: dict[str, int],
        *,
        transform: Callable[[Image.Image], torch.Tensor],
        key: FeatureKey,
        batch_size: int,
        device: torch.device,
        num_workers: int,
        progress: bool,
    ) -> None:
        names, indices = list(pending), list(pending.values())
        seeds = None
        if key.view is not None:
            seeds = [view_seed(key.view_seed, key.view, name) for name in names]
        loader = DataLoader(
            cast("Dataset[Any]", SeededImages(data, indices, transform, seeds)),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator(),  # its seed draw must not move the global generator
        )
        bar = tqdm(
            total=len(names), desc="caching features", unit="img", disable=not progress, leave=False
        )
        done, chunks, chunk_rows = 0, [], 0
        try:
            for pixels in loader:
                with torch.no_grad():
                    feats = encode(pixels.to(device, non_blocking=True))
                if feats.ndim != 2 or feats.shape[0] != len(pixels):
                    raise ValueError(
                        f"encode returned shape {tuple(feats.shape)} for {len(pixels)} images; "
                        "expected B x D"
                    )
                finite = torch.isfinite(feats).all(dim=1)
                if not bool(finite.all()):
                    row = done + chunk_rows + int((~finite).nonzero()[0, 0])
                    raise WeightsError(
                        f"{key.backbone} ({key.weights}) gave NaN or infinite features for "
                        f"image {indices[row]} of the dataset ({names[row]}); they were not "
                        "cached (broken weights, or a precision that overflows)"
                    )
                chunks.append(feats.detach().float().cpu().numpy())
                chunk_rows += len(pixels)
                bar.update(len(pixels))
                if chunk_rows >= _FLUSH_ROWS:
                    _append(space, names[done : done + chunk_rows], np.concatenate(chunks))
                    done, chunks, chunk_rows = done + chunk_rows, [], 0
            if chunks:
                _append(space, names[done : done + chunk_rows], np.concatenate(chunks))
        finally:
            bar.close()


class _DiskRefused(Exception):
    """The cache's disk refused a read or write (read-only, full, not a folder).

    Attributes:
        rows: ``(identities, rows)`` of the write that failed (not to be encoded again).
    """

    def __init__(self, error: OSError, rows: tuple[list[str], np.ndarray] | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.rows = rows


def _append(space: FeatureSpace | MemorySpace, names: list[str], rows: np.ndarray) -> None:
    try:
        space.append(names, rows)
    except OSError as exc:
        raise _DiskRefused(exc, (names, rows)) from exc


F = TypeVar("F", bound=Callable[..., Any])


def _disk(operation: F) -> F:
    """``operation`` with its OSError raised as :class:`_DiskRefused` (so a failing image
    decoder is never taken for a failing cache)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return operation(*args, **kwargs)
        except OSError as exc:
            raise _DiskRefused(exc) from exc

    return cast(F, run)


def identities_of(data: IdentifiedDataset) -> list[str]:
    """``data.identity(i)`` for every image, in order."""
    return [data.identity(i) for i in range(len(data))]


def view_seed(seed: int, view: int, identity: str) -> int:
    """The 63-bit seed augmented view ``view`` of image ``identity`` is drawn with."""
    digest = hashlib.sha256(f"{seed}:{view}:{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's CPU generators for a block; restore them afterwards."""
    py_state, np_state, torch_state = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
    )
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class SeededImages:
    """Images ``indices`` of ``data``, transformed: under one seed per image when ``seeds`` is
    given (augmented views that do not depend on batching, workers or order), else plainly."""

    def __init__(
        self,
        data: ImageItems,
        indices: list[int],
        transform: Callable[[Image.Image], torch.Tensor],
        seeds: list[int] | None,
    ) -> None:
        self.data, self.indices, self.transform, self.seeds = data, indices, transform, seeds

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> torch.Tensor:
        image, _ = self.data[self.indices[j]]
        if self.seeds is None:
            return self.transform(image)
        with seeded(self.seeds[j]):
            return self.transform(image)
