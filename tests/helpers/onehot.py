"""The "one-hot" models: tiny classifiers whose answer is known in advance.

They ignore their input: ``input → ReduceMean → Flatten → Mul 0 → Add <constant row>``, so every image gets
the same logits and the top-1 / top-5 sets are fixed by construction. With images of two classes in wnid
folders, top-1 is exactly the share of images of the predicted class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibration import load_synsets

HW = 32
#: Two classes the CLI tests' validation folders use: K (predicted by the one-hot models) and J.
K, J = 3, 7


def wnid(index: int) -> str:
    """The wnid of canonical class `index` (0 = tench)."""
    return load_synsets()[index].wnid


def onehot_row(classes: int, ranked: list[int], top: float = 50.0) -> np.ndarray:
    """Logits that rank `ranked` first (in that order, well apart) and every other class far below."""
    row = np.zeros(classes, np.float32)
    for i, k in enumerate(ranked):
        row[k] = top - 5.0 * i
    return row


def onehot_model(path: Path | str, row: np.ndarray, *, hw: int = HW) -> Path:
    """``[N,3,hw,hw]`` → the constant logits `row` for every image (shape ``[N, len(row)]``)."""
    classes = len(row)
    inits = [
        numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero"),
        numpy_helper.from_array(np.asarray(row, np.float32).reshape(1, classes), "row"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean"], name="mean", axes=[1, 2, 3], keepdims=1),
        helper.make_node("Flatten", ["mean"], ["flat"], name="flatten", axis=1),
        helper.make_node("Mul", ["flat", "zero"], ["zeroed"], name="times_zero"),
        helper.make_node("Add", ["zeroed", "row"], ["logits"], name="plus_row"),
    ]
    graph = helper.make_graph(
        nodes,
        "onehot",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, hw, hw])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def top1_60_percent(root: Path) -> tuple[Path, Path]:
    """A 1000-class one-hot model that always answers K, and a validation folder of 3 images of K and 2 of
    class 0 under `root`: top-1 is exactly 60 % in any runtime that runs the model correctly."""
    from tests.helpers.calib_images import make_class_folders

    model = onehot_model(root / "k.onnx", onehot_row(1000, [K, 0]))
    val = root / "val"
    make_class_folders(val, {wnid(K): 3, wnid(0): 2}, size=(40, 36))
    return model, val
