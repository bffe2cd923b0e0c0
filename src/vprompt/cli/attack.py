"""``vprompt attack train | eval``: universal adversarial patches and robust accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from vprompt.cli.common import device_option, friendly_errors, main, output_folder
from vprompt.utils import jsonio

_DATA_HELP = "fashion-mnist[:PATH], folder:PATH, csv:PATH, json:PATH, or a benchmark dataset name."


@main.group("attack")
def attack_group() -> None:
    """Adversarial patches (Brown et al. 2017) against frozen models and prompt packs."""


def victim_options(fn: Any) -> Any:
    for option in reversed(
        [
            click.option("--model", default=None, help="Frozen model as FAMILY:ARCH (no prompt)."),
            click.option(
                "--weights",
                default=None,
                help="Weights: a tag, hf-hub:ORG/REPO, local file or folder, or 'none'.",
            ),
            click.option(
                "--pack",
                "pack_path",
                default=None,
                type=click.Path(dir_okay=False),
                help="Attack this prompt pack applied on its backbone.",
            ),
            click.option(
                "--allow-download",
                is_flag=True,
                help="Let --pack's weights download when they are not on this machine.",
            ),
            click.option("--data", "data_spec", required=True, help=_DATA_HELP),
            click.option(
                "--data-root",
                type=click.Path(file_okay=False),
                default=None,
                help="Folder holding the benchmark datasets (default: $VPROMPT_DATA_ROOT).",
            ),
            click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1)),
            click.option("--seed", default=0, show_default=True, type=int),
        ]
    ):
        fn = option(fn)
    return fn


def robust_options(fn: Any) -> Any:
    """``--placements``, ``--grid`` and ``--test-subset``: how a patch is scored on the test
    split (``attack eval``, ``attack harden``, ``defend eval``)."""
    options = [
        click.option("--placements", default=4, show_default=True, type=click.IntRange(1, 1000)),
        click.option(
            "--grid",
            default=3,
            show_default=True,
            type=click.IntRange(1, 64),
            help="Worst case over GRID x GRID patch positions.",
        ),
        click.option(
            "--test-subset",
            default=None,
            type=click.IntRange(min=1),
            help="Evaluate on a seeded random subset of N test images.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def build_victim(
    model: str | None,
    weights: str | None,
    pack_path: str | None,
    allow_download: bool,
    classnames: list[str],
    device: Any,
) -> Any:
    """The victim: ``--pack`` on its backbone, else ``--model`` with no prompt."""
    from vprompt.attack.victim import victim_from_backbone, victim_from_method

    if pack_path is not None:
        from vprompt.engine.pack import build_from_pack, check_classnames, load_pack

        pack = load_pack(pack_path)
        if model is not None and model != pack.backbone.name:
            raise click.UsageError(
                f"--model {model} differs from the pack's backbone {pack.backbone.name}; "
                "leave --model out with --pack"
            )
        check_classnames(pack, classnames)
        method = build_from_pack(
            pack, weights=weights, device=device, allow_download=allow_download
        )
        where = str(Path(pack_path).expanduser().absolute())
        return victim_from_method(
            method,
            {"pack": where, "model": pack.backbone.name, "weights": pack.backbone.weights},
        )
    if model is None:
        raise click.UsageError("give --model FAMILY:ARCH or --pack PACK")
    from vprompt.backbones import load_backbone

    backbone = load_backbone(model, weights, device=device)
    return victim_from_backbone(
        backbone, classnames, {"pack": None, "model": model, "weights": backbone.weights}
    )


def _target_index(target: str | None, classnames: list[str]) -> int | None:
    """``--target``: a class name, or a class index."""
    if target is None:
        return None
    if target in classnames:
        return classnames.index(target)
    if target.isdigit() and int(target) < len(classnames):
        return int(target)
    shown = ", ".join(classnames[:10]) + (" …" if len(classnames) > 10 else "")
    raise click.BadParameter(
        f"{target!r} is neither a class name nor an index below {len(classnames)} ({shown})",
        param_hint="--target",
    )


@attack_group.command("train")
@victim_options
@click.option(
    "--size",
    default=0.1,
    show_default=True,
    type=float,
    help="Patch area as a fraction of the image area (e.g. 0.05, 0.1).",
)
@click.option("--shape", type=click.Choice(["square", "circle"]), default="square")
@click.option("--target", default=None, help="Targeted attack: a class name or index.")
@click.option("--epochs", default=5, show_default=True, type=click.IntRange(1))
@click.option("--optimizer", type=click.Choice(["adam", "sign-sgd"]), default="adam")
@click.option("--lr", default=None, type=float, help="Step size (default: 0.05 Adam, 2/255 sign).")
@click.option(
    "--max-rotation", default=22.5, show_default=True, type=float, help="Degrees, drawn ±."
)
@click.option(
    "--train-subset",
    default=None,
    type=click.IntRange(min=1),
    help="Train on a seeded random subset of N training images.",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@friendly_errors
@output_folder("attack-train", param="out_dir")
def train_cmd(
    model: str | None,
    weights: str | None,
    pack_path: str | None,
    allow_download: bool,
    data_spec: str,
    data_root: str | None,
    batch_size: int,
    seed: int,
    size: float,
    shape: str,
    target: str | None,
    epochs: int,
    optimizer: str,
    lr: float | None,
    max_rotation: float,
    train_subset: int | None,
    out_dir: str,
    device: str,
    as_json: bool,
) -> None:
    """Learn a universal adversarial patch on the TRAINING split; writes OUT/patch.safetensors
    and OUT/patch.png."""
    from vprompt.attack.eot import PatchTransformConfig
    from vprompt.attack.patch_file import PatchFile, save_patch, save_patch_png
    from vprompt.attack.universal import PatchTrainConfig, describe_config, train_patch
    from vprompt.backbones.registry import resolve_device
    from vprompt.data.sources import load_data
    from vprompt.engine.experiment import random_subset

    transform = PatchTransformConfig(size=size, shape=shape, max_rotation=max_rotation)  # type: ignore[arg-type]
    splits = load_data(data_spec, data_root=data_root)
    classnames = list(splits.train.classnames)
    config = PatchTrainConfig(
        transform=transform,
        target=_target_index(target, classnames),
        optimizer=optimizer,  # type: ignore[arg-type]  # click.Choice checked it
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
    )
    dev = resolve_device(device)
    victim = build_victim(model, weights, pack_path, allow_download, classnames, dev)
    train = random_subset(splits.train, train_subset, seed)
    trained = train_patch(victim, train, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    patch_file = PatchFile(
        patch=trained.patch,
        transform=transform,
        classnames=classnames,
        target=config.target,
        victim={**victim.description, "data": data_spec},
        train={**describe_config(config), "images": len(train)},
        metrics={"history": trained.history},
    )
    path = save_patch(patch_file, out / "patch.safetensors")
    save_patch_png(trained.patch, out / "patch.png", shape)
    summary = {
        "patch": str(path),
        "png": str(out / "patch.png"),
        "patch_pixels": int(trained.patch.shape[-1]),
        "target": config.target,
        "history": trained.history,
    }
    if as_json:
        click.echo(jsonio.dumps(summary, ensure_ascii=False))
        return
    last = trained.history[-1]
    click.echo(f"patch:   {path} ({summary['patch_pixels']} px, also patch.png)")
    click.echo(f"training images fooled in the last epoch: {100 * last['train_fooled']:.1f}%")


@attack_group.command("eval")
@click.option(
    "--patch",
    "patch_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="A patch file from `vprompt attack train`.",
)
@victim_options
@robust_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@friendly_errors
@output_folder("attack-eval", param="out_dir")
def eval_cmd(
    patch_path: str,
    model: str | None,
    weights: str | None,
    pack_path: str | None,
    allow_download: bool,
    data_spec: str,
    data_root: str | None,
    batch_size: int,
    seed: int,
    placements: int,
    grid: int,
    test_subset: int | None,
    out_dir: str,
    device: str,
    as_json: bool,
) -> None:
    """Clean and patched accuracy and attack success of a patch on the TEST split; writes
    OUT/robust.json, OUT/robust.md, OUT/patch.png and OUT/examples.png.

    The victim defaults to the one the patch was trained against (its --pack or --model)."""
    from vprompt.attack.patch_file import load_patch
    from vprompt.attack.robust import RobustConfig, evaluate_patch_on, write_report
    from vprompt.backbones.registry import resolve_device
    from vprompt.data.sources import load_data

    patch_file = load_patch(patch_path)
    config = RobustConfig(placements=placements, grid=grid, seed=seed, batch_size=batch_size)
    splits = load_data(data_spec, data_root=data_root, test_only_ok=True)
    classnames = list(splits.test.classnames)
    if model is None and pack_path is None:
        recorded = patch_file.victim
        pack_path = recorded.get("pack") if isinstance(recorded.get("pack"), str) else None
        if pack_path is None:
            model = recorded.get("model") if isinstance(recorded.get("model"), str) else None
            if weights is None and isinstance(recorded.get("weights"), str):
                weights = recorded["weights"]
    dev = resolve_device(device)
    victim = build_victim(model, weights, pack_path, allow_download, classnames, dev)
    report = evaluate_patch_on(victim, patch_file, splits, config, test_subset=test_subset)
    extra = {"patch": patch_path, "data": data_spec, "split": "test", "victim": victim.description}
    write_report(report, patch_file, out_dir, extra=extra)
    if as_json:
        click.echo(jsonio.dumps({**extra, **report.to_json()}, ensure_ascii=False))
        return
    from vprompt.attack.robust import markdown_table

    click.echo(markdown_table(report).rstrip())
    click.echo(f"outputs: {out_dir} (robust.json, robust.md, patch.png, examples.png)")


@attack_group.command("harden")
@click.option(
    "--pack",
    "pack_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The prompt pack to harden (a method that trains: visual-prompt, vpt, coop …).",
)
@click.option(
    "--weights",
    default=None,
    help="Weights of the pack's backbone: a tag, hf-hub:ORG/REPO, local file or folder.",
)
@click.option(
    "--allow-download",
    is_flag=True,
    help="Let the pack's weights download when they are not on this machine.",
)
@click.option("--data", "data_spec", required=True, help=_DATA_HELP)
@click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder holding the benchmark datasets (default: $VPROMPT_DATA_ROOT).",
)
@click.option(
    "--size",
    default=0.1,
    show_default=True,
    type=float,
    help="Patch area as a fraction of the image area (e.g. 0.05, 0.1).",
)
@click.option("--shape", type=click.Choice(["square", "circle"]), default="square")
@click.option("--epochs", default=3, show_default=True, type=int, help="Hardening epochs.")
@click.option(
    "--patch-steps",
    default=20,
    show_default=True,
    type=int,
    help="The attacker's patch updates per epoch, warm-started from the last patch.",
)
@click.option(
    "--mix",
    default=0.5,
    show_default=True,
    type=float,
    help="Weight of the patched loss in [0, 1]; 1 - MIX weighs the clean loss.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--lr", default=None, type=float, help="Peak prompt learning rate (default: the method's)."
)
@click.option(
    "--batch-size",
    default=None,
    type=click.IntRange(1),
    help="Images per step (default: the method's optim.batch_size; 32 for the attacks).",
)
@click.option(
    "--attack-epochs",
    default=3,
    show_default=True,
    type=click.IntRange(1),
    help="Epochs of the from-scratch patch trained against each pack for the comparison.",
)
@click.option(
    "--train-subset",
    default=None,
    type=click.IntRange(min=1),
    help="Harden and attack on a seeded random subset of N training images.",
)
@robust_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@friendly_errors
@output_folder("attack-harden", param="out_dir")
def harden_cmd(
    pack_path: str,
    weights: str | None,
    allow_download: bool,
    data_spec: str,
    data_root: str | None,
    size: float,
    shape: str,
    epochs: int,
    patch_steps: int,
    mix: float,
    seed: int,
    lr: float | None,
    batch_size: int | None,
    attack_epochs: int,
    placements: int,
    grid: int,
    train_subset: int | None,
    test_subset: int | None,
    out_dir: str,
    device: str,
    as_json: bool,
) -> None:
    """Adversarially train a prompt pack against a universal patch that adapts to it every
    epoch (the backbone stays frozen); writes the hardened OUT/prompt.safetensors, the last
    patch OUT/patch.safetensors, and OUT/harden.json / OUT/harden.md comparing both packs on
    the TEST split, each under a patch trained from scratch against it."""
    from vprompt.attack.eot import PatchTransformConfig
    from vprompt.attack.harden import HardenConfig
    from vprompt.attack.harden_report import AttackBudget, harden_pack, markdown_comparison
    from vprompt.backbones.registry import resolve_device
    from vprompt.data.sources import load_data
    from vprompt.engine.pack import load_pack

    config = HardenConfig(
        transform=PatchTransformConfig(size=size, shape=shape),  # type: ignore[arg-type]
        epochs=epochs,
        patch_steps=patch_steps,
        mix=mix,
        seed=seed,
        batch_size=batch_size,
        lr=lr,
    )
    budget = AttackBudget(
        epochs=attack_epochs,
        placements=placements,
        grid=grid,
        train_subset=train_subset,
        test_subset=test_subset,
    )
    pack = load_pack(pack_path)
    splits = load_data(data_spec, data_root=data_root)
    outcome = harden_pack(
        pack,
        splits,
        config,
        budget,
        out_dir,
        pack_source=pack_path,
        data_spec=data_spec,
        weights=weights,
        device=resolve_device(device),
        allow_download=allow_download,
        batch_size=batch_size or 32,
    )
    if as_json:
        click.echo(jsonio.dumps(jsonio.finite(outcome.summary), ensure_ascii=False))
        return
    click.echo(markdown_comparison(outcome).rstrip())
    click.echo(
        f"outputs: {out_dir} (prompt.safetensors, patch.safetensors, harden.json, harden.md)"
    )
