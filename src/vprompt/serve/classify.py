"""Image classification for ``/api/classify``: zero-shot class names or a loaded prompt pack.

Packs are loaded once at start-up from the paths the operator gave, each on its own frozen
backbone (shared with the zero-shot classifier, or another pack, when the weights are the
same). Zero-shot classifiers are built per class list and the most recent ones kept, so a
client repeating its classes does not re-encode them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from vprompt.backbones.protocols import ImageTextBackbone
from vprompt.backbones.registry import load_backbone
from vprompt.engine.pack import build_from_pack, load_pack
from vprompt.errors import ConfigError, PackError, PromptError
from vprompt.methods.base import Prediction, PromptMethod
from vprompt.methods.zeroshot import ZeroShotClassifier
from vprompt.prompts.text import load_class_list
from vprompt.serve.errors import ApiError


class Classifiers:
    """The server's classifiers.

    Args:
        classifier: CLIP-like backbone name for zero-shot, or None.
        classifier_weights: Its weight source.
        packs: ``{name: path}`` of prompt packs to load.
        device: Where the models run.
        max_classes: Class names in one zero-shot request.
        zeroshot_cache: Class lists whose zero-shot classifiers are kept.
        allow_downloads: Let packs download the weights they name (off: local only).
    """

    def __init__(
        self,
        *,
        classifier: str | None,
        classifier_weights: str | None,
        packs: Mapping[str, str | Path],
        device: str,
        max_classes: int,
        zeroshot_cache: int,
        allow_downloads: bool = False,
    ) -> None:
        self.max_classes = max_classes
        self.zeroshot_cache = zeroshot_cache
        self.backbone: Any | None = None
        backbones: dict[tuple[str, str], Any] = {}
        if classifier is not None:
            self.backbone = load_backbone(classifier, classifier_weights, device=device)
            if not isinstance(self.backbone, ImageTextBackbone):
                raise ConfigError(
                    f"--classifier {classifier}: zero-shot needs an image-text model such as "
                    "clip:ViT-B-16"
                )
            backbones[(self.backbone.name, self.backbone.fingerprint())] = self.backbone
        self.packs: dict[str, PromptMethod] = {}
        for name, path in packs.items():
            try:
                pack = load_pack(path)
                shared = backbones.get((pack.backbone.name, pack.backbone.fingerprint))
                method = build_from_pack(
                    pack, backbone=shared, device=device, allow_download=allow_downloads
                )
            except PackError as exc:
                raise PackError(f"--pack {name}: {exc}") from None
            method.eval()
            backbones.setdefault((pack.backbone.name, pack.backbone.fingerprint), method.backbone)
            self.packs[name] = method
        self._zeroshot: OrderedDict[tuple[str, ...], ZeroShotClassifier] = OrderedDict()

    def info(self) -> dict[str, str] | None:
        """``{"name", "weights"}`` of the zero-shot classifier, or None."""
        if self.backbone is None:
            return None
        return {"name": str(self.backbone.name), "weights": str(self.backbone.weights)}

    def class_list(self, classes: str) -> list[str]:
        """Comma-separated names → a validated list (422 ``invalid_prompt`` otherwise)."""
        names = load_class_list(classes)
        if len(names) > self.max_classes:
            raise PromptError(
                f"classes: {len(names)} names; at most {self.max_classes} are allowed"
            )
        return names

    def pack(self, name: str) -> PromptMethod:
        """The method of a loaded pack (404 ``pack_not_found`` otherwise)."""
        method = self.packs.get(name)
        if method is None:
            loaded = ", ".join(sorted(self.packs)) or "none"
            raise ApiError(
                404,
                "pack_not_found",
                f"no pack named {name[:64]!r} on this server (loaded: {loaded})",
            )
        return method

    def require_zeroshot(self) -> None:
        """Refuse zero-shot requests on a server started without a classifier."""
        if self.backbone is None:
            packs = ", ".join(sorted(self.packs))
            hint = f"; use one of its packs instead ({packs})" if packs else ""
            raise ApiError(
                422,
                "invalid_request",
                "zero-shot classification is not available: this server was started without "
                f"--classifier{hint}",
            )

    def zeroshot(self, names: list[str]) -> ZeroShotClassifier:
        """A zero-shot classifier for ``names`` (kept for the next requests). Model call."""
        key = tuple(names)
        found = self._zeroshot.get(key)
        if found is not None:
            self._zeroshot.move_to_end(key)
            return found
        self.require_zeroshot()
        assert self.backbone is not None
        classifier = ZeroShotClassifier(self.backbone, names)
        classifier.eval()
        self._zeroshot[key] = classifier
        while len(self._zeroshot) > self.zeroshot_cache:
            self._zeroshot.popitem(last=False)
        return classifier


def predict_image(method: PromptMethod, image: Image.Image, top_k: int) -> list[Prediction]:
    """Top-k labels of one RGB image, preprocessed as ``vprompt predict`` does. Model call."""
    return method.predict([image], top_k=top_k)[0]
