"""Exports of frozen models to other runtimes (ONNX)."""
