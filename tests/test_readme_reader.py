"""The README's Python examples (the calibration reader, the run verb) run as written, on tiny models and images."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from tests.helpers.calib_images import WNIDS, make_class_folders, write_text_as_image
from tests.helpers.sensitive import sensitive_model
from tests.helpers.tiny_models import tiny_cnn

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- calibration-reader-example"


def readme_block(marker: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"```python\n(.*?)```", text[text.index(marker) :], re.S)
    assert match is not None, f"the README's block after {marker} is missing"
    return match.group(1)


def any_size_tiny_cnn(path: Path) -> Path:
    """`tiny_cnn` (convolutions, then global pooling) with free height and width: it takes 224x224 images."""
    model = onnx.load(str(tiny_cnn(path)))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    onnx.save(model, str(path))
    return path


def test_readme_calibration_reader_example_runs(tmp_path, monkeypatch, capsys):
    any_size_tiny_cnn(tmp_path / "model.onnx")
    make_class_folders(tmp_path / "imagenet" / "calib", {WNIDS[0]: 6, WNIDS[1]: 5}, size=(300, 260))
    write_text_as_image(tmp_path / "imagenet" / "calib" / WNIDS[0] / "broken.JPEG")
    monkeypatch.chdir(tmp_path)

    exec(compile(readme_block(MARKER), str(README), "exec"), {"__name__": "readme_example"})

    printed = capsys.readouterr().out
    assert "calibrated on 11 images" in printed and "broken.JPEG" in printed
    int8 = onnx.load(str(tmp_path / "model-int8.onnx"))
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    session = ort.InferenceSession(str(tmp_path / "model-int8.onnx"))
    out = session.run(None, {"input": np.zeros((2, 3, 224, 224), np.float32)})[0]
    assert out.shape[0] == 2 and np.isfinite(out).all()


def test_readme_run_example_runs(tmp_path, monkeypatch, capsys):
    """The README's `quantize.run` example, on a small 1000-class model that takes 224×224 images."""
    sensitive_model(tmp_path / "model.onnx", n_sensitive=0, hw=224)
    make_class_folders(tmp_path / "imagenet" / "calib", {WNIDS[0]: 5, WNIDS[1]: 5}, size=(300, 260))
    make_class_folders(tmp_path / "imagenet" / "val", {WNIDS[0]: 4, WNIDS[1]: 4}, size=(300, 260))
    monkeypatch.chdir(tmp_path)

    exec(compile(readme_block("<!-- run-example"), str(README), "exec"), {"__name__": "readme_example"})

    printed = capsys.readouterr().out
    assert "top-1" in printed and re.search(r"exit code [03]; report: .*report\.html", printed), printed
    assert (tmp_path / "model-int8.onnx").is_file()
    (report,) = (tmp_path / "reports").iterdir()
    assert sorted(p.name for p in report.iterdir()) == ["report.html", "report.json", "report.md"]
