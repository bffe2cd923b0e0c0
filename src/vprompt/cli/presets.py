"""``vprompt presets``: the published settings shipped as YAML presets."""

from __future__ import annotations

import textwrap

import click

from vprompt.cli.common import friendly_errors, main
from vprompt.utils import jsonio


@main.command("presets")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable list (with configs).")
@click.option("--method", "method_name", default=None, help="Only this method's presets.")
@friendly_errors
def presets_cmd(as_json: bool, method_name: str | None) -> None:
    """List the presets (paper settings) with their sources and notes.

    Use one with `vprompt train --preset NAME` or `vprompt protocol … --preset NAME`;
    `--set` overrides go on top of it.
    """
    from vprompt.methods.presets import PRESETS

    rows = [p for name, p in PRESETS.items() if method_name in (None, p.method)]
    if as_json:
        click.echo(jsonio.dumps([p.to_dict() for p in rows], indent=1, ensure_ascii=False))
        return
    if method_name is not None:
        _settings(method_name)
    if not rows:
        click.echo("no presets" + (f" for method {method_name!r}" if method_name else ""))
        return
    for p in rows:
        model = f"  (paper model: {p.model})" if p.model else ""
        click.echo(f"{p.name}{model}")
        if p.epochs_by_shots:
            by = ", ".join(f"{k}: {v}" for k, v in p.epochs_by_shots.items())
            click.echo(f"    epochs by shots: {by}")
        click.echo(_wrap(p.note, "    ", "    "))
        click.echo(_wrap(f"source: {p.source}", "    ", "        "))


def _wrap(text: str, first: str, rest: str) -> str:
    # Preset names and paths hold hyphens; never break inside them.
    return textwrap.fill(
        text, 100, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False
    )


def _settings(method_name: str) -> None:
    """The method's settings: every ``--set`` key with its default and meaning."""
    from vprompt.methods.config import config_help
    from vprompt.methods.registry import METHODS

    cls = METHODS.get(method_name)
    click.echo(f"{method_name} settings (--set KEY=VALUE; defaults are the paper's):")
    for key, default, meaning in config_help(cls.Config):
        value = jsonio.dumps(default, ensure_ascii=False)
        if len(value) > 40:
            value = value[:37] + "..."
        click.echo(_wrap(f"{key} = {value}" + (f" — {meaning}" if meaning else ""), "  ", "      "))
    click.echo("")
