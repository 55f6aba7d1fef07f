"""Per-node quantization error: weight and activation SQNR / cosine of an INT8 (QDQ) model against its FP32 source.

Weights are matched with ONNX Runtime's `qdq_loss_debug.create_weight_matching` (the library already knows how
to dequantize per-channel weights). Activations are compared by running both models on the same images with
the output of every quantized node exposed; the error statistics are accumulated batch by batch (sums of
squares and dot products), so inspecting on many images costs no more memory than one batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from calibration.errors import RqInputError
from calibration.loader import pad_batch
from quantize.exits import ort_reason
from quantize.graph.prepare import load_model
from quantize.measure.runtimes import muted, ort_session, quiet

DEQUANT_SUFFIX = "_DequantizeLinear_Output"


@dataclass
class NodeError:
    node: str
    op_type: str
    tensor: str
    weight_sqnr_db: float | None
    activation_sqnr_db: float | None
    activation_cosine: float | None

    def to_dict(self) -> dict:
        def r(x):
            return None if x is None else round(x, 4)

        return {
            "node": self.node,
            "op_type": self.op_type,
            "tensor": self.tensor,
            "weight_sqnr_db": r(self.weight_sqnr_db),
            "activation_sqnr_db": r(self.activation_sqnr_db),
            "activation_cosine": r(self.activation_cosine),
        }


class _Accumulator:
    """Streaming SQNR and cosine between a reference tensor and its approximation."""

    def __init__(self) -> None:
        self.ref2 = self.err2 = self.dot = self.approx2 = 0.0

    def add(self, ref: np.ndarray, approx: np.ndarray) -> None:
        ref = ref.astype(np.float64, copy=False).ravel()
        approx = approx.astype(np.float64, copy=False).ravel()
        self.ref2 += float(ref @ ref)
        diff = ref - approx
        self.err2 += float(diff @ diff)
        self.dot += float(ref @ approx)
        self.approx2 += float(approx @ approx)

    @property
    def sqnr_db(self) -> float:
        eps = np.finfo(np.float64).tiny
        # A difference of logs, not the log of a ratio: identical tensors (err2 = 0) give a large finite
        # value (about 3000 dB) instead of overflowing to inf, which JSON cannot hold.
        return 10 * (math.log10(max(self.ref2, eps)) - math.log10(max(self.err2, eps)))

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.ref2 * self.approx2)
        return self.dot / denom if denom > 0 else 1.0


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    acc = _Accumulator()
    acc.add(reference, approximation)
    return acc.sqnr_db


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return model.SerializeToString()


def _session(model_bytes: bytes) -> ort.InferenceSession:
    try:
        return ort_session(model_bytes)
    except Exception as exc:
        raise RqInputError(f"onnxruntime cannot load the model: {ort_reason(exc)}") from None


def _run_all(session: ort.InferenceSession, input_name: str, images: np.ndarray) -> list[np.ndarray]:
    """Every output; a model with a fixed batch dimension gets one image (repeated) per run, padding dropped."""
    first = session.get_inputs()[0].shape[0]
    if not isinstance(first, int) or first < 1 or first == len(images):
        return session.run(None, {input_name: images})
    per_image = [
        session.run(None, {input_name: pad_batch(images[i : i + 1], first)}) for i in range(len(images))
    ]
    return [np.concatenate([outs[k][:1] for outs in per_image]) for k in range(len(per_image[0]))]


def weight_errors(fp32_path: Path, int8_path: Path) -> dict[str, float]:
    """SQNR (dB) of every quantized weight, keyed by the FP32 initializer name."""
    from onnxruntime.quantization.qdq_loss_debug import (
        compute_signal_to_quantization_noice_ratio,
        compute_weight_error,
        create_weight_matching,
    )

    # It logs an ERROR per weight it does not pair through the root logger (no logger of its own), so the root
    # is muted for this call only: nothing of rq's logs while it runs.
    with quiet(), muted(""):
        matched = create_weight_matching(str(fp32_path), str(int8_path))
    for pair in matched.values():
        # A weight whose input channels rq padded with zeros for ONNX Runtime (graph/channel_pad.py): the
        # model's own channels are the first ones.
        fp32, int8 = pair.get("float"), pair.get("dequantized")
        if fp32 is not None and int8 is not None and fp32.ndim >= 2 and int8.shape != fp32.shape:
            pair["dequantized"] = int8[:, : fp32.shape[1]]
    return compute_weight_error(matched, compute_signal_to_quantization_noice_ratio)


def _io_shapes(model: onnx.ModelProto) -> tuple[list, list]:
    weights = {x.name for x in model.graph.initializer}

    def dims(value) -> list:
        return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]

    inputs = [dims(i) for i in model.graph.input if i.name not in weights]
    return inputs, [dims(o) for o in model.graph.output]


def _check_same_signature(
    fp32: onnx.ModelProto, int8: onnx.ModelProto, fp32_name: str, int8_name: str
) -> None:
    """One line when the two files cannot be the same network: other input or output shapes."""
    (fp32_in, fp32_out), (int8_in, int8_out) = _io_shapes(fp32), _io_shapes(int8)

    def differ(a: list, b: list) -> bool:
        return len(a) != len(b) or any(
            len(x) != len(y)
            or any(p is not None and q is not None and p != q for p, q in zip(x, y, strict=True))
            for x, y in zip(a, b, strict=True)
        )

    if differ(fp32_in, int8_in) or differ(fp32_out, int8_out):
        raise RqInputError(
            f"{int8_name} and {fp32_name} are not the same network: inputs {int8_in} vs {fp32_in}, outputs "
            f"{int8_out} vs {fp32_out} (pass the FP32 model the INT8 one was made from)"
        )


def check_pair(fp32_path: Path, int8_path: Path) -> None:
    """One line, before any work, when the two files cannot be an FP32 model and its INT8 version: the first is
    already quantized, or their inputs/outputs differ."""
    fp32, int8 = (
        load_model(Path(fp32_path), load_weights=False),
        load_model(Path(int8_path), load_weights=False),
    )
    quantized = sorted(
        {n.op_type for n in fp32.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    )
    if quantized:
        raise RqInputError(
            f"{Path(fp32_path).name} is already quantized ({', '.join(quantized)} nodes): pass the FP32 model first, "
            "then its INT8 version"
        )
    _check_same_signature(fp32, int8, Path(fp32_path).name, Path(int8_path).name)


def inspect_models(
    fp32_path: Path,
    int8_path: Path,
    batches: Iterable[np.ndarray],
    *,
    op_types: tuple[str, ...] = ("Conv", "Gemm", "MatMul"),
) -> list[NodeError]:
    """Per-node errors, most damaged first. `fp32_path` must be the prepared graph the INT8 model came from."""
    fp32 = load_model(fp32_path)
    int8 = load_model(int8_path)
    from quantize.backends.ort import QOPERATOR_FORMS

    qoperator_ops = {op for forms in QOPERATOR_FORMS.values() for op in forms}
    found = sorted({n.op_type for n in int8.graph.node if n.op_type in qoperator_ops})
    if found:
        raise RqInputError(
            f"{Path(int8_path).name} is in QOperator format ({', '.join(found)}): "
            "rq inspect needs a QDQ-format model (quantize with --format qdq)"
        )
    if not any(n.op_type == "DequantizeLinear" for n in int8.graph.node):
        raise RqInputError(
            f"{Path(int8_path).name} has no DequantizeLinear nodes: rq inspect needs a QDQ-format model"
        )
    _check_same_signature(fp32, int8, Path(fp32_path).name, Path(int8_path).name)
    int8_tensors = {t for n in int8.graph.node for t in n.output}
    nodes = [n for n in fp32.graph.node if n.op_type in op_types and n.output]
    if not nodes:
        raise RqInputError(f"{Path(fp32_path).name} has no {'/'.join(op_types)} nodes to inspect")
    pairs = []  # (node, fp32 tensor, int8 tensor)
    int8_outputs = {n.name: n.output[0] for n in int8.graph.node if n.output}
    # FP32 tensors written by a Relu/Clip straight after a node: where ORT folds that activation into the
    # node's quantize range and gives the node the activation's output name.
    folded = {
        n.output[0]: n.input[0]
        for n in fp32.graph.node
        if n.op_type in ("Relu", "Clip") and n.input and n.output
    }
    for node in nodes:
        out = node.output[0]
        renamed = int8_outputs.get(node.name, out)
        if out not in int8_tensors and folded.get(renamed) == out:
            # Compare after the activation, in both models (any other tensor of that name, a softmax after the
            # head for instance, is another quantity: that node stays unpaired).
            out = renamed
        candidate = out + DEQUANT_SUFFIX if out + DEQUANT_SUFFIX in int8_tensors else out
        if candidate in int8_tensors:
            pairs.append((node, out, candidate))
    # The INT8 file keeps each weight under its FP32 name (quantized: "<name>_quantized"); another network's
    # file has few of them, even when a few tensor names (the logits) coincide.
    int8_weights = {x.name for x in int8.graph.initializer}
    fp32_weights = {x.name for x in fp32.graph.initializer}
    weighted = [n for n in nodes if len(n.input) > 1 and n.input[1] in fp32_weights]  # not activation MatMuls
    shared = [n for n in weighted if {n.input[1], n.input[1] + "_quantized"} & int8_weights]
    if not pairs or 2 * len(pairs) < len(nodes) or 2 * len(shared) < len(weighted):
        # A per-node table of unrelated nodes would be noise presented as findings.
        raise RqInputError(
            f"{Path(int8_path).name} does not look made from this FP32 model: {len(pairs)} of its {len(nodes)} "
            f"{'/'.join(op_types)} outputs and {len(shared)} of their {len(weighted)} weights are in it "
            "(pass the FP32 model rq quantized)"
        )
    input_name = next(
        i.name for i in fp32.graph.input if i.name not in {x.name for x in fp32.graph.initializer}
    )
    fp32_session = _session(_with_outputs(fp32, [p[1] for p in pairs]))
    int8_session = _session(_with_outputs(int8, [p[2] for p in pairs]))
    del fp32, int8
    fp32_names = [o.name for o in fp32_session.get_outputs()]
    int8_names = [o.name for o in int8_session.get_outputs()]
    accumulators = {node.name: _Accumulator() for node, _, _ in pairs}
    seen = 0
    for images in batches:
        ref = dict(zip(fp32_names, _run_all(fp32_session, input_name, images), strict=True))
        approx = dict(zip(int8_names, _run_all(int8_session, input_name, images), strict=True))
        for node, a, b in pairs:
            accumulators[node.name].add(ref[a], approx[b])
        seen += 1
    if not seen:
        raise RqInputError("rq inspect received no images")
    weights = weight_errors(fp32_path, int8_path)
    results = []
    paired = {node.name for node, _, _ in pairs}
    for node in nodes:
        weight = next((weights[w] for w in node.input[1:2] if w in weights), None)
        acc = accumulators.get(node.name)
        results.append(
            NodeError(
                node=node.name,
                op_type=node.op_type,
                tensor=node.output[0],
                weight_sqnr_db=weight,
                activation_sqnr_db=acc.sqnr_db if node.name in paired else None,
                activation_cosine=acc.cosine if node.name in paired else None,
            )
        )
    results.sort(key=lambda r: (r.activation_sqnr_db is None, r.activation_sqnr_db or 0.0))
    return results
