"""quantize/files.py's publish function: an ONNX model written through `atomic_output` (temporary file beside
the destination, renamed when the block succeeds) is whole or absent, never half-written."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from quantize.files import atomic_output


def _save(model: onnx.ModelProto, dest: Path) -> None:
    with atomic_output(dest) as tmp:
        onnx.save_model(model, str(tmp))


def test_publishes_the_model(tiny_model, tmp_path):
    model = onnx.load(str(tiny_model))
    dest = tmp_path / "out.onnx"
    _save(model, dest)
    assert onnx.load(str(dest)).graph.name == model.graph.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_failure_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    model = onnx.load(str(tiny_model))

    def broken_save(proto, path, *args, **kwargs):
        Path(path).write_bytes(b"half a model")
        raise ValueError("serializer failed")

    monkeypatch.setattr(onnx, "save_model", broken_save)
    with pytest.raises(ValueError, match="serializer failed"):
        _save(model, tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []


def test_interruption_keeps_the_previous_file(tiny_model, tmp_path, monkeypatch):
    dest = tmp_path / "out.onnx"
    dest.write_bytes(b"previous")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _save(onnx.load(str(tiny_model)), dest)
    assert dest.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]


def test_the_published_file_is_readable_by_others(tiny_model, tmp_path):
    """mkstemp's 0600 must not leak into the published model (others could not read it)."""
    dest = tmp_path / "out.onnx"
    _save(onnx.load(str(tiny_model)), dest)
    assert dest.stat().st_mode & 0o777 == 0o644
