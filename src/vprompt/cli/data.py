"""``vprompt data …``: dataset splits, install checks and preparation."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from vprompt.cli.common import friendly_errors, main
from vprompt.utils import jsonio

if TYPE_CHECKING:
    from vprompt.data.items import Datum


@main.group("data")
def data_group() -> None:
    """Datasets: few-shot splits, install checks, preparation."""


@data_group.command("split")
@click.option("--dataset", "dataset", required=True, help="Registered dataset (oxford_pets, …).")
@click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder holding the datasets (default: $VPROMPT_DATA_ROOT).",
)
@click.option("--shots", required=True, type=click.IntRange(min=1), help="Images per class.")
@click.option("--seed", default=1, show_default=True, type=int, help="Sampling seed.")
@click.option(
    "--subsample",
    default="all",
    show_default=True,
    type=click.Choice(["all", "base", "new"]),
    help="Keep the base or new half of the classes (relabelled from 0).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the selection as JSON.")
@friendly_errors
def split_cmd(
    dataset: str, data_root: str | None, shots: int, seed: int, subsample: str, as_json: bool
) -> None:
    """The reference code's seeded K-shot selection (train, then min(K, 4)-shot val).

    Items are printed in the order the sampler produced them; the selection is stored as JSON
    in the dataset's split_fewshot/ folder and reused.
    """
    from vprompt.data.sources import resolve_data_root
    from vprompt.data.tasks import load_suite_task

    root = resolve_data_root(data_root)
    task = load_suite_task(
        dataset,
        root,
        shots=shots,
        seed=seed,
        subsample=subsample,  # type: ignore[arg-type]  # click.Choice checked it
    )
    train = task.train.items if task.train is not None else []
    val = task.val.items if task.val is not None else []
    if as_json:
        payload = {
            "dataset": task.spec.name,
            "shots": shots,
            "seed": seed,
            "subsample": subsample,
            "classnames": task.classnames,
            "train": [_item(d) for d in train],
            "val": [_item(d) for d in val],
        }
        click.echo(jsonio.dumps(payload, ensure_ascii=False))
        return
    click.echo(
        f"{task.spec.title}: {len(train)} train and {len(val)} val images over "
        f"{len(task.classnames)} classes ({shots} shots, seed {seed}, {subsample} classes)"
    )
    val_note = "" if task.spec.fewshot_val else " (the reference validates on the test split)"
    click.echo(f"test: {len(task.test)} images{val_note}")


def _item(d: Datum) -> dict[str, object]:
    return {"path": d.path, "label": d.label, "classname": d.classname}
