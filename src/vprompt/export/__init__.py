"""Exports of frozen models to other runtimes (ONNX)."""

from vprompt.export.sam_onnx import SamDecoderMeta, export_sam_decoder

__all__ = ["SamDecoderMeta", "export_sam_decoder"]
