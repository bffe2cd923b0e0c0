"""Named presets: the published settings of each method, as YAML files shipped in the package.

A preset is ``src/vprompt/configs/<method>/<setting>.yaml`` and is named ``<method>/<setting>``
(e.g. ``coop/few-shot-16ctx``). Each file holds::

    method: coop                  # a registered method
    source: …                     # the reference config / script it reproduces
    note: …                       # what the setting is, in a sentence or two
    model: clip:RN50              # optional: the backbone the paper reports with it
    epochs_by_shots: {1: 50, 2: 100, 4: 100, 8: 200}   # optional, see Preset.epochs_for
    config:                       # nested overrides of the method's default config
      n_ctx: 16
      optim: {epochs: 200, batch_size: 32}
    by_dataset:                   # optional: overrides for runs on one benchmark dataset,
      dtd: {gpa_mean: 45}         # where the reference's config sets them per dataset

The ``config`` mapping is merged key by key over the method's own defaults (a partial ``optim``
section keeps the method's other optimizer defaults), then ``--set`` overrides go on top.
Files are read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from vprompt.errors import ConfigError, UnknownNameError
from vprompt.methods.config import apply_config_mapping, with_epochs
from vprompt.methods.registry import METHODS
from vprompt.utils.registry import close_matches

_PACKAGE_DIR = "configs"
_REQUIRED = ("method", "source", "note", "config")
_OPTIONAL = ("model", "epochs_by_shots", "by_dataset")


@dataclass(frozen=True)
class Preset:
    """One published setting of one method.

    Attributes:
        name: ``<method>/<setting>``, the file's path under ``vprompt/configs`` without suffix.
        method: Registered method name.
        config: Nested overrides of the method's default config.
        source: The reference config file or script (repository and path) it reproduces.
        note: What the setting is.
        model: The backbone the paper reports with this setting, if it names one.
        epochs_by_shots: Shots per class → training epochs, where the reference trains
            longer with more shots (see :meth:`epochs_for`); empty when epochs are fixed.
        by_dataset: Benchmark dataset → nested overrides applied after ``config`` on runs on
            that dataset, where the reference's setting differs per dataset.
    """

    name: str
    method: str
    config: Mapping[str, Any]
    source: str
    note: str
    model: str | None = None
    epochs_by_shots: Mapping[int, int] = field(default_factory=dict)
    by_dataset: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def epochs_for(self, shots: int | None) -> int | None:
        """Epochs for ``shots`` per class: the entry of the largest listed shot count not above
        ``shots`` (the smallest entry when ``shots`` is below all of them); None without a
        mapping or without ``shots``."""
        if not self.epochs_by_shots or shots is None:
            return None
        keys = sorted(self.epochs_by_shots)
        below = [k for k in keys if k <= shots]
        return int(self.epochs_by_shots[below[-1] if below else keys[0]])

    def build_config(self, shots: int | None = None) -> Any:
        """The method's config with this preset applied (and the epochs for ``shots``)."""
        cls = METHODS.get(self.method)
        config = apply_config_mapping(cls.Config(), self.config, what=f"preset {self.name}")
        return with_epochs(config, self.epochs_for(shots))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method,
            "model": self.model,
            "source": self.source,
            "note": self.note,
            "config": _plain(self.config),
            "epochs_by_shots": {str(k): v for k, v in sorted(self.epochs_by_shots.items())},
            "by_dataset": _plain(self.by_dataset),
        }


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _parse(name: str, text: str) -> Preset:
    import yaml

    where = f"preset {name} (vprompt/{_PACKAGE_DIR}/{name}.yaml)"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(_REQUIRED)}")
    unknown = set(data) - set(_REQUIRED) - set(_OPTIONAL)
    missing = [k for k in _REQUIRED if k not in data]
    if unknown or missing:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}, missing keys {missing}")
    for key in ("method", "source", "note"):
        if not isinstance(data[key], str) or not data[key].strip():
            raise ConfigError(f"{where}: {key!r} must be a non-empty string")
    if not isinstance(data["config"], dict):
        raise ConfigError(f"{where}: 'config' must be a mapping")
    if data["method"] != name.split("/", 1)[0]:
        raise ConfigError(f"{where}: method {data['method']!r} differs from its folder")
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or ":" not in model):
        raise ConfigError(f"{where}: 'model' must be FAMILY:ARCH, got {model!r}")
    epochs = data.get("epochs_by_shots") or {}
    if not isinstance(epochs, dict) or not all(
        isinstance(k, int) and isinstance(v, int) and k >= 1 and v >= 1 for k, v in epochs.items()
    ):
        raise ConfigError(f"{where}: 'epochs_by_shots' must map shots >= 1 to epochs >= 1")
    by_dataset = data.get("by_dataset") or {}
    if not isinstance(by_dataset, dict) or not all(
        isinstance(k, str) and isinstance(v, dict) for k, v in by_dataset.items()
    ):
        raise ConfigError(f"{where}: 'by_dataset' must map dataset names to config mappings")
    return Preset(
        name=name,
        method=data["method"],
        config=data["config"],
        source=" ".join(data["source"].split()),
        note=" ".join(data["note"].split()),
        model=model,
        epochs_by_shots=dict(sorted(epochs.items())),
        by_dataset=dict(sorted(by_dataset.items())),
    )


def _discover() -> dict[str, Preset]:
    root = resources.files("vprompt") / _PACKAGE_DIR
    found: dict[str, Preset] = {}
    if not root.is_dir():
        return found
    for method_dir in sorted(root.iterdir(), key=lambda p: p.name):
        if not method_dir.is_dir() or method_dir.name.startswith((".", "_")):
            continue
        for item in sorted(method_dir.iterdir(), key=lambda p: p.name):
            if item.is_file() and item.name.endswith((".yaml", ".yml")):
                stem = item.name.rsplit(".", 1)[0]
                name = f"{method_dir.name}/{stem}"
                found[name] = _parse(name, item.read_text(encoding="utf-8"))
    return found


class _Presets(Mapping[str, Preset]):
    """Name → :class:`Preset`, read from the package data on first use."""

    def __init__(self) -> None:
        self._items: dict[str, Preset] | None = None

    def _load(self) -> dict[str, Preset]:
        if self._items is None:
            self._items = _discover()
        return self._items

    def __getitem__(self, name: str) -> Preset:
        items = self._load()
        if name in items:
            return items[name]
        guesses = close_matches(name, list(items))
        hint = f"; did you mean {', '.join(repr(g) for g in guesses)}?" if guesses else ""
        raise UnknownNameError(f"unknown preset {name!r}{hint} (see `vprompt presets`)")

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._load()))

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, name: object) -> bool:
        return name in self._load()


PRESETS: Mapping[str, Preset] = _Presets()


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (``<method>/<setting>``).

    Raises:
        UnknownNameError: No such preset (with close matches).
    """
    return PRESETS[name.strip()]


def load_preset(name: str) -> tuple[str, dict[str, Any]]:
    """``(method, nested config overrides)`` of the preset called ``name``."""
    preset = get_preset(name)
    return preset.method, _plain(preset.config)


def resolve_method(preset: Preset | None, method: str | None) -> str:
    """The method a command runs: ``--method``, the preset's, or both when they agree.

    Raises:
        ConfigError: Neither is given, or they name different methods.
    """
    if preset is None:
        if not method:
            raise ConfigError("give --method (or --preset; see `vprompt presets`)")
        return method
    if method and method != preset.method:
        raise ConfigError(
            f"preset {preset.name} is a {preset.method} setting, but --method is {method!r}; "
            "drop --method or pick a preset of that method"
        )
    return preset.method
