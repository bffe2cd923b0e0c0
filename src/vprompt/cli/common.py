"""Shared CLI pieces: the ``vprompt`` group, one-line error handling, common options."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from vprompt.errors import VPromptError, describe_os_error, is_allocation_failure

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"vprompt: error: {message}", err=True)
    sys.exit(code)


def friendly_errors(fn: F) -> F:
    """Turn vprompt's own errors, and failed file operations (a full or read-only disk) or
    memory allocations, into one ``vprompt: error: …`` line and exit code 1.

    ``VPROMPT_DEBUG=1`` lets file and memory errors through with their traceback.
    """

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VPromptError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except OSError as exc:
            if os.environ.get("VPROMPT_DEBUG"):
                raise
            _fail(describe_os_error(exc))
        except (MemoryError, RuntimeError) as exc:
            if os.environ.get("VPROMPT_DEBUG") or not is_allocation_failure(exc):
                raise
            _fail("out of memory (a smaller --batch-size, model or input may fit)")

    return run  # type: ignore[return-value]


_NOT_OUTPUT_IDENTITY = frozenset({"out", "out_dir", "overwrite", "as_json", "device"})


def output_folder(
    command: str, *, param: str = "out", by_inputs: bool = True, pass_overwrite: bool = False
) -> Callable[[F], F]:
    """Add ``--overwrite``, check the ``--out`` folder before the command does any work and
    claim it when the command first writes there (:mod:`vprompt.utils.outdir`).

    Args:
        param: The command's parameter holding the folder.
        by_inputs: Only a run with the same arguments (inputs and settings; not --out,
            --json or --device) may write into a folder this command already wrote; False
            for commands whose own checks decide (training resumes only its own checkpoint).
        pass_overwrite: Hand ``overwrite`` on to the command (which replaces a previous run).
    """

    def decorate(fn: F) -> F:
        @wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            from vprompt.utils.outdir import output_folder_for

            overwrite = bool(kwargs.pop("overwrite"))
            identity = None
            if by_inputs:
                identity = {
                    "args": {k: v for k, v in kwargs.items() if k not in _NOT_OUTPUT_IDENTITY}
                }
            if pass_overwrite:
                kwargs["overwrite"] = overwrite
            with output_folder_for(
                kwargs[param], command=command, identity=identity, overwrite=overwrite
            ):
                return fn(*args, **kwargs)

        option = click.option(
            "--overwrite",
            is_flag=True,
            help="Write into --out even if it holds another run's files (they are replaced).",
        )
        return option(run)  # type: ignore[return-value]

    return decorate


model_option = click.option(
    "--model",
    "model",
    default="clip:ViT-B-16",
    show_default=True,
    help="Backbone as FAMILY:ARCH (see `vprompt models`).",
)
weights_option = click.option(
    "--weights",
    default=None,
    help="Weight tag, hf-hub:ORG/REPO, local file or folder, or 'none' (random init). "
    "Default: the model's default tag.",
)


def pack_weights_options(fn: F) -> F:
    """``--weights`` and ``--allow-download`` for commands that open a prompt pack."""
    fn = click.option(
        "--allow-download",
        is_flag=True,
        help="Download the weights the pack names when they are not on this machine "
        "(never done otherwise).",
    )(fn)
    return click.option(
        "--weights",
        default=None,
        help="Weights for the pack's model (a tag, hf-hub:ORG/REPO, local file or folder). "
        "Default: the weights the pack names, from this machine only.",
    )(fn)


preset_option = click.option(
    "--preset",
    "preset_name",
    default=None,
    metavar="NAME",
    help="A published setting (see `vprompt presets`), applied before --set; it names the "
    "method, so --method may be left out.",
)
descriptions_option = click.option(
    "--descriptions",
    default=None,
    metavar="FILE",
    help="Class descriptions for methods that read them (coprompt): a CuPL-style JSON file "
    "mapping each class name to a list of sentences. In a protocol, {dataset} in the path "
    "stands for each dataset's name.",
)


def with_descriptions(overrides: tuple[str, ...], path: str | None) -> tuple[str, ...]:
    """``overrides`` plus ``descriptions=PATH`` (absolute) when ``--descriptions`` was given."""
    if not path:
        return overrides
    return (*overrides, f"descriptions={Path(path).expanduser().absolute()}")


device_option = click.option(
    "--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, … or auto."
)
precision_option = click.option(
    "--precision",
    type=click.Choice(["auto", "bf16", "fp32"]),
    default="auto",
    show_default=True,
    help="Segmenter precision; auto = bf16 autocast on CUDA, fp32 elsewhere.",
)
images_argument = click.argument("images", nargs=-1, required=True)
common_predict_options = [
    click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1)),
    click.option("--json", "as_json", is_flag=True, help="One JSON object per image on stdout."),
    click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1)),
    click.option(
        "--max-pixels",
        default=None,
        type=click.IntRange(min=1),
        help="Refuse images with more pixels than this (default: Pillow's bomb limit).",
    ),
]


def feature_cache_options(fn: F) -> F:
    """``--feature-cache DIR`` / ``--no-feature-cache`` (see :func:`feature_cache_dir`)."""
    fn = click.option("--no-feature-cache", is_flag=True, help="Never cache features.")(fn)
    return click.option(
        "--feature-cache",
        "feature_cache",
        default=None,
        type=click.Path(file_okay=False),
        help="Frozen-feature cache for methods that see images only through frozen features "
        "(default: $VPROMPT_CACHE/features, i.e. ~/.cache/vprompt/features).",
    )(fn)


def feature_cache_dir(path: str | None, disabled: bool) -> Path | None:
    """The cache folder the options name, the default one, or None when disabled."""
    if disabled:
        return None
    if path:
        return Path(path)
    return Path(os.environ.get("VPROMPT_CACHE", Path.home() / ".cache" / "vprompt")) / "features"


def model_for(model: str | None, preset: Any) -> str:
    """``--model``, else the preset's model; a usage error when neither names one."""
    if model:
        return model
    if preset is not None and preset.model:
        return str(preset.model)
    raise click.UsageError("give --model (FAMILY:ARCH, e.g. clip:ViT-B-16)")


def predict_options(fn: F) -> F:
    for option in reversed(common_predict_options):
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vprompt")
def main() -> None:
    """Adapt frozen vision and vision-language models to new tasks through prompts."""
    warnings.showwarning = _show_warning


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Warnings as one ``vprompt: warning: …`` line on stderr (no source location)."""
    if os.environ.get("VPROMPT_DEBUG"):
        _PYTHON_SHOW_WARNING(message, category, filename, lineno, file, line)
        return
    click.echo(f"vprompt: warning: {message}", err=True)


_PYTHON_SHOW_WARNING = warnings.showwarning
