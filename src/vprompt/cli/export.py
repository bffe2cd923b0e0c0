"""``vprompt export onnx``: frozen models and prompt packs as ONNX graphs."""

from __future__ import annotations

import click

from vprompt.cli.common import friendly_errors, main
from vprompt.utils import jsonio


@main.group("export")
def export_group() -> None:
    """Export models to other runtimes."""


@export_group.command("onnx")
@click.option(
    "--what",
    type=click.Choice(["sam-decoder", "pack"]),
    default="sam-decoder",
    show_default=True,
    help="sam-decoder: SAM's prompt encoder + mask decoder (the image encoder stays in "
    "PyTorch); pack: a prompt pack with its frozen backbone.",
)
@click.option("--model", default="sam:vit-base", show_default=True, help="sam:ARCH (sam-decoder).")
@click.option("--weights", default=None, help="Weight source (hub id, local folder, 'none').")
@click.option("--pack", "pack_path", default=None, help="The prompt pack (--what pack).")
@click.option("--allow-download", is_flag=True, help="Let --pack download the weights it names.")
@click.option(
    "--masks",
    type=click.Choice(["all", "best"]),
    default="all",
    show_default=True,
    help="all: 4 masks per object (0 single-mask output, 1-3 candidates); best: one, as "
    "SAM's return_single_mask.",
)
@click.option(
    "--no-upscale",
    is_flag=True,
    help="Output low-res masks only (no orig_im_size input, no full-size masks output).",
)
@click.option(
    "--split",
    is_flag=True,
    help="Two graphs: --out takes the prompt graph (run per click), NAME.image.onnx next to "
    "it the image graph (run once per embedding); what the runtime uses (faster clicks).",
)
@click.option("--opset", default=17, show_default=True, type=click.IntRange(min=17))
@click.option(
    "--out", "out", required=True, type=click.Path(dir_okay=False), help="The .onnx file."
)
@friendly_errors
def export_onnx_cmd(
    what: str,
    model: str,
    weights: str | None,
    pack_path: str | None,
    allow_download: bool,
    masks: str,
    no_upscale: bool,
    split: bool,
    opset: int,
    out: str,
) -> None:
    """Write an ONNX graph.

    \b
    vprompt export onnx --model sam:vit-base --out sam_decoder.onnx
    vprompt export onnx --what pack --pack flowers.safetensors --out flowers.onnx
    """
    if what == "pack":
        _export_pack(pack_path, out, weights=weights, allow_download=allow_download, opset=opset)
        return
    from vprompt.backbones.registry import load_backbone
    from vprompt.export.sam_onnx import export_sam_decoder

    backbone = load_backbone(model, weights, device="cpu")
    meta = export_sam_decoder(
        backbone,
        out,
        masks="best" if masks == "best" else "all",
        upscale=not no_upscale,
        opset=opset,
        split=split,
    )
    click.echo(jsonio.dumps({"path": out, **meta.props()}))


def _export_pack(
    pack_path: str | None, out: str, *, weights: str | None, allow_download: bool, opset: int
) -> None:
    from vprompt.export.pack_onnx import export_pack_onnx

    if not pack_path:
        raise click.UsageError("--what pack needs --pack PATH")
    summary = export_pack_onnx(
        pack_path, out, weights=weights, allow_download=allow_download, opset=opset
    )
    click.echo(jsonio.dumps(summary))
