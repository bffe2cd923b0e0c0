"""Tracing a PyTorch module to an ONNX model: the one place that calls ``torch.onnx.export``.

Both exports (SAM's decoder, prompt packs) use the TorchScript exporter (``dynamo=False``: it
traces every module vprompt builds, where the dynamo exporter still refuses some), constant
folding, and nn.MultiheadAttention's plain path (its fused inference kernel has no ONNX form).
The model comes back in memory with ``props`` as its ``metadata_props``, for the caller to
check and write.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def trace_to_onnx(
    module: torch.nn.Module,
    inputs: Sequence[torch.Tensor],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None,
    opset: int,
    props: Mapping[str, str],
) -> Any:
    """``module`` traced on ``inputs`` → an ``onnx.ModelProto`` carrying ``props``."""
    import onnx

    from vprompt import __version__

    fastpath = torch.backends.mha.get_fastpath_enabled()
    with tempfile.TemporaryDirectory(prefix="vprompt-onnx-") as tmp:
        raw = Path(tmp) / "graph.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # Tracer warnings name Python values the trace keeps, and the TorchScript exporter
            # announces its deprecation; the callers' parity checks decide what is right.
            warnings.simplefilter("ignore")
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                torch.onnx.export(
                    module,
                    tuple(inputs),
                    str(raw),
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_axes={k: dict(v) for k, v in (dynamic_axes or {}).items()},
                    opset_version=opset,
                    do_constant_folding=True,
                    dynamo=False,
                )
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
        model = onnx.load(str(raw))
    onnx.helper.set_model_props(model, dict(props))
    model.producer_name = "vprompt"
    model.producer_version = __version__
    return model
