"""rq: INT8 post-training quantization of ONNX image classifiers, validated and measured.

`quantize/` holds the CLI and every step that changes or measures a model; `calibration/` provides the
images (layouts, labels, preprocessing, batching) and knows nothing of this package.
"""

__version__ = "0.1.0"
