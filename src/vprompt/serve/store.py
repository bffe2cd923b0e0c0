"""The images a server keeps between requests, with their refinement logits.

Bounded three ways: a count (least recently used dropped first), a byte budget over decoded
pixels plus kept logits, and an idle time-to-live. Each image keeps the low-res logits of its
most recent results under opaque tokens, so a client refines an object by sending the token
back instead of the 256 x 256 floats. Embeddings are not held here but in the segmenter's
memory-bounded cache, under the content key recorded with the image. Thread-safe.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from vprompt.serve.errors import ApiError


@dataclass(eq=False)
class StoredImage:
    """One uploaded image.

    Attributes:
        image_id: Random id handed to the client.
        image: Upright RGB pixels (needed again if the embedding leaves the cache).
        embedding_key: The segmenter cache key of its embedding.
        last_used: ``time.monotonic()`` of its last use.
        logits: Refinement tokens → L x L float32 low-res logits, oldest first.
    """

    image_id: str
    image: Image.Image
    embedding_key: str
    last_used: float
    logits: OrderedDict[str, NDArray[np.float32]] = field(default_factory=OrderedDict)

    @property
    def size(self) -> tuple[int, int]:
        """``(W, H)``."""
        return self.image.size

    @property
    def nbytes(self) -> int:
        w, h = self.image.size
        return w * h * 3 + sum(a.nbytes for a in self.logits.values())


def _not_found(image_id: str) -> ApiError:
    shown = image_id if len(image_id) <= 64 else image_id[:64] + "…"
    return ApiError(404, "image_not_found", f"no image {shown!r} (unknown or expired)")


class ImageStore:
    """Images by id; see the module docstring for the bounds.

    Args:
        max_images: Images kept at once.
        max_bytes: Bound over every image's pixels and logits.
        ttl_s: Idle seconds after which an image is dropped.
        logits_per_image: Refinement tokens kept per image.
        clock: Monotonic clock (tests pass a fake one).
    """

    def __init__(
        self,
        *,
        max_images: int,
        max_bytes: int,
        ttl_s: float,
        logits_per_image: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_images = max_images
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.logits_per_image = logits_per_image
        self._clock = clock
        self._images: OrderedDict[str, StoredImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._images)

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def add(self, image: Image.Image, embedding_key: str) -> StoredImage:
        """Keep ``image`` under a new random id, dropping old images to stay in bounds."""
        record = StoredImage(
            image_id=secrets.token_hex(16),
            image=image,
            embedding_key=embedding_key,
            last_used=self._clock(),
        )
        with self._lock:
            self._expire()
            self._images[record.image_id] = record
            self._bytes += record.nbytes
            self._shrink(keep=record.image_id)
        return record

    def get(self, image_id: str) -> StoredImage:
        """The image, marked as just used.

        Raises:
            ApiError: 404 ``image_not_found`` for unknown, deleted or expired ids.
        """
        with self._lock:
            self._expire()
            record = self._images.get(image_id)
            if record is None:
                raise _not_found(image_id)
            record.last_used = self._clock()
            self._images.move_to_end(image_id)
            return record

    def ids(self) -> list[str]:
        """Every kept image's id, least recently used first."""
        with self._lock:
            self._expire()
            return list(self._images)

    def delete(self, image_id: str) -> None:
        """Forget the image (404 ``image_not_found`` when there is none)."""
        with self._lock:
            self._expire()
            record = self._images.pop(image_id, None)
            if record is None:
                raise _not_found(image_id)
            self._bytes -= record.nbytes

    def logits(self, image_id: str, token: str) -> NDArray[np.float32] | None:
        """The logits kept under ``token`` for this image, or None (unknown or dropped)."""
        record = self.get(image_id)
        with self._lock:
            return record.logits.get(token)

    def remember_logits(self, image_id: str, logits: NDArray[np.float32]) -> str:
        """Keep one object's L x L low-res logits; returns the token that names them."""
        token = secrets.token_urlsafe(12)
        array = np.ascontiguousarray(logits, dtype=np.float32)
        with self._lock:
            record = self._images.get(image_id)
            if record is None:  # deleted or evicted meanwhile: the token is simply unknown
                return token
            record.logits[token] = array
            self._bytes += array.nbytes
            while len(record.logits) > self.logits_per_image:
                _, old = record.logits.popitem(last=False)
                self._bytes -= old.nbytes
            self._shrink(keep=image_id)
        return token

    def _expire(self) -> None:
        deadline = self._clock() - self.ttl_s
        for image_id in [k for k, r in self._images.items() if r.last_used <= deadline]:
            self._bytes -= self._images.pop(image_id).nbytes

    def _shrink(self, *, keep: str) -> None:
        """Drop least recently used images (never ``keep``) until within both bounds."""
        while len(self._images) > self.max_images or self._bytes > self.max_bytes:
            oldest = next(iter(self._images))
            if oldest == keep:
                if len(self._images) == 1:
                    break  # the one image just used stays, even alone over the byte budget
                self._images.move_to_end(keep)
                continue
            self._bytes -= self._images.pop(oldest).nbytes
