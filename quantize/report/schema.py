"""The ``rq.report/1`` schema of ``report.json`` as pydantic models, and the one way to write and re-read it.

:func:`write_report` validates the report with :class:`Report` before anything is written, and
:func:`render_report` (``rq report DIR``) validates a ``report.json`` with the same model before rendering it:
what rq writes is exactly what it reads back. Extra keys are allowed everywhere so that newer producers stay
readable; an optional section (``advice``, ``calibration``, ``validation``, ``gate``, ``bench``, and a
variant's ``recipe``, ``accuracy``, ``drop``, ``bench``…) may be ``null``. Numbers accept numpy scalars
(producers leave them in the dict; the JSON writer converts them). Stage names are not required individually:
a run without ``--val`` has no validate stage.
"""

from __future__ import annotations

import errno
import json
import numbers
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainValidator, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from calibration.config import path_text, type_name
from calibration.errors import RqInputError
from quantize.exits import environment_error, is_environment_error
from quantize.files import atomic_write_text, json_text

SCHEMA = "rq.report/1"
JSON_NAME = "report.json"
MD_NAME = "report.md"
HTML_NAME = "report.html"

# The CPU's integer-relevant ISA flags that every report states (under cpu.isa), with their display names.
FLAG_LABELS = (
    ("avx2", "AVX2"),
    ("avx512f", "AVX-512F"),
    ("avx512_vnni", "AVX512-VNNI"),
    ("avx_vnni", "AVX-VNNI"),
    ("amx_int8", "AMX-INT8"),
    ("vnni", "VNNI"),
)


def is_int(v: Any) -> bool:
    # numbers.Integral admits numpy integers; bool is an int subclass in Python but never a valid count.
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def batch_key(key: Any) -> int | None:
    """A bench batch key (``"8"`` in JSON, possibly ``8`` before serialization) as an int, else None."""
    if is_int(key) and int(key) > 0:
        return int(key)
    if isinstance(key, str) and key.isdigit() and int(key) > 0:
        return int(key)
    return None


def _kind(expected: str, ok: Callable[[Any], bool], *, nullable: bool = False) -> Any:
    """A field type checked by ``ok`` (no coercion), with the message ``must be <expected>[ or null]``."""
    expected = f"{expected} or null" if nullable else expected

    def check(value: Any) -> Any:
        if (value is None and nullable) or (value is not None and ok(value)):
            return value
        raise PydanticCustomError(
            "rq_type", "must be {expected}, got {got}", {"expected": expected, "got": type_name(value)}
        )

    return Annotated[Any, PlainValidator(check)]


def _is_pair(item: Any) -> bool:
    return isinstance(item, list | tuple) and len(item) == 2 and all(isinstance(s, str) for s in item)


def _batch(key: Any) -> Any:
    if batch_key(key) is None:
        raise PydanticCustomError("rq_batch", "key {key} is not a batch size", {"key": repr(key)})
    return key


def _object_or_null(value: Any) -> Any:
    """An optional section: checked here so that the message says null is allowed."""
    if value is None or isinstance(value, dict):
        return value
    raise PydanticCustomError("rq_type", "must be an object or null, got {got}", {"got": type_name(value)})


Nullable = BeforeValidator(_object_or_null)


Str = _kind("a string", lambda v: isinstance(v, str))
OptStr = _kind("a string", lambda v: isinstance(v, str), nullable=True)
Int = _kind("an integer", is_int)
OptInt = _kind("an integer", is_int, nullable=True)
Number = _kind("a number", is_number)
OptNumber = _kind("a number", is_number, nullable=True)
Bool = _kind("true or false", lambda v: isinstance(v, bool))
OptBool = _kind("true or false", lambda v: isinstance(v, bool), nullable=True)
Obj = _kind("an object", lambda v: isinstance(v, dict))
OptObj = _kind("an object", lambda v: isinstance(v, dict), nullable=True)
Seconds = _kind("a number of seconds", is_number, nullable=True)
Version = _kind("a version string", lambda v: isinstance(v, str), nullable=True)
Skipped = list[_kind("a [path, reason] pair of strings", _is_pair)]
Replaced = list[_kind("an [unreadable path, replacement path] pair of strings", _is_pair)]
BatchKey = Annotated[Any, PlainValidator(_batch)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="allow")


class Flags(_Section):
    avx2: Bool
    avx512f: Bool
    avx512_vnni: Bool
    avx_vnni: Bool
    amx_int8: Bool
    vnni: Bool


class Cpu(_Section):
    model: Str
    arch: Str
    logical_cores: Int
    isa: Flags


class Advice(_Section):
    reduce_range: Bool
    reason: Str


class Preparation(_Section):
    steps: list[Str]
    warnings: list[Str]
    seconds: Number


class Model(_Section):
    path: Str
    sha256: Str
    size_bytes: Int
    signature: Obj
    preparation: Preparation


class Calibration(_Section):
    folder: Str
    layout: Str
    images_used: Int
    skipped: Skipped
    replaced: Replaced = []  # absent from reports written before replacements existed
    file_list_sha256: Str
    seconds: Number


class Cluster(_Section):
    address: Str
    nodes: Int
    cpus: Number


class RuntimePass(_Section):
    """One runtime's validation pass of a quantize run that validated in several."""

    images_per_s: OptNumber
    seconds: OptNumber


class Validation(_Section):
    folder: Str
    layout: Str
    images: Int
    skipped: Skipped
    overlap_with_calibration: Int
    # null when this run validated nothing itself (a sweep served from its cache)
    images_per_s: OptNumber
    seconds: OptNumber
    cluster: Cluster = None  # type: ignore[assignment]  # present only when the validation ran on Ray (--ray)
    # present only when a quantize run validated in several runtimes: {runtime: {images_per_s, seconds}}
    runtimes: dict[str, RuntimePass] = None  # type: ignore[assignment]


class QuantizedOps(_Section):
    quantized: Int
    candidates: Int
    total_nodes: Int
    by_type: Obj


class Accuracy(_Section):
    top1: Number
    top5: Number
    images: Int


class Drop(_Section):
    """The paired drop FP32 → variant, in percentage points (quantize.measure.stats.PairedDrop)."""

    top1_a: Number
    top1_b: Number
    drop_pt: Number
    ci_low_pt: Number
    ci_high_pt: Number
    confidence: Number
    n: Int
    a_only: Int
    b_only: Int
    disagreements: Int
    method: Str
    significant: Bool


class BenchFigures(_Section):
    median_ms: Number
    p90_ms: Number
    images_per_s: Number
    ratio_to_fp32: Number


class Variant(_Section):
    name: Str
    kind: Annotated[Any, PlainValidator(lambda v: _one_of(v, ("fp32", "int8")))]
    recipe: OptObj
    path: OptStr
    sha256: OptStr
    size_bytes: OptInt
    quantized_ops: Annotated[QuantizedOps | None, Nullable]
    accuracy: Annotated[Accuracy | None, Nullable]
    drop: Annotated[Drop | None, Nullable]
    bench: Annotated[dict[BatchKey, BenchFigures] | None, Nullable]
    pareto: OptBool


def _one_of(value: Any, allowed: tuple[str, ...]) -> Any:
    if value not in allowed or not isinstance(value, str):
        choices = " or ".join(repr(a) for a in allowed)
        raise PydanticCustomError(
            "rq_choice", "must be {choices}, got {value}", {"choices": choices, "value": repr(value)}
        )
    return value


class Gate(_Section):
    max_drop_pt: Number
    passed: Bool
    exit_code: Int
    message: Str


class Report(_Section):
    """``report.json``; see the module docstring. The ``schema`` tag is checked before the model."""

    run_id: Str
    created: Str
    command: Str
    rq_version: Str
    packages: dict[str, Version]
    cpu: Cpu
    advice: Annotated[Advice | None, Nullable]
    model: Model
    calibration: Annotated[Calibration | None, Nullable]
    validation: Annotated[Validation | None, Nullable]
    variants: list[Variant]
    gate: Annotated[Gate | None, Nullable]
    stages: dict[str, Seconds]
    bench: OptObj
    notes: list[Str]

    @model_validator(mode="after")
    def _unique_names(self) -> Report:
        seen: set[str] = set()
        for i, v in enumerate(self.variants):
            if v.name in seen:
                raise PydanticCustomError(
                    "rq_unique", "variants[{i}].name {name} is not unique", {"i": i, "name": repr(v.name)}
                )
            seen.add(v.name)
        return self


def validate_report(data: dict) -> None:
    """Check ``data`` against :class:`Report`; raise a one-line :class:`RqInputError` naming the first bad key."""
    if not isinstance(data, dict):
        raise RqInputError(f"invalid report: expected a JSON object, got {type_name(data)}")
    if "schema" not in data:
        raise RqInputError(f"invalid report: missing key 'schema' (expected {SCHEMA!r})")
    if data["schema"] != SCHEMA:
        raise RqInputError(f"invalid report: schema is {data['schema']!r}, expected {SCHEMA!r}")
    try:
        Report.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        loc = tuple(error["loc"])
        if loc[-1:] == ("[key]",):  # a bad dict key: "variants[0].bench key '0' is not a batch size"
            loc = loc[:-2]
        where = path_text(loc)
        if error["type"] == "missing":
            raise RqInputError(f"invalid report: missing key {where!r}") from None
        message = error["msg"]
        if error["type"] in ("model_type", "dict_type", "list_type"):
            message = f"must be {'a list' if error['type'] == 'list_type' else 'an object'}, got {type_name(error['input'])}"
        raise RqInputError(
            f"invalid report: {where} {message}" if where else f"invalid report: {message}"
        ) from None


# ---------------------------------------------------------------------------------------------------------
# Writing and re-reading
# ---------------------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    """Serialize what producers commonly leave in the dict: numpy scalars/arrays, paths, tuples/sets."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return obj.tolist()
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _not_writable(directory: Path, exc: OSError) -> Exception:
    if is_environment_error(exc) and exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
        return environment_error(exc, directory)  # a full disk is not the user's input
    reason = exc.strerror or type(exc).__name__
    return RqInputError(f"report folder is not writable: {directory} ({reason})")


def _write_views(data: dict, directory: Path) -> dict[str, Path]:
    from quantize.report.render import render_html, render_markdown

    paths = {"md": directory / MD_NAME, "html": directory / HTML_NAME}
    md, page = render_markdown(data), render_html(data)
    try:
        atomic_write_text(paths["md"], md)
        atomic_write_text(paths["html"], page)
    except OSError as exc:
        raise _not_writable(directory, exc) from None
    return paths


def write_report(data: dict, directory: Path) -> dict[str, Path]:
    """Validate ``data``, write ``report.json`` and render ``report.md`` / ``report.html`` in ``directory``.

    The folder is created if needed. Each file is written atomically. Returns the paths under the keys
    ``json``, ``md``, ``html``. Raises :class:`RqInputError` for an invalid report or a folder that cannot
    be created or written.
    """
    validate_report(data)
    directory = Path(directory)
    try:
        # Strict JSON: a NaN/inf (an unmeasured figure) is written as null, never as a bare NaN.
        text = json_text(data, indent=2, ensure_ascii=False, default=_json_default) + "\n"
    except (TypeError, ValueError) as exc:
        raise RqInputError(f"report cannot be written as JSON: {exc}") from None
    json_path = directory / JSON_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json_path, text)
    except OSError as exc:
        raise _not_writable(directory, exc) from None
    # Render from the serialized form so the views show exactly what report.json holds (numpy scalars
    # converted, batch keys as strings), the same as a later render_report would.
    return {"json": json_path, **_write_views(json.loads(text), directory)}


class _NotANumber(ValueError):
    pass


def _no_constant(name: str) -> float:
    # rq writes strict JSON (allow_nan=False); a NaN in it was put there by hand, and would render as a verdict
    # that contradicts itself ("PASSED: drop n/a > 1.00"). Infinity is kept: reports written before rq wrote
    # strict JSON hold it for an exact node's SQNR.
    if name == "NaN":
        raise _NotANumber(f"{name} is not a JSON number")
    return float("inf") if name == "Infinity" else float("-inf")


def read_report(directory: Path) -> dict:
    """The validated ``report.json`` of ``directory``; a missing, unreadable or invalid one is an RqInputError."""
    json_path = Path(directory) / JSON_NAME
    if not json_path.is_file():
        raise RqInputError(f"no {JSON_NAME} in {directory}")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise RqInputError(f"{json_path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:  # a ValueError too: before the next clause
        raise RqInputError(f"{json_path} is not UTF-8 text") from None
    except _NotANumber as exc:
        raise RqInputError(f"{json_path} is not strict JSON: {exc}") from None
    except OSError as exc:
        raise RqInputError(f"cannot read {json_path}: {exc.strerror or exc}") from None
    validate_report(data)
    return data


def render_report(directory: Path) -> dict[str, Path]:
    """Re-render ``report.md`` and ``report.html`` from the ``report.json`` in ``directory`` (``rq report``).

    Returns the paths under ``json``, ``md``, ``html``.
    """
    directory = Path(directory)
    data = read_report(directory)
    return {"json": directory / JSON_NAME, **_write_views(data, directory)}
