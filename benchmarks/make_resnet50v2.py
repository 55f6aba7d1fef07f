"""Write a full-size ResNet50-v2 (pre-activation) ONNX model with random weights, laid out like the zoo's file.

The topology is gluon's ``resnet50_v2`` as exported to the ONNX model zoo (``resnet50-v2-7.onnx``):

    data → BN (input, scale/center off) → conv0 7×7/2 → BN → ReLU → MaxPool 3×3/2
      → 4 stages of bottleneck blocks (3, 4, 6, 3; widths 256, 512, 1024, 2048; stride 2 from stage 2
        on, on the 3×3 conv), each block:
            x → BN → ReLU = a;  shortcut = x, or a 1×1 projection conv of a (first block of a stage)
            a → conv 1×1 → BN → ReLU → conv 3×3 (stride) → BN → ReLU → conv 1×1 → Add(shortcut)
      → BN → ReLU → GlobalAveragePool → Flatten → Dense(1000)

Zoo style: opset 7, IR version 3, every initializer also listed as a graph input, BatchNormalization with
``spatial=1``, convolutions without bias, node/tensor names ``resnetv24_…``. Input ``data`` [N,3,224,224],
output ``resnetv24_dense0_fwd`` [N,1000]. Weights are random (He-initialised convs, BN statistics chosen so
activations stay O(1)); the model is for *speed* measurements only — its predictions are meaningless.

    python benchmarks/make_resnet50v2.py models/resnet50v2-topology.onnx   # models/ is git-ignored
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PREFIX = "resnetv24_"
OUTPUT = "resnetv24_dense0_fwd"


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.counts: dict[str, int] = {}

    def _name(self, scope: str, kind: str) -> str:
        key = scope + kind
        n = self.counts.get(key, 0)
        self.counts[key] = n + 1
        return f"{scope}{kind}{n}"

    def _init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def conv(self, scope: str, x: str, cin: int, cout: int, k: int, stride: int = 1) -> str:
        name = self._name(scope, "conv")
        w = self.rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))
        self._init(f"{name}_weight", w)
        out = f"{name}_fwd"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}_weight"],
                [out],
                name=out,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[k // 2] * 4,
                dilations=[1, 1],
                group=1,
            )
        )
        return out

    def bn(self, scope: str, x: str, c: int, *, affine: bool = True) -> str:
        name = self._name(scope, "batchnorm")
        if affine:
            gamma = self.rng.uniform(0.5, 1.5, c)
            beta = self.rng.standard_normal(c) * 0.1
        else:  # gluon's input BN: scale=False, center=False
            gamma, beta = np.ones(c), np.zeros(c)
        # Running statistics of a plausible size; var > 0 so 1/sqrt(var + eps) stays moderate.
        mean = self.rng.standard_normal(c) * 0.1
        var = self.rng.uniform(0.5, 2.0, c)
        for suffix, arr in (("gamma", gamma), ("beta", beta), ("running_mean", mean), ("running_var", var)):
            self._init(f"{name}_{suffix}", arr)
        out = f"{name}_fwd"
        self.nodes.append(
            helper.make_node(
                "BatchNormalization",
                [x, f"{name}_gamma", f"{name}_beta", f"{name}_running_mean", f"{name}_running_var"],
                [out],
                name=out,
                epsilon=1e-5,
                momentum=0.9,
                spatial=1,
            )
        )
        return out

    def relu(self, scope: str, x: str) -> str:
        out = f"{self._name(scope, 'relu')}_fwd"
        self.nodes.append(helper.make_node("Relu", [x], [out], name=out))
        return out

    def add(self, scope: str, a: str, b: str) -> str:
        out = f"{self._name(scope, 'elemwise_add')}"
        self.nodes.append(helper.make_node("Add", [a, b], [out], name=out))
        return out


def build(batch: int | str = "N", seed: int = 0) -> onnx.ModelProto:
    """The ResNet50-v2 topology as an opset-7 / IR-3 ONNX model with random weights."""
    b = _Builder(seed)
    x = b.bn(PREFIX, "data", 3, affine=False)
    x = b.conv(PREFIX, x, 3, 64, 7, stride=2)
    x = b.bn(PREFIX, x, 64)
    x = b.relu(PREFIX, x)
    pool = f"{PREFIX}pool0_fwd"
    b.nodes.append(
        helper.make_node(
            "MaxPool", [x], [pool], name=pool, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
        )
    )
    x = pool
    cin = 64
    for stage, (blocks, width, stride) in enumerate(
        [(3, 256, 1), (4, 512, 2), (6, 1024, 2), (3, 2048, 2)], start=1
    ):
        scope = f"{PREFIX}stage{stage}_"
        for i in range(blocks):
            s = stride if i == 0 else 1
            mid = width // 4
            pre = b.relu(scope, b.bn(scope, x, cin))  # pre-activation BN + ReLU
            shortcut = b.conv(scope, pre, cin, width, 1, stride=s) if i == 0 else x
            y = b.conv(scope, pre, cin, mid, 1)
            y = b.relu(scope, b.bn(scope, y, mid))
            y = b.conv(scope, y, mid, mid, 3, stride=s)
            y = b.relu(scope, b.bn(scope, y, mid))
            y = b.conv(scope, y, mid, width, 1)
            x = b.add(scope, y, shortcut)
            cin = width
    x = b.relu(PREFIX, b.bn(PREFIX, x, cin))
    gap = f"{PREFIX}pool1_fwd"
    b.nodes.append(helper.make_node("GlobalAveragePool", [x], [gap], name=gap))
    flat = f"{PREFIX}flatten0_flatten0"
    b.nodes.append(helper.make_node("Flatten", [gap], [flat], name=flat, axis=1))
    w = b.rng.standard_normal((1000, cin)) * np.sqrt(1.0 / cin)
    b._init(f"{PREFIX}dense0_weight", w)
    b._init(f"{PREFIX}dense0_bias", b.rng.standard_normal(1000) * 0.01)
    b.nodes.append(
        helper.make_node(
            "Gemm",
            [flat, f"{PREFIX}dense0_weight", f"{PREFIX}dense0_bias"],
            [OUTPUT],
            name=OUTPUT,
            alpha=1.0,
            beta=1.0,
            transA=0,
            transB=1,
        )
    )
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, 224, 224])]
    # IR 3: every initializer is also a graph input (as in the zoo's MXNet exports).
    inputs += [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in b.inits]
    graph = helper.make_graph(
        b.nodes,
        "resnetv24",
        inputs,
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [batch, 1000])],
        initializer=b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)
    model.producer_name = "rq benchmarks/make_resnet50v2.py (random weights, speed only)"
    return model


def parameter_count(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(i.dims)) for i in model.graph.initializer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "output", type=Path, help="where to write the .onnx (e.g. models/resnet50v2-topology.onnx)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", default="N", help="batch dimension: N (free, default) or a number")
    args = parser.parse_args(argv)
    batch: int | str = int(args.batch) if args.batch.isdigit() else args.batch
    model = build(batch, args.seed)
    onnx.checker.check_model(model)
    if not args.output.parent.is_dir():
        print(f"output folder does not exist: {args.output.parent}", file=sys.stderr)
        return 2
    tmp = args.output.with_name(args.output.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(args.output)
    bns = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    convs = sum(n.op_type == "Conv" for n in model.graph.node)
    print(
        f"wrote {args.output}: {parameter_count(model) / 1e6:.2f} M parameters, {convs} Conv, "
        f"{bns} BatchNormalization, opset 7, IR 3"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
