"""Method configs: frozen dataclasses, their JSON form, ``--set`` overrides, and the optimizer
settings every trainable method shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from vprompt.errors import ConfigError


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and schedule of a trainable method (paper defaults live in each method).

    The schedule is a warmup for ``warmup_epochs`` (``linear``: rising from ``warmup_lr``, or
    from 0 when it is ``None``; ``constant``: held at ``warmup_lr``), then cosine decay.
    ``step_unit="iteration"`` updates the rate every iteration and decays to 0 at the end of
    ``epochs``. ``step_unit="epoch"`` reproduces Dassl's epoch-stepped schedule, which the CoOp
    family's published numbers use: epoch ``e >= W`` trains at
    ``lr * (1 + cos(pi * (e - W) / epochs)) / 2``. ``eps`` is Adam's / AdamW's epsilon (torch's
    default; Tip-Adapter-F trains with 1e-4). ``drop_last`` skips each epoch's last partial
    batch when the training set holds at least one full batch (Dassl's rule, which the CoOp
    family's published numbers use).

    Attributes:
        optimizer: ``sgd``, ``adam`` or ``adamw``.
        lr: The learning rate after the warm-up (the cosine schedule's peak).
        momentum: SGD's momentum.
        weight_decay: Weight decay (decoupled for AdamW).
        epochs: Training epochs (0: only the method's set-up and finish run).
        warmup_epochs: Warm-up length in epochs (may be fractional).
        warmup_lr: The warm-up's rate (constant) or starting rate (linear; None: from 0).
        batch_size: Images per training step.
        grad_clip: Clip the gradients' total norm to this (None: no clipping).
        warmup_type: ``linear`` or ``constant``.
        step_unit: ``iteration`` (rate updated every step) or ``epoch`` (Dassl's schedule).
        eps: Adam's / AdamW's epsilon.
        drop_last: Skip each epoch's last partial batch when a full one exists.
        betas: Adam's / AdamW's moment coefficients (torch's default; AnomalyCLIP trains with
            (0.5, 0.999)).
    """

    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 10
    warmup_epochs: float = 0.0
    warmup_lr: float | None = None
    batch_size: int = 128
    grad_clip: float | None = None
    warmup_type: Literal["linear", "constant"] = "linear"
    step_unit: Literal["iteration", "epoch"] = "iteration"
    eps: float = 1e-8
    drop_last: bool = False
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else ()
        if len(betas) != 2 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
        ):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))
        if self.warmup_type not in ("linear", "constant"):
            raise ConfigError(f"optim.warmup_type must be linear or constant: {self.warmup_type!r}")
        if self.step_unit not in ("iteration", "epoch"):
            raise ConfigError(f"optim.step_unit must be iteration or epoch: {self.step_unit!r}")
        if self.warmup_type == "constant" and self.warmup_epochs > 0 and self.warmup_lr is None:
            raise ConfigError("optim.warmup_type=constant needs optim.warmup_lr")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise ConfigError(f"optim.optimizer must be sgd, adam or adamw, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ConfigError(f"optim.epochs must be >= 0 and batch_size >= 1 ({self})")
        if self.warmup_epochs < 0 or self.warmup_epochs > max(self.epochs, 0):
            raise ConfigError(
                f"optim.warmup_epochs must be in [0, epochs], got {self.warmup_epochs}"
            )
        if not isinstance(self.drop_last, bool):
            raise ConfigError(f"optim.drop_last must be true or false, got {self.drop_last!r}")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.weight_decay must be >= 0 and momentum in [0, 1) ({self})")


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Build a frozen config dataclass (nested ones too) from JSON-like data.

    Unknown keys are errors that name the expected keys.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(
            f"{cls.__qualname__}: unknown keys {sorted(unknown)}; expected {sorted(fields)}"
        )
    defaults = cls()
    kw: dict[str, Any] = {}
    for key, value in data.items():
        current = getattr(defaults, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            kw[key] = config_from_dict(type(current), value)
        elif isinstance(value, list):
            kw[key] = tuple(value)
        else:
            kw[key] = value
    try:
        return cls(**kw)
    except TypeError as exc:
        raise ConfigError(f"{cls.__qualname__}: {exc}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass; tuples become lists."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def apply_overrides(config: Any, overrides: Sequence[str], notes: list[str] | None = None) -> Any:
    """Apply ``key=value`` / ``section.key=value`` strings (values parsed as YAML scalars).

    Setting ``optim.epochs`` below the config's warm-up (and not ``optim.warmup_epochs``)
    scales the warm-up to the same share of the run, with a line in ``notes``.

    Raises:
        ConfigError: Malformed items, unknown keys, or values the config rejects.
    """
    import yaml

    data = config_to_dict(config)
    before = data.get("optim", {}).get("epochs") if isinstance(data.get("optim"), dict) else None
    keys = [item.split("=", 1)[0].strip() for item in overrides]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. optim.lr=0.1)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a config section")
            node = node[part]
        if parts[-1] not in node:
            from vprompt.utils.registry import close_matches

            known = sorted(_flat_keys(data))
            guesses = close_matches(key.strip(), known)
            hint = f"; did you mean {', '.join(repr(g) for g in guesses)}?" if guesses else ""
            raise ConfigError(
                f"--set {item!r}: unknown key {key!r}{hint} (known: {', '.join(known)})"
            )
        node[parts[-1]] = value
    if "optim.epochs" in keys and "optim.warmup_epochs" not in keys:
        _share_warmup(data, before, notes)
    return config_from_dict(type(config), data)


def _share_warmup(data: dict[str, Any], before: Any, notes: list[str] | None) -> None:
    """Scale ``optim.warmup_epochs`` that no longer fits the (new) ``optim.epochs``."""
    optim = data.get("optim")
    if not isinstance(optim, dict):
        return
    epochs, warmup = optim.get("epochs"), optim.get("warmup_epochs")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        return
    if not isinstance(warmup, int | float) or isinstance(warmup, bool):
        return
    if not isinstance(before, int) or before <= 0:
        return
    if warmup > epochs:
        scaled = float(warmup) * float(epochs) / float(before)
        optim["warmup_epochs"] = scaled
        if notes is not None:
            notes.append(
                f"optim.warmup_epochs {warmup:g} does not fit optim.epochs={epochs}: scaled to "
                f"{scaled:g}, the same share of the run (set optim.warmup_epochs to choose)"
            )


def _flat_keys(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        if isinstance(v, dict):
            keys += _flat_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def apply_config_mapping(config: Any, data: Mapping[str, Any], *, what: str = "config") -> Any:
    """``config`` with the nested mapping ``data`` merged over it, key by key.

    Raises:
        ConfigError: Unknown keys (named with their section) or values the config rejects.
    """
    merged = config_to_dict(config)

    def merge(node: dict[str, Any], patch: Mapping[str, Any], prefix: str) -> None:
        for key, value in patch.items():
            path = f"{prefix}{key}"
            if key not in node:
                known = ", ".join(sorted(node))
                raise ConfigError(f"{what}: unknown config key {path!r}; known: {known}")
            if isinstance(node[key], dict):
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{what}: {path!r} is a section; give it a mapping")
                merge(node[key], value, f"{path}.")
            else:
                node[key] = value

    merge(merged, data, "")
    try:
        return config_from_dict(type(config), merged)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def with_epochs(config: Any, epochs: int | None) -> Any:
    """``config`` with ``optim.epochs`` replaced (unchanged when ``epochs`` is None)."""
    if epochs is None:
        return config
    optim = getattr(config, "optim", None)
    if optim is None:
        raise ConfigError(f"{type(config).__name__} has no optim section to set epochs on")
    return dataclasses.replace(config, optim=dataclasses.replace(optim, epochs=int(epochs)))


def config_help(cls: type) -> list[tuple[str, Any, str]]:
    """``(dotted key, default, meaning)`` of every setting of a config dataclass, nested
    sections included; meanings come from the ``Attributes:`` sections of the docstrings of
    the class and its bases."""
    meanings: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        meanings.update(_attribute_docs(base.__doc__ or ""))
    rows: list[tuple[str, Any, str]] = []
    defaults = config_to_dict(cls())
    for f in dataclasses.fields(cls):
        value = defaults[f.name]
        if isinstance(value, dict):  # a section: its own class's help, this config's defaults
            section = f.type if isinstance(f.type, type) else type(getattr(cls(), f.name))
            for key, _, meaning in config_help(section):
                rows.append((f"{f.name}.{key}", _dotted_get(value, key), meaning))
        else:
            rows.append((f.name, value, meanings.get(f.name, "")))
    return rows


def _dotted_get(data: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def _attribute_docs(doc: str) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Attributes:`` section, joined into lines."""
    import inspect

    lines = inspect.cleandoc(doc).splitlines()
    found: dict[str, str] = {}
    inside, current, indent = False, None, 0
    for line in lines:
        if line.strip() == "Attributes:":
            inside, current = True, None
            continue
        if not inside:
            continue
        if line and not line.startswith(" "):
            break  # the section ended
        text = line.strip()
        if not text:
            continue
        depth = len(line) - len(line.lstrip())
        head, sep, rest = text.partition(":")
        if sep and head.isidentifier() and (current is None or depth <= indent):
            current, indent = head, depth
            found[current] = rest.strip()
        elif current is not None:
            found[current] = f"{found[current]} {text}".strip()
    return found


def check_int(value: object, name: str, low: int, high: int) -> int:
    """``value`` as an int in [low, high], or a ConfigError naming the field."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


def check_fraction(value: object, name: str, *, low: float = 0.0) -> float:
    """``value`` as a finite float ≥ ``low`` (loss weights, standard deviations)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a finite number >= {low}, got {value!r}")
    number = float(value)
    if not (number >= low and number < float("inf")):
        raise ConfigError(f"{name} must be a finite number >= {low}, got {value!r}")
    return number
