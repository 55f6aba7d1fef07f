"""rq: INT8 post-training quantization of ONNX image classifiers, validated and measured.

`quantize/` holds the CLI and every step that changes or measures a model; `calibration/` provides the
images (layouts, labels, preprocessing, batching) and knows nothing of this package.
"""

import os as _os

# ONNX Runtime 1.32's telemetry writes `$TMPDIR/.ses` and a database under ~/.cache/Microsoft as soon as it is
# imported. rq writes nothing outside its work folder and its outputs (quantize/files.py), so it is off unless
# the user sets ORT_DISABLE_TELEMETRY=0 (it must be set before onnxruntime is imported: here, first).
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
