"""``vprompt serve``: the HTTP API and the interactive web page (``docs/serve-api.md``)."""

from __future__ import annotations

import ipaddress

import click

from vprompt.cli.common import device_option, friendly_errors, main, precision_option

MiB = 2**20


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--model",
    default="sam:vit-base",
    show_default=True,
    help="Segmenter as sam:ARCH (see `vprompt models --family sam`).",
)
@click.option(
    "--weights",
    default=None,
    help="Segmenter weights: hub repo id, local folder, or 'none' (random init).",
)
@click.option(
    "--classifier",
    default=None,
    help="CLIP-like model for zero-shot /api/classify, e.g. clip:ViT-B-16 (default: none).",
)
@click.option("--classifier-weights", default=None, help="Weight source of --classifier.")
@click.option(
    "--pack",
    "packs",
    multiple=True,
    metavar="NAME=PATH",
    help="A prompt pack clients may use by NAME (repeatable).",
)
@click.option(
    "--inspect-model",
    default="torchvision:mobilenet_v2",
    show_default=True,
    help="Frozen backbone of the inspect mode (/api/find-similar), loaded on first use.",
)
@click.option("--inspect-weights", default=None, help="Weight source of --inspect-model.")
@click.option(
    "--inspect-size",
    default=None,
    type=click.IntRange(32, 1024),
    help="Frame side inspect embeds images at (default: the backbone's input size).",
)
@click.option(
    "--max-inspect-targets",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Target images one /api/find-similar request may search.",
)
@click.option(
    "--detector",
    default=None,
    help="Open-vocabulary detector for /api/images/{id}/find and the page's find tools "
    "(a registered detector as FAMILY:ARCH or FAMILY; see `vprompt models`). Default: none.",
)
@click.option("--detector-weights", default=None, help="Weight source of --detector.")
@click.option(
    "--detector-masks",
    is_flag=True,
    help="Turn found boxes into masks with the server's segmenter (--model).",
)
@click.option(
    "--max-queries",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Text queries one find request may carry.",
)
@device_option
@precision_option
@click.option(
    "--max-upload-mb",
    default=20.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Largest uploaded image file.",
)
@click.option(
    "--max-pixels",
    default=40_000_000,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest image (width x height), checked before decoding.",
)
@click.option(
    "--cache-mb",
    default=512,
    show_default=True,
    type=click.IntRange(min=1),
    help="Memory for cached image embeddings.",
)
@click.option(
    "--max-images",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="Images kept at once (least recently used dropped first).",
)
@click.option(
    "--image-ttl",
    default=3600.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds an unused image is kept.",
)
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a request may wait for the model before answering 503 busy.",
)
@click.option(
    "--allow-download",
    "allow_download",
    is_flag=True,
    help="Let --pack files download the weights they name when those are not on this "
    "machine (never done otherwise).",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    metavar="NAME",
    help="Another host name clients reach the server by (repeatable; '*' allows any). "
    "Default: the loopback names and --host (for 0.0.0.0, this machine's names).",
)
@click.option(
    "--max-automatic-prompts",
    default=4096,
    show_default=True,
    type=click.IntRange(min=1),
    help="Point prompts one /automatic request may cost (points_per_side² over its crops).",
)
@click.option(
    "--runtime",
    type=click.Choice(["torch", "onnx"]),
    default="torch",
    show_default=True,
    help="What decodes segment prompts: PyTorch, or onnxruntime on CPU (the image encoder "
    "stays in PyTorch).",
)
@click.option(
    "--onnx-decoder",
    type=click.Path(dir_okay=False),
    default=None,
    help="Decoder from `vprompt export onnx` for --runtime onnx (default: exported to "
    "$VPROMPT_CACHE/onnx on first use).",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
)
@friendly_errors
def serve_cmd(
    host: str,
    port: int,
    model: str,
    weights: str | None,
    classifier: str | None,
    classifier_weights: str | None,
    packs: tuple[str, ...],
    inspect_model: str,
    inspect_weights: str | None,
    inspect_size: int | None,
    max_inspect_targets: int,
    detector: str | None,
    detector_weights: str | None,
    detector_masks: bool,
    max_queries: int,
    device: str,
    precision: str,
    max_upload_mb: float,
    max_pixels: int,
    cache_mb: int,
    max_images: int,
    image_ttl: float,
    timeout: float,
    allow_download: bool,
    allowed_hosts: tuple[str, ...],
    max_automatic_prompts: int,
    runtime: str,
    onnx_decoder: str | None,
    log_level: str,
) -> None:
    """Serve the segmentation / classification API and the web page.

    \b
    vprompt serve                                   # http://127.0.0.1:8000/
    vprompt serve --model sam:tiny --weights none   # tiny random model, for trying it out
    vprompt serve --classifier clip:ViT-B-16 --pack flowers=flowers.safetensors
    vprompt serve --detector owlv2 --detector-masks  # find objects from words or examples
    """
    try:
        import uvicorn

        from vprompt.serve import ServeSettings, create_app, parse_pack_specs
        from vprompt.serve.security import default_allowed_hosts
    except ImportError as exc:
        raise click.ClickException(
            f"vprompt serve needs the serve extra ({exc.name} is missing): "
            "pip install 'vprompt[serve]'"
        ) from None

    settings = ServeSettings(
        model=model,
        weights=weights,
        device=device,
        precision=precision,  # type: ignore[arg-type]
        classifier=classifier,
        classifier_weights=classifier_weights,
        packs=parse_pack_specs(packs),
        max_upload_bytes=max(1, int(max_upload_mb * MiB)),
        max_pixels=max_pixels,
        cache_bytes=cache_mb * MiB,
        max_images=max_images,
        image_ttl_s=image_ttl,
        request_timeout_s=timeout,
        allowed_hosts=(*default_allowed_hosts(host), *allowed_hosts),
        max_automatic_prompts=max_automatic_prompts,
        allow_pack_downloads=allow_download,
        inspect_model=inspect_model,
        inspect_weights=inspect_weights,
        inspect_image_size=inspect_size,
        max_inspect_targets=max_inspect_targets,
        runtime="onnx" if runtime == "onnx" else "torch",
        onnx_decoder=onnx_decoder,
        detector=detector,
        detector_weights=detector_weights,
        detector_masks=detector_masks,
        max_queries=max_queries,
    )
    loading = model if detector is None else f"{model} and {detector}"
    click.echo(f"vprompt: loading {loading} …", err=True)
    app = create_app(settings)
    if not _is_loopback(host):
        click.echo(
            f"vprompt: warning: listening on {host}, not loopback; the API has no "
            "authentication, so anyone who can reach this address can use it",
            err=True,
        )
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"vprompt: serving on http://{shown}:{port}/ (API docs at /docs; Ctrl+C stops)")
    uvicorn.run(app, host=host, port=port, log_level=log_level)
