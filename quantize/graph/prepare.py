"""Stage 1, prepare: load an FP32 classifier, check it, and bring legacy (zoo opset-7) files up to date.

ONNX Runtime's `quantize_static` on an opset-7 file bumps it to opset 11 itself and can emit a model that fails
at inference (per-axis QuantizeLinear on BatchNormalization), and neural-compressor rejects the BatchNormalization
`spatial` attribute. Both are avoided by upgrading first: opset 13 with `onnx.version_converter`, IR >= 7,
initializers no longer listed as graph inputs (so they are constants the optimizer may fold), then
`quant_pre_process` (symbolic shape inference + ORT's basic optimizer, which folds BatchNorm into Conv where it
can). Every step taken is recorded so the report can say what was done to the user's model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto

from calibration.errors import RqInputError
from quantize.exits import is_environment_error, one_line, ort_reason
from quantize.files import inside
from quantize.graph.rewrite import rewrite_standalone_batchnorms, unique_name
from quantize.measure.runtimes import muted, ort_session, quiet

logger = logging.getLogger(__name__)

TARGET_OPSET = 13
MIN_IR_VERSION = 7
FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.DOUBLE: "float64"}


class ModelError(RqInputError):
    """A model file rq cannot use."""


@dataclass
class ModelSignature:
    """What later stages need to know about a classifier's interface."""

    input_name: str
    input_shape: list[int | str]  # symbolic dims as their names
    input_type: str
    output_name: str
    output_shape: list[int | str]

    @property
    def fixed_batch(self) -> int | None:
        first = self.input_shape[0]
        return first if isinstance(first, int) and first > 0 else None

    @property
    def spatial(self) -> tuple[int | str, int | str]:
        return self.input_shape[2], self.input_shape[3]

    def to_dict(self) -> dict:
        return {
            "input_name": self.input_name,
            "input_shape": self.input_shape,
            "input_type": self.input_type,
            "output_name": self.output_name,
            "output_shape": self.output_shape,
        }


@dataclass
class PreparedModel:
    """The result of `prepare_model`: the file to calibrate/quantize and what was done to get it."""

    source: Path
    path: Path  # the prepared model (inside workdir)
    signature: ModelSignature
    original_opset: int
    original_ir_version: int
    steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "source": str(self.source),
            "signature": self.signature.to_dict(),
            "original_opset": self.original_opset,
            "original_ir_version": self.original_ir_version,
            "steps": list(self.steps),
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 3),
        }


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise ModelError("the model imports no default ONNX opset")


def load_model(path: Path | str, *, load_weights: bool = True) -> onnx.ModelProto:
    """Load an ONNX file (external data included) or fail with one line that says why."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    if path.stat().st_size == 0:
        raise ModelError(f"{path} is an empty file (0 bytes), not an ONNX model")
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except Exception as exc:  # protobuf DecodeError, missing external data file, ...
        raise ModelError(f"{path} is not a readable ONNX model ({one_line(exc)})") from None


_NUMPY_TYPES = {"float32": "float32", "float16": "float16", "float64": "float64"}


def check_runs_in_onnxruntime(path: Path | str, signature: ModelSignature, name: str) -> None:
    """The FP32 model must load in ONNX Runtime and run one image; else it is bad input, with ORT's reason.

    A model with free spatial dimensions is only loaded (rq does not know its image size yet).
    """
    import numpy as np

    try:
        session = ort_session(path, threads=1)
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load {name}: {ort_reason(exc)}") from None
    batch = signature.fixed_batch or 1
    rest = signature.input_shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in rest):
        return
    sample = np.zeros([batch, *rest], dtype=_NUMPY_TYPES[signature.input_type])
    try:
        session.run(None, {signature.input_name: sample})
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot run {name}: {ort_reason(exc)}") from None


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: graph inputs that are not also initializers (IR < 4 lists weights as inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    return [inp for inp in model.graph.input if inp.name not in initializers]


def classifier_signature(model: onnx.ModelProto, source: Path | str = "model") -> ModelSignature:
    """Check the model is an image classifier rq can handle: one 4-D float input, an [N, classes] output."""
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs) or "none"
        raise ModelError(f"{source}: expected one image input, found {len(inputs)} ({names})")
    inp = inputs[0]
    elem = inp.type.tensor_type.elem_type
    if elem not in FLOAT_TYPES:
        raise ModelError(
            f"{source}: input '{inp.name}' has element type "
            f"{TensorProto.DataType.Name(elem)}, expected a float tensor"
        )
    in_shape = _dims(inp)
    if len(in_shape) != 4:
        raise ModelError(
            f"{source}: input '{inp.name}' is {len(in_shape)}-D {in_shape}, expected 4-D [N,C,H,W]"
        )
    if not model.graph.output:
        raise ModelError(f"{source}: the model has no output")
    out = model.graph.output[0]
    out_shape = _dims(out)
    if out_shape and len(out_shape) != 2:
        raise ModelError(
            f"{source}: output '{out.name}' has shape {out_shape}, expected [N, classes] of a classifier"
        )
    return ModelSignature(inp.name, in_shape, FLOAT_TYPES[elem], out.name, out_shape)


def _drop_initializer_inputs(model: onnx.ModelProto) -> int:
    initializers = {init.name for init in model.graph.initializer}
    keep = [inp for inp in model.graph.input if inp.name not in initializers]
    dropped = len(model.graph.input) - len(keep)
    if dropped:
        del model.graph.input[:]
        model.graph.input.extend(keep)
    return dropped


def _strip_legacy_batchnorm_attributes(model: onnx.ModelProto) -> int:
    """Remove BatchNormalization attributes that opset >= 9 no longer defines (`spatial`, `is_test`, `consumed_inputs`).

    MXNet-exported zoo models carry `spatial=1` (the only meaning later opsets kept); the version converter
    leaves some of them behind, and the checker, INC and ORT's quantizer reject them.
    """
    removed = 0
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        legacy = [a for a in node.attribute if a.name in ("spatial", "is_test", "consumed_inputs")]
        for attr in legacy:
            if attr.name == "spatial" and attr.i == 0:
                raise ModelError(
                    f"BatchNormalization '{node.name}' uses spatial=0 (per-activation statistics), "
                    "which no current opset supports"
                )
            node.attribute.remove(attr)
            removed += 1
    return removed


def name_nodes(model: onnx.ModelProto) -> int:
    """Give every unnamed (or twice-named) node of the main graph a unique name, in place; how many it renamed.

    Node names are optional in ONNX and many exporters leave them empty, but ONNX Runtime's quantizer, rq's
    placement and the reports all address nodes by name: unnamed ones would collapse into one."""
    taken = {node.name for node in model.graph.node if node.name}
    seen: set[str] = set()
    renamed = 0
    for node in model.graph.node:
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        node.name = unique_name(f"{node.op_type}_{renamed}" if not node.name else node.name, taken)
        seen.add(node.name)
        renamed += 1
    return renamed


def upgrade_model(model: onnx.ModelProto, steps: list[str]) -> onnx.ModelProto:
    """Bring a legacy model to opset >= 13 and IR >= 7, nodes named; append what was done to `steps`."""
    # IR < 4 requires every initializer to be a graph input; raise IR first, then drop them, or the
    # converter sees weights that are neither inputs nor initializers ("Input pre_shift is undefined").
    if model.ir_version < MIN_IR_VERSION:
        steps.append(f"raised IR version {model.ir_version} → {MIN_IR_VERSION}")
        model.ir_version = MIN_IR_VERSION
    dropped = _drop_initializer_inputs(model)
    if dropped:
        steps.append(f"removed {dropped} initializers from the graph inputs")
    opset = default_opset(model)
    if opset < TARGET_OPSET:
        try:
            # The converter's BatchNormalization adapters expect the old attributes on the way up, so strip
            # them after conversion, not before.
            model = onnx.version_converter.convert_version(model, TARGET_OPSET)
        except Exception as exc:
            raise ModelError(
                f"cannot upgrade the model from opset {opset} to {TARGET_OPSET}: {one_line(exc)}"
            ) from None
        steps.append(f"upgraded opset {opset} → {TARGET_OPSET} (onnx.version_converter)")
    stripped = _strip_legacy_batchnorm_attributes(model)
    if stripped:
        steps.append(f"removed {stripped} legacy BatchNormalization attributes (spatial/is_test)")
    renamed = name_nodes(model)
    if renamed:
        steps.append(f"named {renamed} node(s) that had no (or a repeated) name")
    return model


def _save(model: onnx.ModelProto, path: Path) -> None:
    large = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit, with margin
    onnx.save_model(
        model, str(path), save_as_external_data=large, location=path.name + ".data" if large else None
    )


def prepare_model(source: Path | str, workdir: Path, *, pre_process: bool = True) -> PreparedModel:
    """Load, check, upgrade and pre-process `source`; the result lives in `workdir` (caller cleans it)."""
    started = time.perf_counter()
    source = Path(source)
    model = load_model(source)
    signature = classifier_signature(model, source.name)
    check_runs_in_onnxruntime(source, signature, source.name)
    prepared = PreparedModel(
        source=source,
        path=workdir / "prepared.onnx",
        signature=signature,
        original_opset=default_opset(model),
        original_ir_version=model.ir_version,
    )
    model = upgrade_model(model, prepared.steps)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{source.name} fails onnx.checker after upgrade: {one_line(exc)}") from None
    upgraded = workdir / "upgraded.onnx"
    _save(model, upgraded)
    del model

    if not pre_process:
        os.replace(upgraded, prepared.path)
    else:
        _run_quant_pre_process(upgraded, prepared)
    rewrite_standalone_batchnorms(
        prepared
    )  # unfoldable BN → exact per-channel affine (quantize/graph/rewrite.py)
    prepared.signature = classifier_signature(load_model(prepared.path, load_weights=False), source.name)
    prepared.seconds = time.perf_counter() - started
    for step in prepared.steps:
        logger.debug("prepare %s: %s", source.name, step)
    return prepared


def _raised_in_symbolic_shape(exc: BaseException) -> bool:
    """Whether `exc` came out of ORT's symbolic shape inference (tools/symbolic_shape_infer.py)."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith("symbolic_shape_infer.py"):
            return True
        tb = tb.tb_next
    return False


def _run_quant_pre_process(upgraded: Path, prepared: PreparedModel) -> None:
    """`quant_pre_process` with fallbacks; symbolic shape inference runs at most once.

    ORT's symbolic shape inference saves `sym_shape_infer_temp.onnx` and `<uuid>.data` files into the current
    directory when it cannot complete: it runs from a scratch folder inside rq's work folder.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    upgraded, output = Path(os.path.abspath(upgraded)), Path(os.path.abspath(prepared.path))
    scratch = upgraded.parent / "shape-inference"
    scratch.mkdir(exist_ok=True)
    full = ("symbolic shape inference + ORT optimizer + ONNX shape inference", {})
    no_optimizer = ("ORT optimizer skipped (it failed on this model)", {"skip_optimization": True})
    no_symbolic = (
        "symbolic shape inference skipped (it could not complete on this model)",
        {"skip_symbolic_shape": True},
    )
    neither = (
        "ORT optimizer and symbolic shape inference skipped (both failed on this model)",
        {"skip_optimization": True, "skip_symbolic_shape": True},
    )
    attempts = [full]
    errors = []
    while attempts:
        description, kwargs = attempts.pop(0)
        try:
            # ORT's pre-processing logs and prints a lot; it is noise inside rq's own summary.
            with quiet(), muted("onnxruntime.quantization.shape_inference"), inside(scratch):
                quant_pre_process(str(upgraded), str(output), **kwargs)
            prepared.steps.append(f"quant_pre_process: {description}")
            if errors:
                prepared.warnings.append("quant_pre_process fell back: " + "; ".join(errors))
            return
        except Exception as exc:
            if is_environment_error(exc):
                raise  # a full disk is not a reason to try without the optimizer
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            errors.append(f"{type(exc).__name__}: {message}")
            with contextlib.suppress(FileNotFoundError):
                output.unlink()
            if kwargs is full[1]:
                # Symbolic shape inference runs before the optimizer: when it is what failed, the next try
                # skips it (and keeps the optimizer); running it again would fail the same way.
                attempts = (
                    [no_symbolic, neither] if _raised_in_symbolic_shape(exc) else [no_optimizer, neither]
                )
    raise ModelError("quant_pre_process failed on this model: " + " | ".join(errors))
