"""Quantization backends: ONNX Runtime static quantization (ort) and Intel Neural Compressor (inc)."""
