"""Preparation step: BatchNormalizations that no Conv absorbs become exact per-channel affines ORT can quantize.

`quant_pre_process` folds a BatchNormalization into the Conv in front of it. A pre-activation network
(ResNet v2) also has BatchNormalizations that read something else: the graph input, a residual Add, a pooling,
or a Conv whose output has other consumers too. ONNX Runtime has no integer BatchNormalization, so every
such node used to stay FP32, and the block ran DequantizeLinear → Add → BatchNormalization → Relu →
QuantizeLinear in float. Here each one becomes

- folded into the Conv in front of it, when that Conv's output feeds only this BatchNormalization and its
  weights are constants used by nothing else (what `quant_pre_process`'s optimizer does when it runs), or
- a depthwise 1×1 Conv (group = channels) with weight ``scale / sqrt(var + eps)`` and bias
  ``B − mean · scale / sqrt(var + eps)``: the same per-channel affine, which the quantizer handles like any
  Conv (per-channel int8 weights: one value per channel is represented exactly).

A BatchNormalization that reads the graph input (a data normalization, as in the zoo's ResNet v2) is left as
it is: it runs in float before the first quantize node either way, where it is far cheaper than an int8
depthwise conv of the raw image.

The rewritten FP32 graph is run against the original on a seeded random batch before it is used; a mismatch
keeps the original model and says so in the preparation warnings.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper, numpy_helper

if TYPE_CHECKING:
    from quantize.graph.prepare import PreparedModel

#: Largest relative output difference (max |Δ| / max(1, max |original|)) accepted as "unchanged in FP32":
#: reordered float arithmetic differs in the last bits; a wrong rewrite differs by O(1).
TOLERANCE = 1e-4
VERIFY_BATCH = 2
#: A BatchNormalization of the graph input (a data normalization) stays a float BatchNormalization: it runs
#: before the first quantize node either way, and ORT's float kernel on the raw image costs a tenth of an
#: int8 depthwise conv there (which would need its own quantize of the raw image too). Profiled on the
#: ResNet50-v2 topology, batch 1: 0.06 ms as a float BN, 0.7-1.0 ms as QLinearConv (docs/placement.md).
INPUT_REASON = (
    "it normalizes the graph input: stays a float BatchNormalization in front of the first quantize"
)
VERIFY_SEED = 0


@dataclass
class RewriteResult:
    """What :func:`rewrite_batchnorms` changed (the model is modified in place)."""

    depthwise: list[str] = field(default_factory=list)  # BN nodes now a depthwise 1×1 Conv
    folded: list[str] = field(default_factory=list)  # BN nodes folded into the Conv in front of them
    skipped: list[str] = field(default_factory=list)  # "name: why" for BN nodes left as they are

    @property
    def changed(self) -> int:
        return len(self.depthwise) + len(self.folded)


def attribute(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    ranks: dict[str, int] = {}
    graph = model.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            ranks[vi.name] = len(t.shape.dim)
    return ranks


def unique_name(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def rewrite_batchnorms(model: onnx.ModelProto) -> RewriteResult:
    """Fold or rewrite every inference-mode BatchNormalization of `model` (in place); see the module doc."""
    graph = model.graph
    result = RewriteResult()
    if not any(n.op_type == "BatchNormalization" for n in graph.node):
        return result
    if not any(n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx") for n in graph.node):
        return result
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shapes only decide the kernel rank; unknown ranks are skipped below
        inferred = model
    ranks = _ranks(inferred)
    for vi in graph.input:
        ranks.setdefault(vi.name, len(vi.type.tensor_type.shape.dim))
    inits = {i.name: i for i in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    graph_inputs = {i.name for i in graph.input} - set(inits)
    taken = set(inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    taken |= {n.name for n in graph.node}
    uses = Counter(name for n in graph.node for name in n.input)
    producer = {o: n for n in graph.node for o in n.output}

    out_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            out_nodes.append(node)
            continue
        label = node.name or node.output[0]
        reason = _why_not(node, inits, uses, graph_outputs, ranks)
        if reason is None and node.input[0] in graph_inputs:
            reason = INPUT_REASON
        if reason:
            result.skipped.append(f"{label}: {reason}")
            out_nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        rank = ranks[x]
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in node.input[1:5])
        eps = float(attribute(node, "epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        shift = beta - mean * scale
        channels = scale.shape[0]

        conv = producer.get(x)
        if _foldable(conv, x, channels, inits, uses, graph_outputs):
            w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
            has_bias = len(conv.input) >= 3 and bool(conv.input[2])
            b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if has_bias else 0.0
            w_name = unique_name(f"{conv.input[1]}_bnfold", taken)
            b_name = unique_name(f"{label}_bnfold_bias", taken)
            folded_w = w * scale.reshape(-1, *[1] * (w.ndim - 1))
            graph.initializer.append(numpy_helper.from_array(folded_w.astype(np.float32), w_name))
            graph.initializer.append(numpy_helper.from_array((b * scale + shift).astype(np.float32), b_name))
            inputs = [conv.input[0], w_name, b_name]
            del conv.input[:]
            conv.input.extend(inputs)
            conv.output[0] = y  # the BN disappears; its consumers now read the Conv
            result.folded.append(label)
            continue

        w_name = unique_name(f"{label}_affine_W", taken)
        b_name = unique_name(f"{label}_affine_B", taken)
        weight = scale.astype(np.float32).reshape(channels, 1, *[1] * (rank - 2))
        graph.initializer.append(numpy_helper.from_array(weight, w_name))
        graph.initializer.append(numpy_helper.from_array(shift.astype(np.float32), b_name))
        out_nodes.append(
            helper.make_node(
                "Conv",
                [x, w_name, b_name],
                [y],
                name=node.name or unique_name(f"{y}_affine", taken),
                group=channels,
                kernel_shape=[1] * (rank - 2),
            )
        )
        result.depthwise.append(label)
    if result.changed:
        del graph.node[:]
        graph.node.extend(out_nodes)
        drop_unused_initializers(model)
    return result


def _why_not(node, inits, uses, graph_outputs, ranks) -> str | None:
    """Why this BatchNormalization cannot become an affine (None: it can)."""
    if attribute(node, "training_mode", 0):
        return "training_mode=1"
    if len(node.input) < 5 or any(name not in inits for name in node.input[1:5]):
        return "its parameters are not constant initializers"
    if any(o and (uses[o] or o in graph_outputs) for o in node.output[1:]):
        return "its running statistics are used"
    rank = ranks.get(node.input[0])
    if rank is None or rank < 3:
        return f"input rank {rank if rank is not None else 'unknown'} (needs [N, C, spatial…])"
    if numpy_helper.to_array(inits[node.input[1]]).ndim != 1:
        return "its scale is not one value per channel"
    return None


def _foldable(conv, x, channels, inits, uses, graph_outputs) -> bool:
    """A Conv whose output only this BN reads, with constant weights (and bias) used by nothing else."""
    if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
        return False
    if uses[x] != 1 or x in graph_outputs or len(conv.input) < 2:
        return False
    weight = conv.input[1]
    if weight not in inits or uses[weight] != 1 or inits[weight].dims[0] != channels:
        return False
    if len(conv.input) >= 3 and conv.input[2]:
        return conv.input[2] in inits and uses[conv.input[2]] == 1
    return True


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers nothing reads any more (the replaced BN parameters), and their graph inputs."""
    used = {name for n in model.graph.node for name in n.input} | {o.name for o in model.graph.output}
    dropped = {i.name for i in model.graph.initializer if i.name not in used}
    if not dropped:
        return
    keep = [i for i in model.graph.initializer if i.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    inputs = [i for i in model.graph.input if i.name not in dropped]
    del model.graph.input[:]
    model.graph.input.extend(inputs)


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


@dataclass
class Subsampled:
    """What :func:`rewrite_strided_pointwise` changed (the model is modified in place)."""

    convs: list[str] = field(default_factory=list)  # strided 1×1 Convs now stride 1 on a subsampled tensor
    lowered: list[str] = field(default_factory=list)  # nodes that now compute only the pixels read
    slices: int = 0  # Slice nodes added where the subsampling could not move further up

    def describe(self) -> str:
        text = f"{len(self.convs)} strided 1×1 Conv(s) → stride 1 on a subsampled tensor"
        if self.lowered:
            text += f" ({len(self.lowered)} node(s) before them now compute only the pixels read"
            text += f", {self.slices} Slice(s))" if self.slices else ")"
        elif self.slices:
            text += f" ({self.slices} Slice(s))"
        return text


#: Elementwise on one activation: f(x)[::s] = f(x[::s]), so the subsampling moves up through them.
_PIXELWISE_UNARY = (
    "Relu",
    "Clip",
    "LeakyRelu",
    "Sigmoid",
    "HardSigmoid",
    "Tanh",
    "Identity",
    "BatchNormalization",
)
#: Elementwise on several tensors of the output's shape (per-channel constants broadcast).
_PIXELWISE_NARY = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum")


def rewrite_strided_pointwise(model: onnx.ModelProto) -> Subsampled:
    """Strided 1×1 Convs that are the only readers of their input: compute that input at the lower resolution.

    A 1×1 Conv with stride s and no padding reads one pixel in s per axis. When every reader of a tensor is
    such a Conv (with the same stride), nothing else needs the other pixels, so the subsampling moves up the
    graph: through pixel-wise nodes (Relu, Add, BatchNormalization, ...) into the Conv that makes the tensor,
    which then runs with stride s (a stride-1 Conv with "same" padding, sampled every s-th pixel, is that Conv
    with stride s). Where it cannot move further (a graph input, a tensor with other readers, another kind of
    node), a Slice keeps every s-th pixel. The strided 1×1 Convs then run with stride 1. Exact; checked on the
    FP32 graph by the caller.

    ResNet-50 v1's three down-sampling blocks: the last 3×3 and 1×1 convolutions of the block before, and its
    residual Add, now compute a quarter of the pixels (docs/placement.md). For OpenVINO this also decides
    whether those convolutions run in int8 at all: its strides optimization moves such a stride up onto the
    tensor in front of the convolution, which in a Q/DQ graph lands between the quantize and the dequantize and
    leaves the convolution in f32. For ONNX Runtime it is less work. A strided 1×1 Conv whose input has other
    readers (ResNet v2's projection shortcut) is left as it is: both runtimes run it in int8.
    """
    result = Subsampled()
    graph = model.graph
    if _default_opset(model) < 10:  # Slice takes `steps` from opset 10
        return result
    weights = {i.name: i for i in graph.initializer}
    taken = set(weights) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    taken |= {n.name for n in graph.node}
    graph_outputs = {o.name for o in graph.output}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # without shapes nothing moves through an n-ary node; Slices still work
        inferred = model
    shapes = {
        vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    }
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    producer = {o: n for n in graph.node for o in n.output}
    new_slices: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (Slice, node it must come before)

    def only_reader(name: str, node: onnx.NodeProto) -> bool:
        return name not in graph_outputs and all(r is node for r in readers.get(name, []))

    def slice_of(name: str, strides: tuple[int, ...], before: onnx.NodeProto) -> str:
        base = unique_name(f"{name}_subsample{'x'.join(map(str, strides))}", taken)
        params = {
            "starts": [0] * len(strides),
            "ends": [np.iinfo(np.int64).max] * len(strides),
            "axes": list(range(2, 2 + len(strides))),
            "steps": list(strides),
        }
        names = []
        for what, values in params.items():
            init = unique_name(f"{base}_{what}", taken)
            graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), init))
            names.append(init)
        new_slices.append((helper.make_node("Slice", [name, *names], [base], name=base), before))
        result.slices += 1
        return base

    def lower(name: str, strides: tuple[int, ...], reader: onnx.NodeProto, *, sole: bool = False) -> str:
        """A tensor holding `name`[..., ::s, ::s] for `reader`: its producer lowered when nothing else reads
        `name` (`sole`: the caller knows), else a Slice."""
        node = producer.get(name)
        if node is not None and (sole or only_reader(name, reader)) and node.domain in ("", "ai.onnx"):
            if node.op_type == "Conv" and _same_padded_stride_1(node, weights):
                source = node.input[0]
                if _pointwise(node, weights) and source not in weights and only_reader(source, node):
                    node.input[0] = lower(source, strides, node)  # a 1×1 Conv is pixel-wise: move further up
                else:
                    _set_strides(node, strides)
                result.lowered.append(node.name or name)
                return name
            if node.op_type in _PIXELWISE_UNARY and node.input:
                node.input[0] = lower(node.input[0], strides, node)
                result.lowered.append(node.name or name)
                return name
            operands = [i for i in node.input if i]
            if (
                node.op_type in _PIXELWISE_NARY
                and len(set(operands)) == len(operands)  # Add(x, x) would lower x twice
                and _same_shape_operands(node, shapes, weights)
            ):
                for i, operand in enumerate(node.input):
                    if operand and operand not in weights:
                        node.input[i] = lower(operand, strides, node)
                result.lowered.append(node.name or name)
                return name
        return slice_of(name, strides, reader)

    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if _strided_pointwise(node, weights) is not None and node.input[0] not in weights:
            groups.setdefault(node.input[0], []).append(node)
    for tensor, convs in groups.items():
        strides = {_strided_pointwise(c, weights) for c in convs}
        every_reader = {id(r) for r in readers.get(tensor, [])} == {id(c) for c in convs}
        if len(strides) != 1 or not every_reader or tensor in graph_outputs:
            continue
        (stride,) = strides
        # The Convs are the tensor's only readers: lower its producer for all of them at once.
        lowered = lower(tensor, stride, convs[0], sole=True)
        for conv in convs:
            conv.input[0] = lowered
            _set_strides(conv, (1,) * len(stride))
            result.convs.append(conv.name or conv.output[0])
    if new_slices:
        nodes = list(graph.node)
        for slice_node, before in new_slices:
            nodes.insert(nodes.index(before), slice_node)
        del graph.node[:]
        graph.node.extend(nodes)
    if result.convs:
        del graph.value_info[:]  # shapes below the lowered nodes changed; ORT infers them again
    return result


def _set_strides(node: onnx.NodeProto, strides: tuple[int, ...]) -> None:
    for a in node.attribute:
        if a.name == "strides":
            del a.ints[:]
            a.ints.extend(strides)
            return
    node.attribute.append(helper.make_attribute("strides", list(strides)))


def _same_padded_stride_1(node: onnx.NodeProto, weights: dict) -> bool:
    """A stride-1, undilated Conv with odd kernels and "same" padding ((k − 1) / 2 each side) or none for 1×1:
    sampled every s-th pixel, it is the same Conv with stride s (same begin padding, same output size)."""
    weight = weights.get(node.input[1]) if len(node.input) > 1 else None
    if weight is None or len(weight.dims) < 3:
        return False
    kernel = list(weight.dims[2:])
    spatial = len(kernel)
    if any(s != 1 for s in attribute(node, "strides", [1] * spatial)):
        return False
    if any(d != 1 for d in attribute(node, "dilations", [1] * spatial)):
        return False
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
        return False
    pads = list(attribute(node, "pads", [0] * 2 * spatial))
    return all(k % 2 == 1 for k in kernel) and pads == [(k - 1) // 2 for k in kernel] * 2


def _pointwise(node: onnx.NodeProto, weights: dict) -> bool:
    return all(d == 1 for d in weights[node.input[1]].dims[2:])


def _same_shape_operands(node: onnx.NodeProto, shapes: dict, weights: dict) -> bool:
    """Every non-constant operand has the output's (known) shape; constants only broadcast per channel."""
    out = shapes.get(node.output[0])
    if not out or any(d is None for d in out[2:]):
        return False
    for operand in node.input:
        if not operand:
            continue
        if operand in weights:
            dims = list(weights[operand].dims)
            if len(dims) >= len(out) - 1 and any(d != 1 for d in dims[-(len(out) - 2) :]):
                return False  # a constant that varies over the pixels
            continue
        if shapes.get(operand) != out:
            return False
    return True


def _strided_pointwise(node: onnx.NodeProto, weights: dict) -> tuple[int, ...] | None:
    """The strides of a 1×1, unpadded, strided Conv with a constant weight; None for any other node."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    weight = weights.get(node.input[1])
    if weight is None or len(weight.dims) < 3 or any(d != 1 for d in weight.dims[2:]):
        return None
    spatial = len(weight.dims) - 2
    strides = tuple(attribute(node, "strides", [1] * spatial))
    if len(strides) != spatial or all(s == 1 for s in strides) or any(s < 1 for s in strides):
        return None
    if any(attribute(node, "pads", [0] * 2 * spatial)):
        return None
    auto_pad = attribute(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return None
    return strides


def max_output_difference(
    original: onnx.ModelProto, rewritten: onnx.ModelProto, batch: np.ndarray
) -> tuple[float, float]:
    """(max |Δ| over all outputs, max |original output|) of two FP32 models run by ORT on the same batch."""
    from quantize.measure.runtimes import ort_session

    # Compare the graphs as written, not what ORT's optimizer makes of them.
    sessions = [
        ort_session(m.SerializeToString(), graph_optimization="off", log_severity=3)
        for m in (original, rewritten)
    ]
    name = sessions[0].get_inputs()[0].name
    a, b = (s.run(None, {name: batch}) for s in sessions)
    diff = max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b, strict=True))
    peak = max(float(np.max(np.abs(x))) for x in a)
    return diff, peak


def verification_batch(shape: list[int | str]) -> np.ndarray | None:
    """A seeded N(0,1) batch for a [N, C, H, W…] input; None when a non-batch dimension is not fixed."""
    dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
    if any(d is None for d in dims[1:]):
        return None
    batch = dims[0] or VERIFY_BATCH
    return np.random.default_rng(VERIFY_SEED).standard_normal((batch, *dims[1:])).astype(np.float32)


def rewrite_standalone_batchnorms(prepared: PreparedModel) -> None:
    """The preparation hook: rewrite `prepared.path` in place (unfoldable BatchNormalizations → exact affines,
    strided 1×1 Convs → Slice + stride 1), verified against the original FP32 graph.

    Appends what was done to `prepared.steps` (or why nothing was done to `prepared.warnings`).
    """
    from quantize.graph.prepare import _save, load_model

    path = Path(prepared.path)
    model = load_model(path)
    weights = {i.name: i for i in model.graph.initializer}
    has_bn = any(n.op_type == "BatchNormalization" for n in model.graph.node)
    if not has_bn and not any(_strided_pointwise(n, weights) for n in model.graph.node):
        return
    original = onnx.ModelProto()
    original.CopyFrom(model)
    result = rewrite_batchnorms(model)
    subsampled = rewrite_strided_pointwise(model)
    left = f"; {len(result.skipped)} left as they are ({'; '.join(result.skipped)})" if result.skipped else ""
    if not result.changed and not subsampled.convs:
        prepared.warnings.append(f"{len(result.skipped)} BatchNormalization node(s) stay FP32{left}")
        return
    what = []
    if result.changed:
        bn = (
            f"{len(result.depthwise)} BatchNormalization node(s) without a Conv to fold into → depthwise 1×1 "
            "Conv"
        )
        if result.folded:
            bn += f", {len(result.folded)} folded into their Conv"
        what.append(bn + " (exact per-channel affines ONNX Runtime can run in INT8)")
    if subsampled.convs:
        what.append(subsampled.describe())
    what = "; ".join(what)
    batch = verification_batch(prepared.signature.input_shape)
    if batch is None:
        prepared.warnings.append(
            f"graph rewrite ({what}) not applied: cannot verify it (input shape "
            f"{prepared.signature.input_shape} is not fixed){left}"
        )
        return
    if original.ByteSize() > 1_800_000_000:
        prepared.warnings.append(
            f"graph rewrite ({what}) not applied: the model is too large to verify in memory{left}"
        )
        return
    try:
        diff, peak = max_output_difference(original, model, batch)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        prepared.warnings.append(f"graph rewrite ({what}) not applied: verification failed to run ({reason})")
        return
    limit = TOLERANCE * max(1.0, peak)
    if not diff <= limit:
        prepared.warnings.append(
            f"graph rewrite ({what}) not applied: FP32 outputs changed by max |Δ| {diff:.3g} "
            f"(limit {limit:.3g}); the original graph is kept{left}"
        )
        return
    _save(model, path)
    prepared.steps.append(
        f"{what}; FP32 outputs checked on a random batch: max |Δ| {diff:.2g} on outputs up to {peak:.3g}{left}"
    )
