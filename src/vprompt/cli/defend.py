"""``vprompt defend eval``: what an input defence costs clean and buys under a patch."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from vprompt.cli.attack import build_victim, robust_options, victim_options
from vprompt.cli.common import device_option, friendly_errors, main, output_folder
from vprompt.utils import jsonio


@main.group("defend")
def defend_group() -> None:
    """Input defences against adversarial patches (LGS, feature masking, PatchCleanser)."""


def _patch_size_override(
    name: str, overrides: tuple[str, ...], patch_file: Any, victim: Any
) -> tuple[list[str], list[str]]:
    """``overrides`` plus ``patch_size`` = the patch's covering square when the defence has
    that setting and ``--set`` left it alone; and a note saying so."""
    from vprompt.attack.victim import input_size
    from vprompt.defend import DEFENSES
    from vprompt.defend.evaluate import covering_fraction

    fields = {f.name for f in dataclasses.fields(DEFENSES.get(name).config_class)}
    given = {item.split("=", 1)[0].strip() for item in overrides}
    if patch_file is None or "patch_size" not in fields or "patch_size" in given:
        return list(overrides), []
    h, w = input_size(victim)
    fraction = covering_fraction(patch_file.transform, h, w, int(patch_file.patch.shape[-1]))
    note = (
        f"patch_size={fraction:.4g}: the smallest square holding every placement of the "
        "patch (largest drawn area at the worst rotation); --set patch_size=… to choose"
    )
    return [*overrides, f"patch_size={fraction!r}"], [note]


@defend_group.command("eval")
@click.option(
    "--defense", "defense_name", required=True, help="lgs, feature-mask or patchcleanser."
)
@click.option(
    "--patch",
    "patch_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="A patch file from `vprompt attack train` (without it: clean accuracy only).",
)
@victim_options
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Defence setting, e.g. k=4 or patch_size=0.05 (repeatable).",
)
@robust_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@friendly_errors
@output_folder("defend-eval", param="out_dir")
def eval_cmd(
    defense_name: str,
    patch_path: str | None,
    model: str | None,
    weights: str | None,
    pack_path: str | None,
    allow_download: bool,
    data_spec: str,
    data_root: str | None,
    batch_size: int,
    seed: int,
    overrides: tuple[str, ...],
    placements: int,
    grid: int,
    test_subset: int | None,
    out_dir: str,
    device: str,
    as_json: bool,
) -> None:
    """Clean accuracy without and with a defence and, with --patch, accuracy under the patch
    (seeded random placements and the worst grid position) without and with it, on the TEST
    split; PatchCleanser adds its certified robust accuracy. Writes OUT/defend.json,
    OUT/defend.md and OUT/defend.png.

    With --patch the victim defaults to the one the patch was trained against, and a
    defence's patch_size to the square that holds every placement of the patch."""
    from vprompt.attack.patch_file import load_patch
    from vprompt.attack.robust import RobustConfig
    from vprompt.backbones.registry import resolve_device
    from vprompt.data.sources import load_data
    from vprompt.defend import DEFENSES, build_defense
    from vprompt.defend.evaluate import evaluate_defense_on
    from vprompt.defend.report import markdown_table, write_report
    from vprompt.methods.config import apply_overrides

    # Name and settings are checked before any data or model is loaded.
    apply_overrides(DEFENSES.get(defense_name).config_class(), list(overrides))
    patch_file = load_patch(patch_path) if patch_path is not None else None
    config = RobustConfig(placements=placements, grid=grid, seed=seed, batch_size=batch_size)
    splits = load_data(data_spec, data_root=data_root, test_only_ok=True)
    classnames = list(splits.test.classnames)
    if model is None and pack_path is None and patch_file is not None:
        recorded = patch_file.victim
        pack_path = recorded.get("pack") if isinstance(recorded.get("pack"), str) else None
        if pack_path is None:
            model = recorded.get("model") if isinstance(recorded.get("model"), str) else None
            if weights is None and isinstance(recorded.get("weights"), str):
                weights = recorded["weights"]
    dev = resolve_device(device)
    victim = build_victim(model, weights, pack_path, allow_download, classnames, dev)
    settings, notes = _patch_size_override(defense_name, overrides, patch_file, victim)
    defense = build_defense(defense_name, victim, settings)
    report = evaluate_defense_on(
        victim, defense, splits, patch_file, config, test_subset=test_subset
    )
    report.notes += notes
    extra = {
        "defense": defense_name,
        "patch": patch_path,
        "data": data_spec,
        "split": "test",
        "victim": victim.description,
    }
    write_report(report, out_dir, extra=extra)
    if as_json:
        click.echo(jsonio.dumps({**extra, **report.to_json()}, ensure_ascii=False))
        return
    click.echo(markdown_table(report).rstrip())
    click.echo(f"outputs: {out_dir} (defend.json, defend.md, defend.png)")
