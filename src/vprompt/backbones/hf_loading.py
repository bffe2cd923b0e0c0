"""Building transformers models and their processors from a vprompt weight source (shared
by ``sam:``, ``seggpt:`` and the detector families).

A source is a Hugging Face repo id (``ORG/REPO``, also ``hf-hub:ORG/REPO``), a local folder
written by ``save_pretrained``, or ``none`` (a seeded random init from a config). Only
safetensors checkpoints are read; the checkpoint's ``model_type`` must match the architecture
and every weight must fit (missing or unexpected keys are refused, not silently initialised).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vprompt.backbones.downloads import download_advice, offline_unless_reachable, unreachable
from vprompt.backbones.protocols import FrozenModel
from vprompt.backbones.registry import (
    RANDOM_INIT,
    RANDOM_INIT_SEED,
    BackboneFamily,
    unknown_weights_error,
)
from vprompt.errors import WeightsError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class HubCatalogue:
    """A family's architectures, each with one default hub id (empty for test-only ones):
    the ``list_archs`` / ``list_tags`` / ``default_weights`` a :class:`BackboneFamily` needs."""

    archs: Mapping[str, Any]  # arch name -> spec with a ``hub_id`` attribute

    def list_archs(self) -> list[str]:
        return list(self.archs)

    def list_tags(self, arch: str) -> list[str]:
        hub = self.archs[arch].hub_id
        return [hub] if hub else []

    def default_weights(self, arch: str) -> str:
        return str(self.archs[arch].hub_id or RANDOM_INIT)

    def family(
        self,
        name: str,
        description: str,
        *,
        build: Callable[[str, str, torch.device], FrozenModel],
        tiny: tuple[str, ...],
    ) -> BackboneFamily:
        """The :class:`BackboneFamily` of these architectures."""
        return BackboneFamily(
            name=name,
            description=description,
            list_archs=self.list_archs,
            list_tags=self.list_tags,
            default_weights=self.default_weights,
            build=build,
            tiny=tiny,
        )

    def model(
        self,
        name: str,
        arch: str,
        weights: str,
        *,
        random: Callable[[str], nn.Module],
        pretrained: Callable[[str, str], nn.Module],
    ) -> nn.Module:
        """``none`` → ``random(arch)``; any other source → ``pretrained(arch, weights)``,
        refused for test architectures (they have no weights but ``none``)."""
        if weights == RANDOM_INIT:
            return random(arch)
        if not self.archs[arch].hub_id:
            raise WeightsError(f"{name}:{arch} is a test architecture; its only weights are 'none'")
        return pretrained(arch, weights)


def random_init(name: str, build_config: Callable[[], Any], model_cls: Any) -> nn.Module:
    """``model_cls(config)`` under the fixed seed, so ``none`` means the same weights always."""
    try:
        config = build_config()
    except Exception as exc:  # transformers validates configs with several error types
        raise WeightsError(f"{name}: cannot build a random-init config: {exc}") from exc
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model: nn.Module = model_cls(config)
    return model


def load_pretrained(
    name: str,
    weights: str,
    *,
    model_cls: Any,
    model_type: str | tuple[str, ...],
    tags: list[str],
) -> nn.Module:
    """Load ``model_cls`` from a hub id or a local folder, strictly.

    Args:
        name: The ``family:arch`` name, for messages.
        weights: The source as the user gave it.
        model_type: The ``model_type`` the checkpoint's config must carry (or one of several,
            for releases that wrap the model in a larger one, e.g. SAM 3's video model).
        tags: Registered tags, for suggestions when the source is neither a folder nor an id.
    """
    source = weights.removeprefix("hf-hub:")
    path = Path(source).expanduser()
    local = path.is_dir()
    if not local and not _HUB_ID.match(source):
        raise unknown_weights_error(name, weights, tags)
    if local and not (path / "config.json").is_file():
        raise WeightsError(
            f"weights folder {path} has no config.json (expected a folder written by "
            "save_pretrained)"
        )
    where = str(path) if local else source
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    quick = contextlib.ExitStack()  # no retries against a hub that does not answer
    try:
        import transformers as tf
        from huggingface_hub import try_to_load_from_cache

        cached = local or isinstance(try_to_load_from_cache(source, "config.json"), str)
        quick.enter_context(offline_unless_reachable(not cached))

        config = tf.AutoConfig.from_pretrained(where, local_files_only=local)
        found = getattr(config, "model_type", None)
        accepted = (model_type,) if isinstance(model_type, str) else model_type
        if found not in accepted:
            wanted = " or ".join(repr(t) for t in accepted)
            raise WeightsError(
                f"{weights}: holds a {found!r} model, but {name} needs a {wanted} checkpoint"
            )
        model, info = model_cls.from_pretrained(
            where,
            config=config,
            use_safetensors=True,
            local_files_only=local,
            output_loading_info=True,
        )
    except WeightsError:
        raise
    except Exception as exc:  # hub, safetensors and config errors come in many types
        if not local and unreachable(exc):
            raise download_advice(
                f"{name} weights {weights!r}",
                f"Hugging Face hub repository {source}",
                f"{source} (config.json and model.safetensors)",
                "the hub cache (HF_HUB_CACHE)",
            ) from exc
        text = " ".join(str(exc).split())[:500]
        raise WeightsError(f"cannot load {name} weights from {weights!r}: {text}") from exc
    finally:
        quick.close()
        logging.disable(previous)
    missing = sorted(info.get("missing_keys", []))
    unexpected = sorted(info.get("unexpected_keys", []))
    if missing or unexpected:
        raise WeightsError(
            f"{weights}: does not fit {name}: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}"
        )
    return model


def load_pretrained_processor(
    name: str,
    weights: str,
    processor_cls: Any,
    *,
    probe: str | tuple[str, ...] = "tokenizer_config.json",
) -> Any:
    """The processor saved with the weights (a hub repo or a local ``save_pretrained`` folder),
    offline when the hub cannot be reached and ``probe`` is in the hub cache.

    Call after the model loaded from the same source (that validated the source).

    Args:
        processor_cls: The class to load (``AutoProcessor`` or the model's own).
        probe: Processor file name(s), any of which in a folder or the hub cache means the
            processor is there.

    Raises:
        WeightsError: The folder has no processor files, the hub is unreachable, or the
            files do not load as ``processor_cls``.
    """
    from huggingface_hub import try_to_load_from_cache

    source = weights.removeprefix("hf-hub:")
    path = Path(source).expanduser()
    local = path.is_dir()
    probes = (probe,) if isinstance(probe, str) else probe
    if local and not any((path / name_).is_file() for name_ in probes):
        raise WeightsError(
            f"weights folder {path} has no {' or '.join(probes)} (save the processor there "
            "with save_pretrained too)"
        )
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        cached = local or any(
            isinstance(try_to_load_from_cache(source, name_), str) for name_ in probes
        )
        with offline_unless_reachable(not cached):
            return processor_cls.from_pretrained(
                str(path) if local else source, local_files_only=local
            )
    except Exception as exc:  # hub, tokenizer and config errors come in many types
        if not local and unreachable(exc):
            raise download_advice(
                f"{name} processor {weights!r}",
                f"Hugging Face hub repository {source}",
                f"{source} (preprocessor_config.json and the tokenizer files)",
                "the hub cache (HF_HUB_CACHE)",
            ) from exc
        text = " ".join(str(exc).split())[:300]
        raise WeightsError(
            f"{weights}: no usable {processor_cls.__name__} for {name} (save the processor "
            f"with save_pretrained next to the model): {text}"
        ) from exc
    finally:
        logging.disable(previous)
