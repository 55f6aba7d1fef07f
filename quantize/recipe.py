"""The quantization recipe: one versioned, JSON-serializable description of how a model was quantized.

The recipe travels through every stage (calibrate → quantize → validate → report), is hashed to cache sweep
results, and is stored in the output model's `metadata_props` under `rq.recipe` so an INT8 file says how it
was made.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from calibration.config import UNKNOWN_FIELD_ERRORS, config_dataclass, first_error
from calibration.errors import RqInputError

RECIPE_VERSION = 2
METADATA_KEY = "rq.recipe"

BACKENDS = ("ort", "inc")
FORMATS = ("qdq", "qoperator")
INT8_TYPES = ("uint8", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "mean-minmax", "mse")
# The runtime the Q/DQ placement is tuned for (quantize.graph.placement; measured in docs/placement.md).
PLACEMENT_RUNTIMES = ("ort", "openvino")
# What `op_types=None` (placement decided from the graph, see quantize.graph.placement) replaced as the default in
# recipe version 2, and what a version-1 recipe without op types meant.
LEGACY_OP_TYPES = ("Conv", "Gemm", "MatMul")
# Op types an `op_types` override may name: those ONNX Runtime's QDQ quantizer handles and runs with integer
# kernels (QLinear*/ConvInteger) or as uint8 data movement. Anything else would be wrapped in Q/DQ pairs
# around a float op (slower, less accurate) or rejected by ORT half-way.
ORT_QUANTIZABLE_OP_TYPES = (
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Relu",
    "Clip",
    "LeakyRelu",
    "Sigmoid",
    "Add",
    "Mul",
    "GlobalAveragePool",
    "AveragePool",
    "MaxPool",
    "Concat",
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Resize",
    "Pad",
    "Slice",
    "Split",
    "Softmax",
)
# Histogram bins for the methods that use a histogram. ORT's quantize_static fixes entropy at 128 bins and
# 128 quantized bins, which leaves the KL search a single candidate: the full min/max range.
DEFAULT_BINS = {"entropy": 2048, "percentile": 2048, "mse": 2048}


# Field types: the recipe is read from hand-written JSON, so a type is never coerced ("100" is not 100, true
# is not 1, "Conv" is not the op types ('C', 'o', 'n', 'v')); tuples keep the recipe hashable.
_Count = Annotated[StrictInt, Field(ge=1)]
_Names = tuple[Annotated[StrictStr, Field(min_length=1)], ...]

# How a wrong value of each field is explained (the CLI rewrites "<label> must" into "--<flag> must").
_VALUE_RULES = {
    "backend": ("backend", f"one of {', '.join(BACKENDS)}"),
    "format": ("format", f"one of {', '.join(FORMATS)}"),
    "activation_type": ("activation type", "uint8 or int8"),
    "weight_type": ("weight type", "uint8 or int8"),
    "calibration": ("calibration", f"one of {', '.join(CALIBRATION_METHODS)}"),
    "placement_runtime": ("placement_runtime", f"one of {', '.join(PLACEMENT_RUNTIMES)}"),
    "percentile": ("percentile", "in (0, 100]"),
    "num_bins": ("num_bins", "≥ 128"),
    "samples": ("samples", "≥ 1"),
    "batch_size": ("batch size", "≥ 1"),
}
_TYPE_WORDS = {
    **dict.fromkeys(
        ("backend", "format", "activation_type", "weight_type", "calibration", "placement_runtime"),
        "a string",
    ),
    **dict.fromkeys(("samples", "seed", "batch_size", "version"), "a whole number"),
    "per_channel": "true or false",
    "bias_correction": "true or false",
    "reduce_range": "true, false or null",
    "percentile": "a number",
    "num_bins": "a whole number or null",
    "op_types": "a list of non-empty names or null",
    "exclude_nodes": "a list of non-empty names",
}


def _explain(exc: ValidationError) -> str:
    """One line naming the recipe field (and, for a wrong value, in the words the CLI maps onto its flags)."""
    loc, kind, value, wrong_value = first_error(exc)
    name = str(loc[0]) if loc else "?"
    if kind in UNKNOWN_FIELD_ERRORS:
        return f"unknown recipe field(s): {name}"
    if wrong_value and name in _VALUE_RULES:
        label, rule = _VALUE_RULES[name]
        return f"{label} must be {rule}, not {value!r}"
    if name == "op_types" and wrong_value:
        return "op_types must name at least one operator type"
    if name in ("op_types", "exclude_nodes") and len(loc) > 1:
        return f"recipe {name} must hold non-empty names, not {value!r}"
    return f"recipe {name} must be {_TYPE_WORDS.get(name, 'valid')}, not {value!r}"


@config_dataclass(_explain)
class QuantRecipe:
    """How to quantize. `reduce_range=None` means "decide from the CPU" (see quantize.measure.cpu.advise_int8)."""

    # Literal[TUPLE] is Literal[*TUPLE]: the allowed values are the module's constants above.
    backend: Literal[BACKENDS] = "ort"
    format: Literal[FORMATS] = "qdq"
    activation_type: Literal[INT8_TYPES] = "uint8"
    weight_type: Literal[INT8_TYPES] = "int8"
    per_channel: StrictBool = True
    reduce_range: StrictBool | None = None
    calibration: Literal[CALIBRATION_METHODS] = "percentile"
    # An int is accepted and stored as a float: 99 and 99.0 are the same recipe (same JSON, same digest).
    percentile: Annotated[StrictFloat, Field(gt=0.0, le=100.0)] = 99.999
    num_bins: Annotated[StrictInt, Field(ge=128)] | None = None
    samples: _Count = 100
    seed: StrictInt = 0
    batch_size: _Count = 8
    # None: placement decided from the graph (quantize.graph.placement); a tuple: exactly these op types.
    op_types: Annotated[_Names, Field(min_length=1)] | None = None
    exclude_nodes: _Names = ()
    # Fold the mean shift INT8 causes in each Conv/Gemm output channel back into its bias
    # (quantize.bias_correction); on by default: measured in docs/placement.md.
    bias_correction: StrictBool = True
    # "openvino": the graph OpenVINO runs fastest (the classifier head quantized too, then the OpenVINO form of
    # quantize/graph/openvino_form.py); "ort": ORT's.
    placement_runtime: Literal[PLACEMENT_RUNTIMES] = "ort"
    version: StrictInt = RECIPE_VERSION

    def __post_init__(self) -> None:
        # Runs after the field types and ranges were checked: only what involves several fields is left.
        checks = [
            (
                (self.activation_type, self.weight_type) != ("int8", "uint8"),
                "int8 activations with uint8 weights are not supported by onnxruntime (use int8 weights)",
            ),
            (
                self.num_bins is None or self.calibration not in ("minmax", "mean-minmax"),
                f"histogram bins apply to entropy, percentile and mse calibration, not {self.calibration}",
            ),
            (
                self.placement_runtime == "ort" or self.format == "qdq",
                "placement_runtime openvino (--placement-runtime) rewrites a QDQ model: it needs format qdq (--format qdq)",
            ),
            (
                self.version == RECIPE_VERSION,
                f"recipe version {self.version} is not supported (this rq: {RECIPE_VERSION})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise RqInputError(message)
        unsupported = [t for t in self.op_types or () if t not in ORT_QUANTIZABLE_OP_TYPES]
        if unsupported:
            raise RqInputError(
                f"onnxruntime cannot quantize op type(s) {', '.join(unsupported)}; it can quantize: "
                f"{', '.join(ORT_QUANTIZABLE_OP_TYPES)}"
            )

    @property
    def bins(self) -> int | None:
        """Histogram bins actually used by the calibration method (None for minmax)."""
        if self.calibration in ("minmax", "mean-minmax"):
            return None
        return self.num_bins or DEFAULT_BINS[self.calibration]

    def with_changes(self, **changes) -> QuantRecipe:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["op_types"] = None if self.op_types is None else list(self.op_types)
        data["exclude_nodes"] = list(self.exclude_nodes)
        if self.placement_runtime == "ort":  # the default is left out: earlier recipes keep their digest
            del data["placement_runtime"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> QuantRecipe:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RqInputError(f"unknown recipe field(s): {', '.join(unknown)}")
        values = dict(data)
        if values.get("version") == 1:
            # Version 1 had no placement (op types always explicit, Conv/Gemm/MatMul by default) and no bias
            # correction: the same recipe in version 2 names its op types and leaves bias correction off.
            values["version"] = RECIPE_VERSION
            values.setdefault("op_types", list(LEGACY_OP_TYPES))
            values.setdefault("bias_correction", False)
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> QuantRecipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RqInputError(f"recipe is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise RqInputError("recipe JSON must be an object")
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: Path) -> QuantRecipe:
        """A recipe JSON file (`rq quantize --recipe FILE`); every error is one line naming the file."""
        path = Path(path)
        if not path.is_file():
            raise RqInputError(f"recipe file not found: {path}")
        try:
            # utf-8-sig: a byte-order mark (Windows editors write one) is accepted, as in labels files.
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise RqInputError(f"cannot read recipe file {path}: {exc}") from None
        try:
            return cls.from_json(text)
        except RqInputError as exc:
            raise RqInputError(f"recipe file {path}: {exc}") from None

    def digest(self) -> str:
        """Short stable hash of the recipe, used to name and cache results."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:12]

    def label(self) -> str:
        """A compact human name, e.g. `qdq-pc-rr-minmax`."""
        parts = [self.format, "pc" if self.per_channel else "pt"]
        if self.reduce_range:
            parts.append("rr")
        parts.append(self.calibration if self.calibration != "percentile" else f"p{self.percentile:g}")
        if self.op_types is not None:
            parts.append("ops")
        if not self.bias_correction:
            parts.append("nobc")
        if self.placement_runtime != "ort":
            parts.append(f"for-{self.placement_runtime}")
        if self.activation_type != "uint8" or self.weight_type != "int8":
            parts.append(f"{self.activation_type[0]}{self.weight_type[0]}")
        if self.backend != "ort":
            parts.insert(0, self.backend)
        return "-".join(parts)
