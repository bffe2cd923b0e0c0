"""What every prompt method is: an ``nn.Module`` over a frozen backbone, with a typed config,
declared capabilities and one documented lifecycle (``docs/adding-a-method.md``).

Lifecycle, as :func:`vprompt.engine.fit` drives it::

    Method(backbone, classnames, config)   build the prompt tensors (shapes from the config)
    setup(data)                            once, before the optimizer is built: state whose
                                           shape or value comes from the training data
    before_epoch(epoch, data)              before every epoch, in eval mode
    forward / forward_features             every step, in train mode → MethodOutput
    backward(loss, output, labels)         instead of loss.backward(), if declared
    after_epoch(epoch, data)               after every epoch's steps, in eval mode, before
                                           validation and the checkpoint (e.g. averaging
                                           the prompt over epochs)
    finish(data)                           once, after the kept epoch is restored: calibration
                                           on validation data (e.g. a hyper-parameter search)
    prompt_state / load_prompt_state       what packs and checkpoints hold

What a method can do is declared in :class:`Capabilities`; the engine, CLI, protocol runner and
server read the declaration and never probe a method for members.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, ClassVar, Literal, Protocol, TypeVar

import torch
from PIL import Image
from torch import nn

from vprompt.errors import ConfigError, PackError

InputKind = Literal["images", "image-features"]
TemplateField = Literal["template", "templates"]
Batch = tuple[torch.Tensor, torch.Tensor]
ImageInput = Image.Image | str | PathLike[str] | Any  # also NumPy arrays and image tensors
M = TypeVar("M", bound="PromptMethod")


@dataclass(frozen=True)
class Capabilities:
    """What a method can do, declared once on its class.

    Attributes:
        inputs: ``images``: ``forward`` sees pixels from ``input_transform``.
            ``image-features``: the method sees images only through ``encode_images``
            (frozen, deterministic), so the engine may train and evaluate it on cached
            features through ``forward_features``; ``forward(x)`` must equal
            ``forward_features(encode_images(x))``.
        trains: ``fit`` runs an optimizer over ``trainable_parameters()`` with the config's
            ``optim`` section. False for training-free methods (zero-shot, Tip-Adapter).
        uses_training_data: ``setup`` needs the (few-shot) training set. True for every
            trainable method and for cache methods such as Tip-Adapter; False only for methods
            built from class names alone (zero-shot), which protocols run once per dataset.
        retargets: ``retarget(classnames, templates=…)`` gives the method for other classes
            (base-to-novel, cross-dataset and domain-generalization protocols need it).
        template_field: The config field (``template``: one string, ``templates``: a tuple)
            that protocols fill with each dataset's template(s) unless the user set it, and
            that ``retarget(templates=…)`` replaces. None when the method reads no template.
        custom_backward: The engine calls ``backward(loss, output, labels)`` instead of
            ``loss.backward()``.
        is_prompt_method: False only for reference baselines that train a copy of the
            backbone (full fine-tuning): their packs hold model weights, not a prompt.
        uses_labels: False for methods that learn without labels (distillation from a
            teacher, pseudo-labels): the engine adds no cross-entropy (the loss is the
            ``aux_loss`` terms), training images may be unlabelled (label -1, ``vprompt train
            --unlabeled DIR``), and base-to-novel trains on the images of every class,
            unlabelled (the transductive protocol such methods report).
        multi_dataset: The method learns across several datasets in one run (meta-learning
            a prompt initialisation: ``vprompt train --data A --data B …``). The run's
            classes are the datasets' classes one after the other (dataset ``t``'s class
            ``c`` is label ``tasks[t].offset + c``, named ``"NAME: class"``) and the hooks
            see each dataset through ``MethodData.tasks`` / ``train(task=…)`` /
            ``shuffled(…, task=…)``. Other methods refuse several ``--data``. Needs
            ``inputs="images"`` and ``uses_training_data``.
    """

    inputs: InputKind = "images"
    trains: bool = True
    uses_training_data: bool = True
    retargets: bool = False
    template_field: TemplateField | None = None
    custom_backward: bool = False
    is_prompt_method: bool = True
    uses_labels: bool = True
    multi_dataset: bool = False

    def __post_init__(self) -> None:
        if self.inputs not in ("images", "image-features"):
            raise TypeError(
                f"capabilities.inputs must be images or image-features: {self.inputs!r}"
            )
        if self.template_field not in (None, "template", "templates"):
            raise TypeError(
                f"capabilities.template_field must be None, template or templates: "
                f"{self.template_field!r}"
            )
        if self.trains and not self.uses_training_data:
            raise TypeError("a method that trains uses training data (uses_training_data=True)")
        if self.custom_backward and not self.trains:
            raise TypeError("custom_backward needs trains=True")
        if not self.uses_labels and not self.uses_training_data:
            raise TypeError(
                "uses_labels=False describes a method's training data: needs uses_training_data"
            )
        if self.multi_dataset and (not self.uses_training_data or self.inputs != "images"):
            raise TypeError("multi_dataset needs uses_training_data and inputs='images'")


@dataclass(frozen=True)
class ValueImage:
    """A visualization of raw values (a learned frame, prompt tokens): ``image`` holds them
    contrast-stretched to [0, 1] (3 x H x W), ``low`` and ``high`` the raw values shown as 0
    and 1; reports draw a colour bar with both.

    Use :meth:`stretch` to build one from raw values.
    """

    image: torch.Tensor
    low: float
    high: float

    @classmethod
    def stretch(cls, values: torch.Tensor) -> ValueImage:
        """Raw 3 x H x W (or H x W: shown grey) values → their stretched image and range."""
        v = values.detach().float().cpu()
        if v.dim() == 2:
            v = v.unsqueeze(0).expand(3, -1, -1)
        low, high = float(v.min()), float(v.max())
        image = (v - low) / max(high - low, 1e-8)
        return cls(image.contiguous(), low, high)


@dataclass(frozen=True)
class MethodExample:
    """A tiny, fast configuration of a method: what the contract tests run it on.

    Attributes:
        backbone: A tiny registered backbone (``clip:tiny``, ``torchvision:tiny`` …).
        config: Nested overrides of the method's default config.
    """

    backbone: str
    config: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodOutput:
    """What a method's forward returns.

    Attributes:
        logits: B x C class scores (before softmax).
        aux_loss: Extra loss terms the method adds during training (name → scalar).
    """

    logits: torch.Tensor
    aux_loss: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Prediction:
    """One ranked label for one image."""

    label: str
    score: float
    index: int


@dataclass(frozen=True)
class DataTask:
    """One dataset of a run: all of it in ordinary runs, one of several in ``multi_dataset``
    runs (see :attr:`Capabilities.multi_dataset`).

    Attributes:
        name: The dataset as given (``fashion-mnist``, ``oxford_pets``, ``folder:PATH``).
        classnames: Its own class names, in its label order (without the ``"NAME: "`` prefix).
        offset: Its first class's label in the run: its class ``c`` is label ``offset + c``.
        size: Its training images.
    """

    name: str
    classnames: tuple[str, ...]
    offset: int
    size: int

    @property
    def labels(self) -> range:
        """The run's labels of this dataset's classes."""
        return range(self.offset, self.offset + len(self.classnames))


class MethodData(Protocol):
    """The data a method's hooks see; the engine builds it (:mod:`vprompt.engine.fit_data`).

    Batches are ``(inputs, labels)`` on the training device, in dataset order: B x D features
    from ``encode_images`` for ``image-features`` methods (from a feature cache when there is
    one), otherwise B x 3 x H x W pixels from ``input_transform``. Labels are the run's (see
    :class:`DataTask` for runs over several datasets).
    """

    @property
    def tasks(self) -> tuple[DataTask, ...]:
        """The run's datasets: one, or several for ``multi_dataset`` methods."""
        ...

    def shuffled(
        self, generator: torch.Generator, *, task: int | None = None, batch_size: int | None = None
    ) -> Iterator[Batch]:
        """One pass over the training set (or dataset ``task`` of it) in a random order drawn
        from ``generator``, with the training transform (``input_transform(True)``), for
        methods that run their own optimisation loop in ``setup`` (e.g. meta-learning), in
        batches of ``batch_size`` (default: the run's). ``images`` methods only."""
        ...

    @property
    def views(self) -> int:
        """Augmented training views on offer: the method's ``feature_views`` when its training
        transform augments, else 0 (only the plain view)."""
        ...

    @property
    def has_val(self) -> bool:
        """Whether validation data was given."""
        ...

    def train(self, view: int | None = None, *, task: int | None = None) -> Iterator[Batch]:
        """The training set: plain (``input_transform(False)``), or augmented view ``view``
        (``input_transform(True)`` under a seed per image and view; the same pixels whether
        or not a feature cache is used). ``task``: only that dataset's images (an index into
        :attr:`tasks`)."""
        ...

    def val(self) -> Iterator[Batch]:
        """The validation set, plain. Raises ConfigError when there is none."""
        ...


def check_state_keys(method: str, expected: set[str], tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse prompt tensors whose names differ from what ``method`` saves, naming both sides."""
    if set(tensors) != expected:
        raise PackError(
            f"{method} state mismatch: missing {sorted(expected - set(tensors))}, "
            f"unexpected {sorted(set(tensors) - expected)}"
        )


def topk_predictions(
    probs: torch.Tensor, classnames: Sequence[str], top_k: int
) -> list[list[Prediction]]:
    """B x C probabilities → per image, the ``top_k`` labels, highest first."""
    k = max(1, min(int(top_k), probs.shape[1]))
    scores, idx = probs.float().topk(k, dim=1)
    return [
        [Prediction(classnames[i], float(s), int(i)) for s, i in zip(row_s, row_i, strict=True)]
        for row_s, row_i in zip(scores.tolist(), idx.tolist(), strict=True)
    ]


class PromptMethod(nn.Module):
    """The base of every method: what they all share, so a method file holds only its own.

    A subclass sets ``Config`` (a frozen, default-constructible dataclass with the paper's
    defaults), ``capabilities`` and ``examples()``, builds its prompt tensors in ``__init__``
    after calling ``super().__init__`` and defines ``forward`` (``images`` methods) or
    ``encode_images`` / ``forward_features`` / ``feature_kind`` (``image-features`` methods).
    Everything else has a default here. :func:`~vprompt.methods.registry.register_method`
    checks the whole contract when the class is registered.

    The prompt state (packs, checkpoints) is the module's persistent state outside
    ``backbone``: parameters and persistent buffers. Non-persistent buffers (class text
    features, normalisation constants) are rebuilt from the config instead.

    Args:
        backbone: The frozen backbone (eval mode, ``requires_grad=False``); never changed.
        classnames: Class names in label order.
        config: An instance of ``Config``; its defaults when omitted.
    """

    name: ClassVar[str]
    """Registered name (set by ``register_method``)."""
    Config: ClassVar[type[Any]]
    capabilities: ClassVar[Capabilities]
    reference_settings: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    """Dataset name → config values the method's reference code uses on that dataset (its
    per-dataset configs and templates), applied to runs on that dataset under any preset and
    ``--set``; a template given here replaces the dataset's standard one."""
    data_shaped_state: ClassVar[frozenset[str]] = frozenset()
    """Prompt tensors whose first dimension comes from the training data (e.g. a cache of N
    training features); loading a pack or checkpoint resizes them instead of refusing."""
    target_settings: ClassVar[frozenset[str]] = frozenset()
    """Config fields that follow the *target* dataset when a protocol retargets the method
    (cross-dataset, domain generalization): settings the reference sets per test dataset, such
    as TPT's AugMix; the protocol passes the target's values (its ``reference_settings`` and
    the user's ``--set``) to :meth:`retarget`. Everything else keeps the source's value."""
    state_hint: ClassVar[str] = ""
    """Appended to shape errors when a pack does not fit, e.g. which settings must match."""
    max_eval_batch: ClassVar[int | None] = None
    """Most images per evaluation batch (None: the caller's); test-time methods whose inputs
    are many views per image (TPT) set a small one."""
    feature_kind: str
    """``image-features`` methods: what ``encode_images`` extracts; part of the feature-cache
    key, so two methods share cached features only when they extract the same thing."""

    backbone: Any
    config: Any
    classnames: list[str]

    def __init__(self, backbone: Any, classnames: Sequence[str], config: Any = None) -> None:
        super().__init__()
        cls = type(self)
        if config is None:
            config = cls.Config()
        elif not isinstance(config, cls.Config):
            raise ConfigError(
                f"{cls.__name__} expects a {cls.Config.__name__}, got {type(config).__name__}"
            )
        names = [classnames] if isinstance(classnames, str) else list(classnames)
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ConfigError(f"{cls.__name__} needs a non-empty list of non-empty class names")
        self.backbone = backbone
        self.classnames = names
        self.config = config

    # ------------------------------------------------------------------ construction
    @classmethod
    def examples(cls) -> Sequence[MethodExample]:
        """Tiny configurations the contract tests run the method on (one at least)."""
        raise NotImplementedError(f"{cls.__name__} gives no examples()")

    @classmethod
    def from_state(
        cls: type[M],
        backbone: Any,
        classnames: Sequence[str],
        config: Any,
        tensors: Mapping[str, torch.Tensor],
    ) -> M:
        """The method with its prompt state loaded (how packs are applied)."""
        method = cls(backbone, classnames, config)
        method.load_prompt_state(tensors)
        return method

    @classmethod
    def templates_for(cls, dataset: str, default: str) -> tuple[str, ...]:
        """The template(s) this method uses on ``dataset``: its reference's (from
        ``reference_settings``), else the dataset's standard ``default``."""
        own = cls.reference_settings.get(dataset, {}).get(cls.capabilities.template_field or "")
        if own is None:
            return (default,)
        return (own,) if isinstance(own, str) else tuple(own)

    @classmethod
    def with_templates(cls, config: Any, templates: Sequence[str] | None) -> Any:
        """``config`` with ``templates`` in the declared ``template_field`` (unchanged when
        either is None).

        Raises:
            ConfigError: A single-``template`` method given other than one template.
        """
        field_name = cls.capabilities.template_field
        if templates is None or field_name is None:
            return config
        items = tuple(templates)
        if field_name == "template":
            if len(items) != 1:
                raise ConfigError(
                    f"{cls.name} compares against one hand-crafted template; got {len(items)}"
                )
            return dataclasses.replace(config, template=items[0])
        return dataclasses.replace(config, templates=items)

    def retarget(
        self: M,
        classnames: Sequence[str],
        *,
        templates: Sequence[str] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> M:
        """The same learned prompt applied to other class names (new classes, other datasets).

        The default rebuilds the method for ``classnames`` (with ``templates`` in its template
        field and ``settings``, values of ``target_settings`` fields for the target dataset,
        in its config) and loads the prompt state, which must not depend on the classes.

        Raises:
            ConfigError: The method does not declare ``retargets``.
        """
        if not self.capabilities.retargets:
            raise ConfigError(f"{self.name} cannot change its classes once built")
        config = self.with_templates(self.config, templates)
        if settings:
            unknown = sorted(set(settings) - self.target_settings)
            if unknown:
                raise ConfigError(f"{self.name} keeps {unknown} when retargeted (target_settings)")
            config = dataclasses.replace(config, **settings)
        other = type(self)(self.backbone, classnames, config)
        other.load_prompt_state(self.prompt_state())
        return other.train(self.training)

    # ------------------------------------------------------------------ lifecycle hooks
    def setup(self, data: MethodData) -> None:
        """Once per run, before the optimizer is built (default: nothing)."""
        return None

    def before_epoch(self, epoch: int, data: MethodData) -> None:
        """Before every training epoch, in eval mode (default: nothing). A run with
        ``optim.epochs == 0`` calls it once with ``epoch=0``."""
        return None

    def after_epoch(self, epoch: int, data: MethodData) -> None:
        """After every training epoch's steps, in eval mode, before validation and before the
        epoch's checkpoint is written (default: nothing). What it changes in the prompt state
        is what that epoch's checkpoint, validation and a resumed run see."""
        return None

    def finish(self, data: MethodData) -> None:
        """Once per run, after training and epoch selection, in eval mode (default: nothing)."""
        return None

    def backward(self, loss: torch.Tensor, output: MethodOutput, labels: torch.Tensor) -> None:
        """Fill ``.grad`` of the trainable parameters (only with ``custom_backward``).

        Called after ``zero_grad`` and before gradient clipping and the optimizer step, with
        ``loss`` = cross-entropy of ``output.logits`` plus every ``aux_loss`` term.
        """
        raise NotImplementedError(f"{self.name} does not declare custom_backward")

    # ------------------------------------------------------------------ training
    def trainable_parameters(self) -> list[Any]:
        """The prompt parameters (everything outside the backbone that requires grad), or
        groups ``{"params": [...], "lr_scale": s}`` learning at ``s`` times the rate."""
        return [p for n, p in self.named_parameters() if p.requires_grad and not _frozen(n)]

    def train(self: M, mode: bool = True) -> M:
        """Switch the prompt's mode; the frozen backbone always stays in eval mode (its
        BatchNorm statistics and dropout never change)."""
        super().train(mode)
        if isinstance(self.backbone, nn.Module):
            self.backbone.eval()
        return self

    def input_transform(self, train: bool) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image → the tensor ``forward`` / ``encode_images`` expects (augmented when
        ``train``). Default: the backbone's own preprocessing."""
        transform: Callable[[Image.Image], torch.Tensor] = self.backbone.transform
        return transform

    @property
    def feature_views(self) -> int:
        """Augmented training views to cache per image (``image-features`` methods): the
        config's ``feature_views`` field, else 1."""
        views = getattr(self.config, "feature_views", 1)
        if not isinstance(views, int) or isinstance(views, bool) or views < 1:
            raise ConfigError(f"{self.name}: feature_views must be an integer >= 1: {views!r}")
        return views

    def visualizations(self, images: torch.Tensor) -> dict[str, torch.Tensor | ValueImage]:
        """Named 3 x H x W images in [0, 1] for reports (a :class:`ValueImage` for raw values,
        drawn with a colour bar); ``images`` come from ``input_transform(False)``. Default:
        none."""
        return {}

    # ------------------------------------------------------------------ forward
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W pixels → B x D frozen features (``image-features`` methods)."""
        raise NotImplementedError(f"{self.name} sees pixels, not features")

    def forward_features(self, features: torch.Tensor) -> MethodOutput:
        """B x D features from ``encode_images`` → the output ``forward`` would give."""
        raise NotImplementedError(f"{self.name} sees pixels, not features")

    def forward(self, images: torch.Tensor) -> MethodOutput:
        """B x 3 x H x W images from ``input_transform`` → B x C logits. Default (for
        ``image-features`` methods): ``forward_features(encode_images(images))``."""
        return self.forward_features(self.encode_images(images))

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict_proba(self, images: Sequence[ImageInput] | torch.Tensor) -> torch.Tensor:
        """Images (PIL images, paths, NumPy arrays or image tensors — see
        :func:`~vprompt.data.images.array_to_pil` — or one B x 3 x H x W tensor from
        ``input_transform(False)``) → B x C softmax probabilities on the CPU, in eval mode (bf16
        autocast on CUDA)."""
        from vprompt.data.images import open_rgb
        from vprompt.utils.precision import autocast_for

        if not isinstance(images, torch.Tensor):
            transform = self.input_transform(False)
            pils = [open_rgb(im) for im in images]
            images = torch.stack([transform(im) for im in pils])
        device = next(itertools.chain(self.parameters(), self.buffers()), images).device
        was = self.training
        self.eval()
        try:
            with autocast_for(device):
                logits = self(images.to(device)).logits
        finally:
            self.train(was)
        return logits.float().softmax(dim=-1).cpu()

    def predict(
        self, images: Sequence[ImageInput] | torch.Tensor, top_k: int = 5
    ) -> list[list[Prediction]]:
        """Top-k labels per image with softmax probabilities, highest first."""
        return topk_predictions(self.predict_proba(images), self.classnames, top_k)

    # ------------------------------------------------------------------ state
    def prompt_tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors of the prompt state, by name: the module's persistent state outside
        the backbone. Override only when the state lives elsewhere (e.g. in a buffer that is
        otherwise rebuilt); :meth:`prompt_state` and :meth:`load_prompt_state` follow it."""
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if not _frozen(k)}

    def check_prompt_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Refuse values the method cannot use, before any is loaded (default: nothing).

        Called by :meth:`load_prompt_state` once names, shapes, kinds and finiteness are
        checked; override for value ranges, e.g. indices that must point into a table.

        Raises:
            PackError: Naming the tensor and the values it may hold.
        """
        return None

    def pack_notes(self) -> dict[str, Any]:
        """JSON-ready information a pack carries for people, never read back into the method
        (the pack's ``extra``): e.g. the prompts a search chose. Default: none."""
        return {}

    def prompt_state(self) -> dict[str, torch.Tensor]:
        """Only the learned / derived prompt tensors (on CPU): what a pack stores."""
        return {k: v.detach().cpu().contiguous() for k, v in self.prompt_tensors().items()}

    def load_prompt_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy prompt tensors into the method, refusing other names, shapes or kinds.

        Raises:
            PackError: Missing or unexpected names, a shape that does not fit (only the first
                dimension of ``data_shaped_state`` tensors may differ, all alike), a
                floating-point tensor where an integer one belongs (or the reverse), NaN or
                infinite values, or what :meth:`check_prompt_state` refuses.
        """
        own = self.prompt_tensors()
        check_state_keys(self.name, set(own), tensors)
        hint = f" {self.state_hint}" if self.state_hint else ""
        for key in sorted(own):
            target, value = own[key], tensors[key]
            if value.dtype.is_floating_point != target.dtype.is_floating_point:
                raise PackError(
                    f"{self.name} tensor {key!r} is {str(value.dtype).removeprefix('torch.')}, "
                    f"expected {str(target.dtype).removeprefix('torch.')}"
                )
            fits = tuple(value.shape) == tuple(target.shape)
            if key in self.data_shaped_state:
                fits = value.dim() == target.dim() and value.shape[1:] == target.shape[1:]
            if not fits:
                raise PackError(
                    f"{self.name} tensor {key!r} has shape {tuple(value.shape)}, expected "
                    f"{tuple(target.shape)}{hint}"
                )
            if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
                raise PackError(f"{self.name} tensor {key!r} holds NaN or infinite values")
        rows = {key: int(tensors[key].shape[0]) for key in sorted(self.data_shaped_state)}
        if len(set(rows.values())) > 1:
            raise PackError(f"{self.name} tensors must have the same number of rows: {rows}")
        self.check_prompt_state(tensors)
        with torch.no_grad():
            for key, target in own.items():
                value = tensors[key].to(target.device, target.dtype)
                if value.shape == target.shape:
                    target.copy_(value)
                else:  # a data-shaped tensor: take the stored size
                    target.data = value.clone()


def _frozen(name: str) -> bool:
    """Whether a state / parameter name belongs to the frozen backbone."""
    return name == "backbone" or name.startswith("backbone.")
