"""The quantization recipe: one versioned, JSON-serializable description of how a model was quantized.

The recipe travels through every stage (calibrate → quantize → validate → report), is hashed to cache sweep
results, and is stored in the output model's `metadata_props` under `rq.recipe` so an INT8 file says how it
was made.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace

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


@dataclass(frozen=True)
class QuantRecipe:
    """How to quantize. `reduce_range=None` means "decide from the CPU" (see quantize.measure.cpu.advise_int8)."""

    backend: str = "ort"
    format: str = "qdq"
    activation_type: str = "uint8"
    weight_type: str = "int8"
    per_channel: bool = True
    reduce_range: bool | None = None
    calibration: str = "percentile"
    percentile: float = 99.999
    num_bins: int | None = None
    samples: int = 100
    seed: int = 0
    batch_size: int = 8
    # None: placement decided from the graph (quantize.graph.placement); a tuple: exactly these op types.
    op_types: tuple[str, ...] | None = None
    exclude_nodes: tuple[str, ...] = field(default_factory=tuple)
    # Fold the mean shift INT8 causes in each Conv/Gemm output channel back into its bias
    # (quantize.bias_correction); on by default: measured in docs/placement.md.
    bias_correction: bool = True
    # "openvino": the placement OpenVINO runs fastest (the classifier head quantized too); "ort": ORT's.
    placement_runtime: str = "ort"
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        # Types first: a recipe read from JSON can hold anything, and `"100" >= 1` would raise a TypeError
        # (an internal error) while `"Conv"` would silently become the op types ('C', 'o', 'n', 'v').
        self._check_types()
        checks = [
            (self.backend in BACKENDS, f"backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}"),
            (self.format in FORMATS, f"format must be one of {', '.join(FORMATS)}, not {self.format!r}"),
            (
                self.activation_type in INT8_TYPES,
                f"activation type must be uint8 or int8, not {self.activation_type!r}",
            ),
            (self.weight_type in INT8_TYPES, f"weight type must be uint8 or int8, not {self.weight_type!r}"),
            (
                (self.activation_type, self.weight_type) != ("int8", "uint8"),
                "int8 activations with uint8 weights are not supported by onnxruntime (use int8 weights)",
            ),
            (
                self.calibration in CALIBRATION_METHODS,
                f"calibration must be one of {', '.join(CALIBRATION_METHODS)}, not {self.calibration!r}",
            ),
            (0.0 < self.percentile <= 100.0, f"percentile must be in (0, 100], not {self.percentile}"),
            (self.num_bins is None or self.num_bins >= 128, f"num_bins must be ≥ 128, not {self.num_bins}"),
            (
                self.num_bins is None or self.calibration not in ("minmax", "mean-minmax"),
                f"histogram bins apply to entropy, percentile and mse calibration, not {self.calibration}",
            ),
            (
                self.placement_runtime in PLACEMENT_RUNTIMES,
                f"placement_runtime must be one of {', '.join(PLACEMENT_RUNTIMES)}, not {self.placement_runtime!r}",
            ),
            (self.samples >= 1, f"samples must be ≥ 1, not {self.samples}"),
            (self.batch_size >= 1, f"batch size must be ≥ 1, not {self.batch_size}"),
            (self.op_types is None or bool(self.op_types), "op_types must name at least one operator type"),
            (
                self.version == RECIPE_VERSION,
                f"recipe version {self.version} is not supported (this rq: {RECIPE_VERSION})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise RqInputError(message)
        if self.op_types is not None:
            unsupported = [t for t in self.op_types if t not in ORT_QUANTIZABLE_OP_TYPES]
            if unsupported:
                raise RqInputError(
                    f"onnxruntime cannot quantize op type(s) {', '.join(unsupported)}; it can quantize: "
                    f"{', '.join(ORT_QUANTIZABLE_OP_TYPES)}"
                )
            # Tuples keep the recipe hashable and its JSON stable whatever sequence the caller passed.
            object.__setattr__(self, "op_types", tuple(self.op_types))
        object.__setattr__(self, "exclude_nodes", tuple(self.exclude_nodes))

    def _check_types(self) -> None:
        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in (
            "backend",
            "format",
            "activation_type",
            "weight_type",
            "calibration",
            "placement_runtime",
        ):
            if not isinstance(getattr(self, name), str):
                raise RqInputError(f"recipe {name} must be a string, not {getattr(self, name)!r}")
        for name in ("per_channel", "bias_correction"):
            if not isinstance(getattr(self, name), bool):
                raise RqInputError(f"recipe {name} must be true or false, not {getattr(self, name)!r}")
        if self.reduce_range is not None and not isinstance(self.reduce_range, bool):
            raise RqInputError(f"recipe reduce_range must be true, false or null, not {self.reduce_range!r}")
        if not (is_int(self.percentile) or isinstance(self.percentile, float)):
            raise RqInputError(f"recipe percentile must be a number, not {self.percentile!r}")
        # 99 and 99.0 are the same recipe: keep the JSON (and so the digest) the same.
        object.__setattr__(self, "percentile", float(self.percentile))
        for name in ("samples", "seed", "batch_size", "version"):
            if not is_int(getattr(self, name)):
                raise RqInputError(f"recipe {name} must be a whole number, not {getattr(self, name)!r}")
        if self.num_bins is not None and not is_int(self.num_bins):
            raise RqInputError(f"recipe num_bins must be a whole number or null, not {self.num_bins!r}")
        for name in ("op_types", "exclude_nodes"):
            value = getattr(self, name)
            if value is None and name == "op_types":
                continue
            if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
                raise RqInputError(f"recipe {name} must be a list of names, not {value!r}")
            if not all(isinstance(v, str) and v for v in value):
                raise RqInputError(f"recipe {name} must hold non-empty names, not {list(value)!r}")

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
        for key in ("op_types", "exclude_nodes"):
            # Only JSON lists: tuple("Conv") would be ('C', 'o', 'n', 'v'); __post_init__ rejects the rest.
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
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
        if self.activation_type != "uint8" or self.weight_type != "int8":
            parts.append(f"{self.activation_type[0]}{self.weight_type[0]}")
        if self.backend != "ort":
            parts.insert(0, self.backend)
        return "-".join(parts)
