"""Pad a quantized convolution's input channels to a multiple of 4, so ONNX Runtime runs it in its direct kernel.

ONNX Runtime runs a QLinearConv with symmetric int8 weights in MLAS's direct ("ConvSym") kernels only when its
input channels are a multiple of 4 (the kernels read activations four channels at a time) and it has at least
16 output channels in a multiple of 8 (`MlasConvSymPackWSize`). A network's first convolution reads an RGB image
(3 channels) and falls back to im2col + GEMM, which on a VNNI CPU made it the slowest convolution of the INT8
ResNet50-v2 (1.41 ms at batch 1, slower than its FP32 twin's 1.14 ms; padded: 0.78 ms).

The rewrite is exact by construction: the quantized input gets a fourth channel that holds the zero point
(a uint8 ``Pad`` between its QuantizeLinear and DequantizeLinear, so it dequantizes to 0.0), and the int8
weight a matching input channel of zeros; the integer sums are unchanged. (One caveat: without VNNI, u8×s8
kernels add products in int16 pairs that can saturate with 8-bit weights, and the two kernels pair different
products; rq picks 7-bit weights on such CPUs, where nothing saturates.) It is applied when a file is published
(after bias correction, which compares the INT8 graph with the FP32 one tensor by tensor; the fallback tuner's
step models are not padded, for the same reason), and only where rq lays the file out for ONNX Runtime:
OpenVINO picks its own first-layer kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from quantize.graph.rewrite import attribute, unique_name

#: ONNX Runtime's direct int8 convolution reads input channels in groups of this many.
CHANNEL_MULTIPLE = 4
#: ...and needs at least 16 output channels, in a multiple of 8 (AVX2: 8; AVX-512: 4).
MIN_OUTPUT_CHANNELS = 16
OUTPUT_CHANNEL_MULTIPLE = 8


@dataclass(frozen=True)
class ChannelPad:
    """One convolution whose input channels were padded."""

    node: str
    channels: int  # the model's own input channels
    padded: int  # what the INT8 file computes with (the extra ones are zero)

    def to_dict(self) -> dict:
        return {"node": self.node, "channels": self.channels, "padded": self.padded}


def describe_channel_pads(pads: list[ChannelPad]) -> str:
    """One line for the quantize table and the report."""
    where = ", ".join(f"{p.node} {p.channels}→{p.padded}" for p in pads)
    return (
        f"{len(pads)} convolution input(s) padded to a multiple of {CHANNEL_MULTIPLE} channels ({where}): "
        "ONNX Runtime then runs them in its direct int8 kernel; the added channels and their weights are zero "
        "(the same integer sums)"
    )


def _initializer_array(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    return numpy_helper.to_array(inits[name]) if name in inits else None


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    reads: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for body in [attr.g] if attr.HasField("g") else list(attr.graphs):
                reads |= {name for n in body.node for name in n.input} | _subgraph_reads(body)
    return reads


def pad_conv_input_channels(model: onnx.ModelProto) -> list[ChannelPad]:
    """Pad, in place, the input channels of every QDQ Conv that ONNX Runtime would otherwise run through
    im2col; return what was padded. Convs that do not match the pattern exactly are left as they are."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:  # Pad takes its pads and value as inputs from opset 11 on
        return []
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    nested_reads = _subgraph_reads(graph)  # tensors read inside If/Loop bodies: not in `readers`
    taken = {name for node in graph.node for name in (*node.input, *node.output)} | set(inits)
    pads: list[ChannelPad] = []
    stale: set[str] = set()
    for conv in list(graph.node):
        if conv.op_type != "Conv" or attribute(conv, "group", 1) != 1 or len(conv.input) < 2:
            continue
        x_dq, w_dq = producer.get(conv.input[0]), producer.get(conv.input[1])
        if (
            x_dq is None
            or w_dq is None
            or x_dq.op_type != "DequantizeLinear"
            or w_dq.op_type != "DequantizeLinear"
        ):
            continue
        weight = _initializer_array(inits, w_dq.input[0])
        if weight is None or weight.dtype != np.int8 or weight.ndim < 3:
            continue
        out_channels, channels = weight.shape[:2]
        extra = -channels % CHANNEL_MULTIPLE
        if extra == 0 or out_channels < MIN_OUTPUT_CHANNELS or out_channels % OUTPUT_CHANNEL_MULTIPLE:
            continue
        w_scale = _initializer_array(inits, w_dq.input[1])
        if w_scale is None or (w_scale.size > 1 and attribute(w_dq, "axis", 1) != 0):
            continue  # per-output-channel scales (axis 0) or one scale: unchanged by more input channels
        w_zero = w_dq.input[2] if len(w_dq.input) > 2 else ""
        if w_zero and (w_zero not in inits or numpy_helper.to_array(inits[w_zero]).any()):
            continue  # the direct kernel is for symmetric weights only
        # The weight must be this Conv's alone (it changes shape), the activation quantized per tensor in uint8
        # (ONNX Runtime's direct kernel on x86 is u8s8), with constant scale and zero point.
        if len(readers.get(w_dq.input[0], [])) != 1 or len(readers.get(conv.input[1], [])) != 1:
            continue
        if len(x_dq.input) < 3 or x_dq.input[2] not in inits or x_dq.input[1] not in inits:
            continue
        x_zero = numpy_helper.to_array(inits[x_dq.input[2]])
        if x_zero.dtype != np.uint8 or x_zero.size != 1 or x_dq.input[0] in inits:
            continue
        quantized = x_dq.input[0]
        rank = weight.ndim
        pads_name = unique_name(f"{conv.name}_rq_channel_pads", taken)
        padded_q = unique_name(f"{quantized}_rq_c{channels + extra}", taken)
        padded_x = unique_name(f"{conv.input[0]}_rq_c{channels + extra}", taken)
        pad_ends = [0] * rank
        pad_ends[1] = extra
        graph.initializer.append(
            numpy_helper.from_array(np.array([0] * rank + pad_ends, dtype=np.int64), pads_name)
        )
        pad = helper.make_node(
            "Pad",
            [quantized, pads_name, x_dq.input[2]],
            [padded_q],
            name=unique_name(f"{conv.name}_rq_channel_pad", taken),
            mode="constant",
        )
        # A DequantizeLinear of its own for the padded tensor: the original one may feed other nodes (it is
        # removed when it feeds none).
        dq = helper.make_node(
            "DequantizeLinear",
            [padded_q, x_dq.input[1], x_dq.input[2]],
            [padded_x],
            name=unique_name(f"{x_dq.name}_rq_c{channels + extra}", taken),
        )
        old_x = conv.input[0]
        conv.input[0] = padded_x
        readers[old_x].remove(conv)
        at = list(graph.node).index(conv)
        graph.node.insert(at, dq)
        graph.node.insert(at, pad)
        if not readers[old_x] and old_x not in graph_outputs and old_x not in nested_reads:
            graph.node.remove(x_dq)  # ONNX Runtime would keep running a DequantizeLinear nobody reads
        zeros = np.zeros((out_channels, extra, *weight.shape[2:]), dtype=np.int8)
        inits[w_dq.input[0]].CopyFrom(
            numpy_helper.from_array(np.concatenate([weight, zeros], axis=1), w_dq.input[0])
        )
        stale |= {conv.input[1], w_dq.input[0]}
        pads.append(ChannelPad(conv.name, int(channels), int(channels + extra)))
    if stale:  # shapes recorded for the padded weights' DequantizeLinear outputs
        keep = [vi for vi in graph.value_info if vi.name not in stale]
        del graph.value_info[:]
        graph.value_info.extend(keep)
    return pads
