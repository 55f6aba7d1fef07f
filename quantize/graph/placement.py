"""Where the quantize/dequantize pairs go, decided from the graph (the default since recipe version 2).

Quantizing only Conv/Gemm/MatMul makes ONNX Runtime's QDQ quantizer put each quantize node on a convolution's
*pre-activation* output: every uint8 range then stretches over values that the following Relu/Clip throws
away (on EfficientNet-Lite1 that alone cost 2.5 points of top-1). The placement here walks the graph in
topological order and quantizes a node when ORT can run it with integer kernels and its inputs come from
quantized nodes:

- anchors: Conv, Gemm, MatMul (the compute);
- Relu/Clip right after a quantized node: ORT folds them into the quantize range (asymmetric activations),
  so the range is the activation's output range, not the pre-activation one;
- LeakyRelu/Sigmoid after a quantized node (QLinearLeakyRelu/QLinearSigmoid);
- Add of two activations (residual connections; QLinearAdd) when at least one comes from a quantized node;
- pooling (GlobalAveragePool, AveragePool, MaxPool) and Concat fed by quantized nodes;
- data movement (Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Slice) fed by quantized nodes and consumed by one,
  which ORT runs on uint8 directly.

The classifier head (a Gemm/MatMul that writes the graph output) stays FP32 when anything else is quantized:
the logits are what top-1 and agreement read, and the head costs well under 1% of a CNN's compute. With
``recipe.placement_runtime == "openvino"`` it is quantized too (OpenVINO's f32 FullyConnected is slow).

Everything else (HardSigmoid, Mul, Softmax, BatchNormalization left unfolded, shape sub-graphs) stays FP32,
and so does a carry-through node whose output no quantized node reads, so no Q/DQ pair is left dangling in
front of a float op that gains nothing from it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto

from calibration.errors import RqInputError
from quantize.recipe import QuantRecipe

ANCHORS = ("Conv", "Gemm", "MatMul")
FOLDED_ACTIVATIONS = ("Relu", "Clip")  # removed by ORT's QDQ quantizer, their range kept in the Q node
INTEGER_ACTIVATIONS = ("LeakyRelu", "Sigmoid")
POOLING = ("GlobalAveragePool", "AveragePool", "MaxPool")
CARRY_THROUGH = ("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice")
# Nodes worth quantizing only when a quantized node reads their output (else: a Q/DQ pair for nothing, e.g. a
# QLinearSigmoid feeding the float Mul of a swish).
PRUNABLE = CARRY_THROUGH + INTEGER_ACTIVATIONS
HEAD_REASON = "classifier head, kept FP32 (it writes the logits)"
PLACEMENT_OP_TYPES = (
    ANCHORS + FOLDED_ACTIVATIONS + INTEGER_ACTIVATIONS + ("Add", "Concat") + POOLING + CARRY_THROUGH
)


def calibration_op_types(recipe: QuantRecipe) -> tuple[str, ...]:
    """Op types whose tensors calibration must cover: every type placement may choose, or the override."""
    return PLACEMENT_OP_TYPES if recipe.op_types is None else tuple(recipe.op_types)


class NothingToQuantize(RqInputError):
    """The recipe (or the placement) leaves no node to quantize: exit code 3, never a silent FP32 copy."""

    exit_code = 3


@dataclass
class Placement:
    """The nodes to quantize and why the others of a quantizable type were left in FP32."""

    nodes: list[str]  # node names, graph order
    op_types: tuple[str, ...]  # their op types (what ORT's op_types_to_quantize gets)
    from_graph: bool  # True: decided here; False: the recipe's op_types override
    fp32: dict[str, str] = field(default_factory=dict)  # node name -> reason it stays FP32

    def node_set(self) -> set[str]:
        return set(self.nodes)


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of tensors known to be float32 (graph inputs, value_info, outputs, float initializers)."""
    floats: set[str] = set()
    infos = list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output)
    if not model.graph.value_info:
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            infos += list(inferred.graph.value_info)
        except Exception:  # shape inference is best effort; unknown types count as not float
            pass
    for info in infos:
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            floats.add(info.name)
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            floats.add(init.name)
    return floats


# What may stand between the classifier's last Gemm/MatMul and the graph output: reshapes, a softmax, and the
# Slice/Concat of a model that adds or drops a background class; arithmetic only with constants or the head's
# own tensors (the background column's offset).
HEAD_TAIL = (
    "Softmax",
    "LogSoftmax",
    "Flatten",
    "Reshape",
    "Squeeze",
    "Unsqueeze",
    "Identity",
    "Cast",
    "Slice",
    "Concat",
)
HEAD_TAIL_ARITHMETIC = ("Add", "Sub", "Mul", "Div")


def _writes_output(
    node: onnx.NodeProto, consumers: dict, graph_outputs: set[str], constants: set[str]
) -> bool:
    """Whether `node`'s output reaches a graph output through a classifier head's tail only (HEAD_TAIL…)."""
    reached = set(node.output)
    frontier = list(node.output)
    while frontier:
        tensor = frontier.pop()
        if tensor in graph_outputs:
            return True
        for reader in consumers.get(tensor, []):
            others = [i for i in reader.input if i and i != tensor]
            tail = reader.op_type in HEAD_TAIL or (
                reader.op_type in HEAD_TAIL_ARITHMETIC and all(i in constants or i in reached for i in others)
            )
            if not tail:
                continue
            for out in reader.output:
                if out and out not in reached:
                    reached.add(out)
                    frontier.append(out)
    return False


def place(model: onnx.ModelProto, recipe: QuantRecipe) -> Placement:
    """The nodes of `model` (a prepared FP32 graph) that `recipe` quantizes."""
    excluded = set(recipe.exclude_nodes)
    if recipe.op_types is not None:
        nodes = [n.name for n in model.graph.node if n.op_type in recipe.op_types and n.name not in excluded]
        fp32 = {n.name: "excluded by the user" for n in model.graph.node if n.name in excluded}
        return Placement(nodes=nodes, op_types=tuple(recipe.op_types), from_graph=False, fp32=fp32)

    initializers = {init.name for init in model.graph.initializer}
    constants = initializers | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    floats = _float_tensors(model)
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            if name:
                consumers[name].append(node)

    quantized: list[onnx.NodeProto] = []
    chosen: set[str] = set()
    quantized_tensors: set[str] = set()  # float outputs of quantized nodes
    fp32: dict[str, str] = {}

    def activations(node: onnx.NodeProto) -> list[str]:
        return [name for name in node.input if name and name not in constants]

    for node in model.graph.node:
        if node.op_type not in PLACEMENT_OP_TYPES:
            continue
        if node.name in excluded:
            fp32[node.name] = "excluded by the user"
            continue
        data = node.input[0] if node.input else ""
        fed = data in quantized_tensors
        if node.op_type in ANCHORS:
            ok = bool(data) and data not in constants
            reason = "its input is not a float activation"
        elif node.op_type in FOLDED_ACTIVATIONS + INTEGER_ACTIVATIONS + POOLING + CARRY_THROUGH:
            ok, reason = fed, "its input comes from a node left in FP32"
        elif node.op_type == "Add":
            inputs = activations(node)
            ok = (
                len(inputs) == 2
                and all(i in floats for i in inputs)
                and any(i in quantized_tensors for i in inputs)
            )
            reason = "not a residual Add of two quantized activations"
        else:  # Concat
            inputs = activations(node)
            ok = (
                len(inputs) == len(node.input)
                and all(i in floats for i in inputs)
                and any(i in quantized_tensors for i in inputs)
            )
            reason = "its inputs are not float activations from quantized nodes"
        if not ok:
            fp32[node.name] = reason
            continue
        quantized.append(node)
        chosen.add(node.name)
        quantized_tensors.update(o for o in node.output if o)

    # A carry-through node or LeakyRelu/Sigmoid that no quantized node reads only adds a Q/DQ pair: drop it
    # (backwards, so a chain such as Transpose -> Reshape feeding FP32 goes as a whole).
    graph_outputs = {o.name for o in model.graph.output}
    for node in reversed(quantized):
        if node.op_type not in PRUNABLE:
            continue
        readers = [c for o in node.output for c in consumers.get(o, [])]
        if any(o in graph_outputs for o in node.output) or not any(c.name in chosen for c in readers):
            chosen.discard(node.name)
            fp32[node.name] = "its output feeds only FP32 nodes"
    # The classifier head (a Gemm/MatMul writing a graph output: the logits) stays FP32 while other compute is
    # quantized: the logits are what top-1 and agreement read, and the head is well under 1% of a CNN's work.
    heads = [
        n
        for n in quantized
        if n.op_type in ("Gemm", "MatMul") and _writes_output(n, consumers, graph_outputs, constants)
    ]
    others = [n for n in quantized if n.op_type in ANCHORS and n not in heads]
    # For OpenVINO the head is quantized like NNCF's: its f32 FullyConnected cost 2-3 % of ResNet-50's INT8
    # time there, and rq's OpenVINO agreement had the margin (docs/placement.md).
    if heads and others and recipe.placement_runtime != "openvino":
        for node in heads:
            chosen.discard(node.name)
            fp32[node.name] = HEAD_REASON
        for node in reversed(quantized):  # a Reshape/Flatten that fed only the head goes back to FP32 too
            if node.op_type in PRUNABLE and node.name in chosen:
                readers = [c for o in node.output for c in consumers.get(o, [])]
                if not any(c.name in chosen for c in readers):
                    chosen.discard(node.name)
                    fp32[node.name] = "its output feeds only FP32 nodes"
        # What reads only the FP32 head (a Concat adding a background column) goes back to FP32 too: the logits
        # must leave the model as the head computed them, never through a Q/DQ pair.
        live: set[str] = set()
        for node in quantized:
            if node.name not in chosen:
                continue
            if node.op_type not in ANCHORS and not any(i in live for i in activations(node)):
                chosen.discard(node.name)
                fp32[node.name] = "it reads the FP32 classifier head"
                continue
            live.update(o for o in node.output if o)
    nodes = [n.name for n in quantized if n.name in chosen]
    op_types = tuple(sorted({n.op_type for n in quantized if n.name in chosen}))
    return Placement(nodes=nodes, op_types=op_types, from_graph=True, fp32=fp32)


def require_something(model: onnx.ModelProto, placement: Placement, recipe: QuantRecipe) -> None:
    """Refuse (exit code 3) a placement with no compute node to quantize, saying why."""
    types = {n.name: n.op_type for n in model.graph.node}
    if any(types.get(name) in ANCHORS or not placement.from_graph for name in placement.nodes):
        return
    present = ", ".join(sorted(set(types.values()))) or "no nodes"
    if placement.from_graph:
        raise NothingToQuantize(
            f"nothing to quantize: the model has no Conv/Gemm/MatMul node "
            f"{'left after --exclude-nodes ' if recipe.exclude_nodes else ''}(it has: {present})"
        )
    raise NothingToQuantize(
        f"nothing to quantize: no node of type {', '.join(recipe.op_types or ())} "
        f"{'left after --exclude-nodes ' if recipe.exclude_nodes else ''}(the model has: {present})"
    )
