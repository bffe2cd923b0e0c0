"""``vprompt pack push`` / ``vprompt pack pull``: prompt packs on the Hugging Face hub."""

from __future__ import annotations

import shutil

import click

from vprompt.cli.common import friendly_errors, main


@main.group("pack")
def pack_group() -> None:
    """Share prompt packs on the Hugging Face hub (`--pack hf-hub:ORG/REPO` reads them)."""


@pack_group.command("push")
@click.argument("pack_path", metavar="PACK", type=click.Path(dir_okay=False))
@click.argument("repo_id", metavar="REPO")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option(
    "--token",
    default=None,
    help="Hub token with write access (default: HF_TOKEN or the `hf auth login` token).",
)
@click.option("--message", "commit_message", default=None, help="Commit message.")
@friendly_errors
def push_cmd(
    pack_path: str, repo_id: str, private: bool, token: str | None, commit_message: str | None
) -> None:
    """Upload PACK to the hub repository REPO (ORG/NAME) with a generated model card."""
    from vprompt.engine.hub import push_pack

    url = push_pack(pack_path, repo_id, token=token, private=private, commit_message=commit_message)
    click.echo(f"vprompt: pushed {pack_path} to {url}", err=True)
    click.echo(f"hf-hub:{repo_id}")


@pack_group.command("pull")
@click.argument("repo_id", metavar="REPO")
@click.option("--revision", default=None, help="Branch, tag or commit (default: main).")
@click.option(
    "--out",
    "out",
    default=None,
    type=click.Path(dir_okay=False),
    help="Copy the pack to this file (default: leave it in the Hugging Face cache).",
)
@friendly_errors
def pull_cmd(repo_id: str, revision: str | None, out: str | None) -> None:
    """Download the prompt pack of hub repository REPO; prints the local file's path."""
    from vprompt.engine.hub import pull_pack
    from vprompt.engine.pack import load_pack
    from vprompt.utils.io import atomic_path

    file = pull_pack(repo_id, revision=revision)
    pack = load_pack(file)  # a repository's file is checked before it is handed on
    if out is not None:
        with atomic_path(out) as tmp:
            shutil.copyfile(file, tmp)
        file = type(file)(out)
    click.echo(
        f"vprompt: {pack.method} pack for {pack.backbone.name}, {len(pack.classnames)} classes",
        err=True,
    )
    click.echo(str(file))
