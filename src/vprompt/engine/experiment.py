"""One run of one method: its config, then fit, then the test — the rule written once.

A method's config for a run is built in this order (:meth:`Experiment.config`):

1. the method's own defaults (the paper's);
2. the preset, if any (``vprompt presets``), merged key by key, then its ``by_dataset``
   overrides for the run's benchmark dataset (where the reference's setting differs per
   dataset);
3. the preset's epochs for the run's shots (``epochs_by_shots``), unless ``--set`` gives
   ``optim.epochs``;
4. the dataset's template in the method's declared ``template_field`` (runs on a benchmark
   dataset), unless ``--set`` gives that field (a template the user set explicitly wins) or
   the method's reference uses its own template there;
5. the ``--set`` overrides.

Before the preset, a run on a benchmark dataset applies the method's
``reference_settings`` for that dataset (the per-dataset values of its reference code).

:func:`train_and_test` fits a built method (training-free methods that use training data run
only their set-up; methods that use none are not fitted) and evaluates it on the test split.
:func:`run` is the library's entry point for a whole run from names (what ``vprompt train``
calls); the protocol runner builds each job with :class:`Experiment` and
:func:`train_and_test` too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from vprompt.data.dataset import ClassificationDataset, DataSplits
from vprompt.data.feature_cache import FeatureCache
from vprompt.engine.distributed import is_main
from vprompt.engine.evaluate import EvalResult, evaluate
from vprompt.engine.fit import TEST_METRICS_FILE, FitResult, Selection, fit
from vprompt.engine.runtime import seed_everything
from vprompt.errors import ConfigError
from vprompt.methods.base import PromptMethod
from vprompt.methods.config import apply_config_mapping, apply_overrides, with_epochs
from vprompt.methods.presets import Preset, get_preset, resolve_method
from vprompt.methods.registry import METHODS
from vprompt.utils import jsonio
from vprompt.utils.io import atomic_write_text


@dataclass(frozen=True)
class Experiment:
    """How one method's config is made for a run (the rule in the module docstring).

    Attributes:
        method: Registered method name; may be None when ``preset`` names it.
        preset: A published setting (``<method>/<setting>``), or None.
        overrides: ``KEY=VALUE`` strings (``--set``), applied last.
    """

    method: str | None = None
    preset: str | None = None
    overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        preset = get_preset(self.preset) if self.preset else None
        object.__setattr__(self, "method", resolve_method(preset, self.method))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        METHODS.get(str(self.method))  # an unknown name fails here, with suggestions
        self.base_config()  # so bad overrides fail before any model is loaded

    @property
    def method_class(self) -> type[PromptMethod]:
        return METHODS.get(str(self.method))

    @property
    def preset_spec(self) -> Preset | None:
        return get_preset(self.preset) if self.preset else None

    @property
    def user_keys(self) -> frozenset[str]:
        """The dotted keys the overrides set (``optim.epochs``, ``template`` …)."""
        return frozenset(o.split("=", 1)[0].strip() for o in self.overrides)

    def base_config(self) -> Any:
        """Defaults, preset and overrides: what every run of this experiment shares."""
        config, _ = self.config()
        return config

    def config(
        self,
        *,
        shots: int | None = None,
        dataset: str | None = None,
        template: str | None = None,
    ) -> tuple[Any, list[str]]:
        """The config of one run, and one note per step that changed a value the user did
        not set (for the CLI to print).

        Args:
            shots: Shots per class of the run (selects the preset's epochs).
            dataset: The benchmark dataset of the run (selects the method's reference
                settings for it).
            template: That dataset's standard template, for a method that declares a
                template field (its reference's own template for the dataset wins).
        """
        cls = self.method_class
        notes: list[str] = []
        config = cls.Config()
        settings = cls.reference_settings.get(dataset, {}) if dataset else {}
        if settings:
            where = f"{cls.name}'s reference settings for {dataset}"
            config = apply_config_mapping(config, settings, what=where)
            notes.append(f"{where}: {jsonio.dumps(settings, sort_keys=True)}")
        preset = self.preset_spec
        if preset is not None:
            config = apply_config_mapping(config, preset.config, what=f"preset {preset.name}")
            own = preset.by_dataset.get(dataset, {}) if dataset else {}
            if own:
                where = f"preset {preset.name} on {dataset}"
                config = apply_config_mapping(config, own, what=where)
                notes.append(f"{where}: {jsonio.dumps(own, sort_keys=True)}")
            epochs = None if "optim.epochs" in self.user_keys else preset.epochs_for(shots)
            if epochs is not None:
                config = with_epochs(config, epochs)
                notes.append(f"preset {preset.name}: {shots} shots -> {epochs} epochs")
        target = cls.capabilities.template_field
        fill = target is not None and target not in self.user_keys and target not in settings
        if template is not None and fill:
            config = cls.with_templates(config, (template,))
        config = apply_overrides(config, self.overrides, notes)
        found = getattr(config, "descriptions", None)
        if dataset and isinstance(found, str) and "{dataset}" in found:
            # One class-description file per benchmark dataset (``--descriptions DIR/{dataset}``).
            config = dataclasses.replace(config, descriptions=found.replace("{dataset}", dataset))
        return config, notes

    def build(
        self,
        backbone: Any,
        classnames: Sequence[str],
        *,
        shots: int | None = None,
        dataset: str | None = None,
        template: str | None = None,
    ) -> PromptMethod:
        """The method for one run, on a frozen backbone."""
        config, _ = self.config(shots=shots, dataset=dataset, template=template)
        return self.method_class(backbone, list(classnames), config)


def train_and_test(
    method: PromptMethod,
    train: ClassificationDataset | None,
    test: ClassificationDataset,
    *,
    out_dir: str | Path,
    val: ClassificationDataset | None = None,
    select: Selection | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    feature_cache: FeatureCache | None = None,
    num_workers: int = 0,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    eval_batch_size: int | None = None,
    desc: str = "test",
) -> tuple[FitResult | None, EvalResult]:
    """Fit ``method`` on ``train`` (unless it uses no training data) and test it.

    Args:
        train: Training data; None only for methods that use none (zero-shot).
        val: Validation data (epoch selection and the method's hooks).
        select: See :func:`~vprompt.engine.fit.fit` (default: best-val when ``val`` is given).
        eval_batch_size: Test batch size (default: the training batch size, at least 64).

    Returns:
        The fit result (None for methods that use no training data) and the test result.
    """
    result = None
    if method.capabilities.uses_training_data:
        if train is None:
            raise ConfigError(f"{method.name} learns from training data; none was given")
        result = fit(
            method,
            train,
            val=val,
            select=select,
            out_dir=out_dir,
            device=device,
            seed=seed,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            num_workers=num_workers,
            feature_cache=feature_cache,
        )
    if eval_batch_size is None:
        trains = method.capabilities.trains
        eval_batch_size = max(method.config.optim.batch_size, 64) if trains else 256
    scores = evaluate(
        method,
        test,
        device=device,
        num_workers=num_workers,
        batch_size=eval_batch_size,
        progress=progress,
        desc=desc,
        feature_cache=feature_cache,
    )
    return result, scores


@dataclass(frozen=True)
class RunReport:
    """What :func:`run` did: the test metrics and where the outputs are.

    Attributes:
        method: The fitted method (in eval mode).
        fit: The fit result (None for methods that use no training data).
        test: Test metrics.
        summary: The JSON written to ``test_metrics.json``.
        notes: What the config rule changed (e.g. the preset's epochs for the shots).
    """

    method: PromptMethod
    fit: FitResult | None
    test: EvalResult
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def run(
    method: str | None = None,
    *,
    data: str | Sequence[str],
    out_dir: str | Path,
    model: str | None = None,
    weights: str | None = None,
    preset: str | None = None,
    overrides: Sequence[str] = (),
    data_root: str | Path | None = None,
    shots: int | None = None,
    subsample: Literal["all", "base", "new"] = "all",
    seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
    device: str | torch.device = "auto",
    feature_cache: str | Path | None = None,
    num_workers: int = 0,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    unlabeled: str | Path | None = None,
) -> RunReport:
    """One whole run from names: data, backbone, config, fit, test, ``test_metrics.json``.

    Args:
        method: Registered method (optional with ``preset``).
        data: A ``--data`` spec (``folder:ROOT``, ``fashion-mnist``, ``oxford_pets`` …), or
            several for methods that learn across datasets (``multi_dataset``): their
            classes follow one another (:mod:`vprompt.data.union`), and ``train_subset`` /
            ``test_subset`` apply to each dataset.
        out_dir: The run folder (pack, metrics, plots, ``test_metrics.json``).
        model: Backbone as ``family:arch`` (default: the preset's model).
        weights: Weight source (default: the model's default tag).
        preset: A published setting (see ``vprompt presets``).
        overrides: ``KEY=VALUE`` config overrides.
        shots: The reference's seeded K-shot training split (seed: ``seed``).
        subsample: Benchmark datasets: the base or new half of the classes.
        seed: Few-shot sampling, initialisation and training seed; everything random is
            seeded from it before the method is built, so the same seed gives the same pack.
        train_subset / test_subset: Seeded random subsets of N images.
        feature_cache: Folder of the frozen-feature cache (None: no cache).
        resume / overwrite: See :func:`~vprompt.engine.fit.fit`.
        unlabeled: A folder of unlabelled training images (every image under it) that
            replaces the training split, for methods that learn without labels; ``data``
            still gives the classes, the validation and the test split.

    Raises:
        ConfigError: Unknown settings, or a method that uses no training data (it has nothing
            to learn from ``data``; build it directly, e.g. ``vprompt zeroshot``).
    """
    from vprompt.backbones import load_backbone
    from vprompt.backbones.registry import resolve_device
    from vprompt.data.sources import load_data

    experiment = Experiment(method, preset, tuple(overrides))
    cls = experiment.method_class
    if not cls.capabilities.uses_training_data:
        raise ConfigError(
            f"method {experiment.method!r} learns nothing from training data; "
            "see `vprompt zeroshot` (or build it directly)"
        )
    chosen = model or (experiment.preset_spec.model if experiment.preset_spec else None)
    if not chosen:
        raise ConfigError("give a model (FAMILY:ARCH, e.g. clip:ViT-B-16)")
    specs = [data] if isinstance(data, str) else [str(d).strip() for d in data]
    if not specs:
        raise ConfigError("give the data to train on (--data)")
    if len(specs) > 1 and not cls.capabilities.multi_dataset:
        raise ConfigError(
            f"{experiment.method} trains on one dataset (one --data); several are for methods "
            "that learn across datasets (e.g. dam-vp-meta)"
        )
    twice = sorted({s for s in specs if specs.count(s) > 1})
    if twice:
        raise ConfigError(f"--data {twice[0]} is given twice; give each dataset once")
    if len(specs) > 1 and unlabeled is not None:
        raise ConfigError("--unlabeled replaces one dataset's training images: give one --data")
    suite = benchmark_dataset(specs[0]) if len(specs) == 1 else None
    config, notes = experiment.config(
        shots=shots,
        dataset=suite.name if suite else None,
        template=suite.template if suite else None,
    )
    loaded = [
        load_data(spec, data_root=data_root, shots=shots, seed=seed, subsample=subsample)
        for spec in specs
    ]
    if len(loaded) > 1:
        from vprompt.data.union import union_splits

        loaded = [
            dataclasses.replace(
                s,
                train=random_subset(s.train, train_subset, seed),
                test=random_subset(s.test, test_subset, seed + 1),
            )
            for s in loaded
        ]
        train_subset = test_subset = None  # taken per dataset
    named = list(zip(specs, loaded, strict=True))
    splits: DataSplits = loaded[0] if len(loaded) == 1 else union_splits(named)
    train_data: ClassificationDataset = splits.train
    if unlabeled is not None:
        if cls.capabilities.uses_labels:
            raise ConfigError(
                f"{experiment.method} learns from labels; unlabelled training images are for "
                "methods that learn without them (e.g. promptkd)"
            )
        from vprompt.data.folder import UnlabeledImages

        train_data = UnlabeledImages(unlabeled, splits.classnames)
    train = random_subset(train_data, train_subset, seed)
    test = random_subset(splits.test, test_subset, seed + 1)
    dev = resolve_device(device)
    backbone = load_backbone(chosen, weights, device=dev)
    seed_everything(seed)
    built = cls(backbone, splits.classnames, config)
    cache = FeatureCache(feature_cache) if feature_cache is not None else None
    fitted, scores = train_and_test(
        built,
        train,
        test,
        out_dir=out_dir,
        val=splits.val,
        seed=seed,
        device=dev,
        feature_cache=cache,
        num_workers=num_workers,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "method": experiment.method,
        "preset": preset,
        "model": chosen,
        "weights": backbone.weights,
        "data": specs[0] if len(specs) == 1 else specs,
        "unlabeled": str(unlabeled) if unlabeled is not None else None,
        "shots": shots,
        "subsample": subsample,
        "seed": seed,
        "test_images": scores.n,
        "test_accuracy": scores.accuracy,
        "test_loss": scores.loss,
        "per_class_accuracy": scores.per_class_accuracy,
        "selected": fitted.selected if fitted else None,
        "best_epoch": fitted.best_epoch if fitted else None,
        "pack": str(fitted.pack_path) if fitted else None,
    }
    if is_main():  # under torchrun every rank tests the same pack; one writes
        atomic_write_text(
            out / TEST_METRICS_FILE, jsonio.dumps(summary, indent=1, ensure_ascii=False) + "\n"
        )
    return RunReport(built, fitted, scores, summary, notes)


def random_subset(data: ClassificationDataset, n: int | None, seed: int) -> ClassificationDataset:
    """A seeded random subset of ``n`` items (all of them when ``n`` is None or too large)."""
    if n is None or n >= len(data):
        return data
    from vprompt.data.dataset import Subset

    gen = torch.Generator().manual_seed(seed)
    return Subset(data, sorted(torch.randperm(len(data), generator=gen)[:n].tolist()))


def benchmark_dataset(data: str) -> Any:
    """The registered benchmark dataset a ``--data`` spec names, or None for other sources."""
    from vprompt.data.sources import DATA_SOURCES
    from vprompt.data.suite import SUITE

    name = data.partition(":")[0].strip().lower()
    if name in DATA_SOURCES or data.strip() not in SUITE:
        return None
    return SUITE.get(data.strip())
