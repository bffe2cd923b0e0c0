"""``vprompt data check | prepare``: verify a dataset install, build one from original archives."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from vprompt.cli.common import friendly_errors
from vprompt.cli.data import data_group
from vprompt.utils import jsonio

if TYPE_CHECKING:
    from vprompt.data.suite.base import SuiteDataset

_DATA_ROOT_HELP = "Folder holding the datasets (default: $VPROMPT_DATA_ROOT)."


def _specs(names: str) -> list[SuiteDataset]:
    """``NAME[,NAME…]`` or ``all`` → registered datasets; unknown names fail before any work."""
    from vprompt.data.suite import SUITE, get_suite

    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        raise click.BadParameter("give a dataset name, a comma-separated list, or 'all'")
    if any(n.lower() == "all" for n in wanted):
        return [SUITE.get(n) for n in SUITE.names()]
    specs = [get_suite(n) for n in wanted]
    return list({s.name: s for s in specs}.values())


@data_group.command("check")
@click.option(
    "--dataset",
    "datasets",
    required=True,
    metavar="NAME[,NAME…]|all",
    help="Registered dataset(s) to check, or 'all'.",
)
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help=_DATA_ROOT_HELP)
@click.option(
    "--images/--no-images",
    "check_images",
    default=False,
    show_default=True,
    help="Also open and decode every referenced image (slow on full installs).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with every report.")
@friendly_errors
def check_cmd(datasets: str, data_root: str | None, check_images: bool, as_json: bool) -> None:
    """Check dataset installs; every problem comes with its fix.

    Verifies the folder, split and auxiliary files, every referenced image, labels and the
    published sizes. Exit code 0 when no dataset has errors (count warnings are expected for
    subsets), 1 otherwise.
    """
    from vprompt.data.check import check_dataset
    from vprompt.data.sources import resolve_data_root

    specs = _specs(datasets)
    root = resolve_data_root(data_root)
    reports = [check_dataset(spec, root, check_images=check_images) for spec in specs]
    failed = [r.dataset for r in reports if not r.ok]
    if as_json:
        payload = {"ok": not failed, "datasets": [r.to_json() for r in reports]}
        click.echo(jsonio.dumps(payload, ensure_ascii=False))
    else:
        for report in reports:
            for line in report.lines():
                click.echo(line)
    if failed:
        click.echo(
            f"vprompt: error: {len(failed)} of {len(reports)} dataset(s) have errors: "
            f"{', '.join(failed)}",
            err=True,
        )
        sys.exit(1)


@data_group.command("prepare")
@click.option("--dataset", "dataset", required=True, help="Registered dataset (oxford_pets, …).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None, help=_DATA_ROOT_HELP)
@click.option(
    "--from",
    "downloads",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder holding the original archives you downloaded (nothing is downloaded).",
)
@click.option(
    "--keep-archives/--remove-archives",
    default=True,
    show_default=True,
    help="Keep the archives (and link extracted folders such as ImageNet's train/), or delete "
    "the archives used and move such folders.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@friendly_errors
def prepare_cmd(
    dataset: str, data_root: str | None, downloads: str, keep_archives: bool, as_json: bool
) -> None:
    """Build a dataset's folder from the original archives you downloaded.

    Looks for the dataset's original files in --from and builds DATA_ROOT/<dataset folder>.
    Safe and resumable: archives are validated member by member and extracted into a
    temporary folder next to the destination, then renamed into place; a second run only adds
    what is missing. Exit code 0 when everything found was put in place, even if the final
    `vprompt data check` still lists something to do (such as downloading the split file).
    """
    from vprompt.data.prepare import prepare_dataset
    from vprompt.data.sources import resolve_data_root
    from vprompt.data.suite import get_suite

    spec = get_suite(dataset)
    root = resolve_data_root(data_root)
    report = prepare_dataset(spec, root, downloads, keep_archives=keep_archives)
    if as_json:
        click.echo(jsonio.dumps(report.to_json(), ensure_ascii=False))
        return
    if report.already_prepared:
        done = "nothing new to add to" if report.notes else "already prepared in"
        click.echo(f"{spec.name}: {done} {report.folder}")
    for line in report.actions:
        click.echo(line)
    for path in report.removed:
        click.echo(f"removed {path}")
    for note in report.notes:
        click.echo(f"note: {note}")
    if report.check is not None:
        for line in report.check.lines():
            click.echo(line)
