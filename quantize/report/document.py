"""A run's report: ``report.json`` (the source of truth) rendered to ``report.md`` and ``report.html``.

The JSON is produced by the pipeline and follows the ``rq.report/1`` schema (see :func:`validate_report`
for the keys and types it checks). This module only validates, writes and renders it; the Markdown and
HTML are derived views that :func:`render_report` can regenerate at any time from the JSON alone.

Conventions the renderers rely on:

* accuracies (``accuracy.top1``/``top5``, ``drop.top1_a``/``top1_b``) are percentages (0–100) and
  drops are percentage points, ``drop_pt = FP32 top-1 − variant top-1`` (positive = INT8 lost accuracy);
* ``bench`` of a variant maps a batch size (a string in JSON) to that batch's latency figures, with
  ``ratio_to_fp32`` = FP32 median / variant median (> 1 means faster than FP32);
* ``gate`` may carry the optional keys ``variant`` (the variant it judged) and ``drop_pt``; without them
  the verdict quotes the smallest INT8 drop in the report.

Every optional section may be ``null``: it renders as "not measured" instead of failing, so a report of a
run without ``--val`` or ``--bench`` is still complete. The HTML is self-contained (inline CSS, the plot
embedded as a base64 PNG) so it can be mailed or attached to a CI run as one file.
"""

from __future__ import annotations

import base64
import errno
import html
import io
import json
import math
import numbers
import os
import re
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

from calibration.errors import RqInputError
from quantize.exits import environment_error, is_environment_error
from quantize.files import atomic_write_text, json_text
from quantize.measure.stats import pareto_front

SCHEMA = "rq.report/1"
JSON_NAME = "report.json"
MD_NAME = "report.md"
HTML_NAME = "report.html"

SKIPPED_SHOWN = 20  # skipped-file lists longer than this are cut, with "… and K more"
NOT_MEASURED = "not measured"
NO_VNNI_NOTE = "INT8 gains are bounded near 1.33× on CPUs without VNNI"
PLOT_MISSING = (
    "The accuracy-vs-speed plot needs --val and --bench: no INT8 variant has both accuracy and "
    "benchmark figures."
)

# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------

_STAGES = ("prepare", "calibrate", "quantize", "validate", "bench")
_FLAG_LABELS = (
    ("avx2", "AVX2"),
    ("avx512f", "AVX-512F"),
    ("avx512_vnni", "AVX512-VNNI"),
    ("avx_vnni", "AVX-VNNI"),
    ("amx_int8", "AMX-INT8"),
    ("vnni", "VNNI"),
)


def _is_int(v: Any) -> bool:
    # numbers.Integral admits numpy integers (json.dumps is given a converter for them); bool is an int
    # subclass in Python but never a valid count.
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "int": ("an integer", _is_int),
    "number": ("a number", _is_number),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "dict": ("an object", lambda v: isinstance(v, dict)),
    "list": ("a list", lambda v: isinstance(v, list)),
}


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, str):
        return "a string"
    if _is_number(v):
        return "a number"
    return type(v).__name__


def _field(obj: dict, key: str, kind: str, where: str, *, nullable: bool = False) -> Any:
    """``obj[key]`` after checking it exists and has ``kind``; the error names the dotted path."""
    path = f"{where}.{key}" if where else key
    if key not in obj:
        raise RqInputError(f"invalid report: missing key {path!r}")
    value = obj[key]
    if value is None and nullable:
        return None
    label, ok = _KINDS[kind]
    if not ok(value):
        expected = f"{label} or null" if nullable else label
        raise RqInputError(f"invalid report: {path} must be {expected}, got {_type_name(value)}")
    return value


def _str_list(values: list, where: str) -> None:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise RqInputError(f"invalid report: {where}[{i}] must be a string, got {_type_name(v)}")


def _skipped(values: list, where: str) -> None:
    for i, item in enumerate(values):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(s, str) for s in item)):
            raise RqInputError(f"invalid report: {where}[{i}] must be a [path, reason] pair of strings")


def _validate_cpu(cpu: dict) -> None:
    _field(cpu, "model", "str", "cpu")
    _field(cpu, "arch", "str", "cpu")
    _field(cpu, "logical_cores", "int", "cpu")
    flags = _field(cpu, "flags_summary", "dict", "cpu")
    for key, _label in _FLAG_LABELS:
        _field(flags, key, "bool", "cpu.flags_summary")


def _validate_model(model: dict) -> None:
    _field(model, "path", "str", "model")
    _field(model, "sha256", "str", "model")
    _field(model, "size_bytes", "int", "model")
    _field(model, "signature", "dict", "model")
    prep = _field(model, "preparation", "dict", "model")
    _str_list(_field(prep, "steps", "list", "model.preparation"), "model.preparation.steps")
    _str_list(_field(prep, "warnings", "list", "model.preparation"), "model.preparation.warnings")
    _field(prep, "seconds", "number", "model.preparation")


def _validate_calibration(cal: dict) -> None:
    _field(cal, "folder", "str", "calibration")
    _field(cal, "layout", "str", "calibration")
    _field(cal, "images_used", "int", "calibration")
    _skipped(_field(cal, "skipped", "list", "calibration"), "calibration.skipped")
    _field(cal, "file_list_sha256", "str", "calibration")
    _field(cal, "seconds", "number", "calibration")


def _validate_validation(val: dict) -> None:
    _field(val, "folder", "str", "validation")
    _field(val, "layout", "str", "validation")
    _field(val, "images", "int", "validation")
    _skipped(_field(val, "skipped", "list", "validation"), "validation.skipped")
    _field(val, "overlap_with_calibration", "int", "validation")
    # null when this run validated nothing itself (a sweep served from its cache)
    _field(val, "images_per_s", "number", "validation", nullable=True)
    _field(val, "seconds", "number", "validation", nullable=True)
    if "cluster" in val:  # only when the validation ran on a Ray cluster (--ray)
        cluster = _field(val, "cluster", "dict", "validation")
        _field(cluster, "address", "str", "validation.cluster")
        _field(cluster, "nodes", "int", "validation.cluster")
        _field(cluster, "cpus", "number", "validation.cluster")


_DROP_FIELDS = (
    ("top1_a", "number"),
    ("top1_b", "number"),
    ("drop_pt", "number"),
    ("ci_low_pt", "number"),
    ("ci_high_pt", "number"),
    ("confidence", "number"),
    ("n", "int"),
    ("a_only", "int"),
    ("b_only", "int"),
    ("disagreements", "int"),
    ("method", "str"),
    ("significant", "bool"),
)
_BENCH_FIELDS = ("median_ms", "p90_ms", "images_per_s", "ratio_to_fp32")


def _batch_key(key: Any) -> int | None:
    """A bench batch key (``"8"`` in JSON, possibly ``8`` before serialization) as an int, else None."""
    if _is_int(key) and int(key) > 0:
        return int(key)
    if isinstance(key, str) and key.isdigit() and int(key) > 0:
        return int(key)
    return None


def _validate_variant(v: Any, where: str) -> None:
    if not isinstance(v, dict):
        raise RqInputError(f"invalid report: {where} must be an object, got {_type_name(v)}")
    _field(v, "name", "str", where)
    kind = _field(v, "kind", "str", where)
    if kind not in ("fp32", "int8"):
        raise RqInputError(f"invalid report: {where}.kind must be 'fp32' or 'int8', got {kind!r}")
    _field(v, "recipe", "dict", where, nullable=True)
    _field(v, "path", "str", where, nullable=True)
    _field(v, "sha256", "str", where, nullable=True)
    _field(v, "size_bytes", "int", where, nullable=True)
    ops = _field(v, "quantized_ops", "dict", where, nullable=True)
    if ops is not None:
        for key in ("quantized", "candidates", "total_nodes"):
            _field(ops, key, "int", f"{where}.quantized_ops")
        _field(ops, "by_type", "dict", f"{where}.quantized_ops")
    acc = _field(v, "accuracy", "dict", where, nullable=True)
    if acc is not None:
        _field(acc, "top1", "number", f"{where}.accuracy")
        _field(acc, "top5", "number", f"{where}.accuracy")
        _field(acc, "images", "int", f"{where}.accuracy")
    drop = _field(v, "drop", "dict", where, nullable=True)
    if drop is not None:
        for key, kind in _DROP_FIELDS:
            _field(drop, key, kind, f"{where}.drop")
    bench = _field(v, "bench", "dict", where, nullable=True)
    if bench is not None:
        for key, figures in bench.items():
            if _batch_key(key) is None:
                raise RqInputError(f"invalid report: {where}.bench key {key!r} is not a batch size")
            bwhere = f"{where}.bench.{key}"
            if not isinstance(figures, dict):
                raise RqInputError(f"invalid report: {bwhere} must be an object, got {_type_name(figures)}")
            for fkey in _BENCH_FIELDS:
                _field(figures, fkey, "number", bwhere)
    _field(v, "pareto", "bool", where, nullable=True)


def validate_report(data: dict) -> None:
    """Check ``data`` against the ``rq.report/1`` schema; raise :class:`RqInputError` at the first problem.

    Checked: the schema tag; every top-level key and its type (``null`` allowed for the optional
    sections ``advice``, ``calibration``, ``validation``, ``gate``, ``bench``); the keys and types inside
    ``cpu``, ``model``, ``calibration``, ``validation``, ``gate``, each variant (and its ``quantized_ops``,
    ``accuracy``, ``drop``, per-batch ``bench`` figures); variant names unique; stage timings numbers (or
    null); notes strings. Extra keys are allowed so that newer producers stay readable. The stage names
    are not required individually: a run without ``--val`` has no validate stage.
    """
    if not isinstance(data, dict):
        raise RqInputError(f"invalid report: expected a JSON object, got {_type_name(data)}")
    if "schema" not in data:
        raise RqInputError(f"invalid report: missing key 'schema' (expected {SCHEMA!r})")
    if data["schema"] != SCHEMA:
        raise RqInputError(f"invalid report: schema is {data['schema']!r}, expected {SCHEMA!r}")
    for key in ("run_id", "created", "command", "rq_version"):
        _field(data, key, "str", "")
    packages = _field(data, "packages", "dict", "")
    for name, version in packages.items():
        if version is not None and not isinstance(version, str):
            raise RqInputError(f"invalid report: packages.{name} must be a version string or null")
    _validate_cpu(_field(data, "cpu", "dict", ""))
    advice = _field(data, "advice", "dict", "", nullable=True)
    if advice is not None:
        _field(advice, "reduce_range", "bool", "advice")
        _field(advice, "reason", "str", "advice")
    _validate_model(_field(data, "model", "dict", ""))
    cal = _field(data, "calibration", "dict", "", nullable=True)
    if cal is not None:
        _validate_calibration(cal)
    val = _field(data, "validation", "dict", "", nullable=True)
    if val is not None:
        _validate_validation(val)
    variants = _field(data, "variants", "list", "")
    seen: set[str] = set()
    for i, v in enumerate(variants):
        _validate_variant(v, f"variants[{i}]")
        if v["name"] in seen:
            raise RqInputError(f"invalid report: variants[{i}].name {v['name']!r} is not unique")
        seen.add(v["name"])
    gate = _field(data, "gate", "dict", "", nullable=True)
    if gate is not None:
        _field(gate, "max_drop_pt", "number", "gate")
        _field(gate, "passed", "bool", "gate")
        _field(gate, "exit_code", "int", "gate")
        _field(gate, "message", "str", "gate")
    stages = _field(data, "stages", "dict", "")
    for name, seconds in stages.items():
        if seconds is not None and not _is_number(seconds):
            raise RqInputError(f"invalid report: stages.{name} must be a number of seconds or null")
    _field(data, "bench", "dict", "", nullable=True)
    _str_list(_field(data, "notes", "list", ""), "notes")


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    """Serialize what producers commonly leave in the dict: numpy scalars/arrays, paths, tuples/sets."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _not_writable(directory: Path, exc: OSError) -> Exception:
    if is_environment_error(exc) and exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
        return environment_error(exc, directory)  # a full disk is not the user's input
    reason = exc.strerror or type(exc).__name__
    return RqInputError(f"report folder is not writable: {directory} ({reason})")


def _write_views(data: dict, directory: Path) -> dict[str, Path]:
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


def render_report(directory: Path) -> dict[str, Path]:
    """Re-render ``report.md`` and ``report.html`` from the ``report.json`` in ``directory``.

    Returns the paths under ``json``, ``md``, ``html``. A missing, unreadable or invalid report.json is an
    :class:`RqInputError`.
    """
    directory = Path(directory)
    json_path = directory / JSON_NAME
    if not json_path.is_file():
        raise RqInputError(f"no {JSON_NAME} in {directory}")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RqInputError(f"{json_path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise RqInputError(f"{json_path} is not UTF-8 text") from None
    except OSError as exc:
        raise RqInputError(f"cannot read {json_path}: {exc.strerror or exc}") from None
    validate_report(data)
    return {"json": json_path, **_write_views(data, directory)}


# ---------------------------------------------------------------------------------------------------------
# Formatting helpers
# ---------------------------------------------------------------------------------------------------------


def _num(x: Any, digits: int = 2) -> str:
    """Fixed-point with a real minus sign (−); a rounded −0.00 shows as 0.00."""
    if not _is_number(x):
        return NOT_MEASURED if x is None else str(x)
    x = float(x)
    if math.isnan(x):
        return "n/a"
    text = f"{x:.{digits}f}"
    if float(text) == 0.0:
        text = f"{0.0:.{digits}f}"
    return text.replace("-", "−")


def _mb(size: Any) -> str:
    if not _is_number(size):
        return NOT_MEASURED
    mb = size / 1e6
    return f"{mb:.1f}" if mb >= 10 else f"{mb:.2f}"


def _seconds(s: Any) -> str:
    if not _is_number(s):
        return "not run"
    return f"{s:.1f} s" if s >= 10 else f"{s:.2f} s"


def _pct(conf: Any) -> str:
    if not _is_number(conf):
        return "?"
    return f"{100 * conf:g}"


def _drop_cell(drop: dict | None) -> str:
    """``0.15 [−0.08, 0.38]``: the drop and its interval, in percentage points."""
    if not isinstance(drop, dict):
        return NOT_MEASURED
    return f"{_num(drop.get('drop_pt'))} [{_num(drop.get('ci_low_pt'))}, {_num(drop.get('ci_high_pt'))}]"


def _model_name(data: dict) -> str:
    model = data.get("model") or {}
    path = model.get("path") if isinstance(model, dict) else None
    if not isinstance(path, str) or not path:
        return "unknown model"
    return PurePath(path).name or path


def _variants(data: dict) -> list[dict]:
    return [v for v in data.get("variants") or [] if isinstance(v, dict)]


def _bench_of(v: dict) -> dict[int, dict]:
    """A variant's bench figures keyed by int batch size (JSON keys are strings)."""
    out: dict[int, dict] = {}
    for key, figures in (v.get("bench") or {}).items():
        b = _batch_key(key)
        if b is not None and isinstance(figures, dict):
            out[b] = figures
    return out


def _all_batches(variants: list[dict]) -> list[int]:
    return sorted({b for v in variants for b in _bench_of(v)})


def _top1(v: dict) -> float | None:
    acc = v.get("accuracy")
    if isinstance(acc, dict) and _is_number(acc.get("top1")):
        return float(acc["top1"])
    return None


# ---------------------------------------------------------------------------------------------------------
# Document model: a list of blocks that both renderers walk, so MD and HTML always say the same thing.
# ---------------------------------------------------------------------------------------------------------

# ("h2", text) | ("p", text) | ("verdict", "passed"|"failed"|"none", text) | ("list", [text])
# | ("table", [header], [[cell]]) | ("code", text) | ("plot",)
Block = tuple


def _gated_drop(data: dict, gate: dict) -> tuple[str | None, float | None]:
    """(variant name, drop pt) the gate verdict quotes; see the module docstring for the fallback."""
    int8 = [v for v in _variants(data) if v.get("kind") == "int8" and isinstance(v.get("drop"), dict)]
    named = gate.get("variant")
    if isinstance(named, str):
        for v in int8:
            if v.get("name") == named:
                return named, float(v["drop"]["drop_pt"])
    if _is_number(gate.get("drop_pt")):
        return (named if isinstance(named, str) else None), float(gate["drop_pt"])
    measured = [v for v in int8 if _is_number(v["drop"].get("drop_pt"))]
    if not measured:
        return None, None
    best = min(measured, key=lambda v: v["drop"]["drop_pt"])
    return best.get("name"), float(best["drop"]["drop_pt"])


def _gate_blocks(data: dict) -> list[Block]:
    gate = data.get("gate")
    if not isinstance(gate, dict):
        return [("verdict", "none", "Accuracy gate: not applied (no maximum drop was set).")]
    passed = bool(gate.get("passed"))
    word = "PASSED" if passed else "FAILED"
    limit = gate.get("max_drop_pt")
    name, drop = _gated_drop(data, gate)
    if gate.get("gate_on") == "ci" and _is_number(gate.get("ci_high_pt")) and _is_number(limit):
        high = float(gate["ci_high_pt"])
        sign = "≤" if high <= limit else ">"
        text = (
            f"{word}: upper bound of the INT8 top-1 drop's interval {_num(high)} pt {sign} {_num(limit)} pt"
        )
    elif drop is not None and _is_number(limit):
        sign = "≤" if drop <= limit else ">"
        text = f"{word}: INT8 top-1 drop {_num(drop)} pt {sign} {_num(limit)} pt"
    else:
        text = f"{word}: INT8 top-1 drop {NOT_MEASURED} (limit {_num(limit)} pt)"
    if not passed:
        text += f" (exit code {gate.get('exit_code')})"
    blocks: list[Block] = [("verdict", "passed" if passed else "failed", text)]
    details = []
    if name:
        details.append(f"Gated variant: {name}.")
    message = gate.get("message")
    if isinstance(message, str) and message.strip() and message.strip() != text:
        details.append(message.strip())
    if details:
        blocks.append(("p", " ".join(details)))
    return blocks


def _cpu_text(cpu: dict) -> tuple[str, bool]:
    """The CPU line, and whether the CPU lacks VNNI (then the 1.33× note applies)."""
    flags = cpu.get("flags_summary")
    if not isinstance(flags, dict):
        flags = cpu.get("isa") if isinstance(cpu.get("isa"), dict) else None
    head = (
        f"CPU: {cpu.get('model') or 'unknown CPU'} ({cpu.get('arch') or 'unknown arch'}, "
        f"{cpu.get('logical_cores') if cpu.get('logical_cores') is not None else '?'} logical cores)"
    )
    if flags is None:
        return f"{head}; ISA flags {NOT_MEASURED}", False
    parts = []
    for key, label in _FLAG_LABELS:
        if key in flags:
            parts.append(f"{label} {'yes' if flags[key] else 'no'}")
    source = ""
    if cpu.get("flags_source") not in (None, "proc"):
        # RQ_CPU_FLAGS changes rq's decisions, not the instructions onnxruntime ran: say so beside the flags.
        source = f" [flags from {cpu['flags_source']}, not read from the CPU]"
    x86 = str(cpu.get("arch") or "").lower() in ("x86_64", "amd64", "x86", "i686")
    return f"{head}; ISA: {', '.join(parts)}{source}", x86 and flags.get("vnni") is False


def _run_blocks(data: dict) -> list[Block]:
    items = [
        f"Run id: {data.get('run_id', '?')}",
        f"Created: {data.get('created', '?')}",
        f"Command: {data.get('command', '?')}",
        f"rq version: {data.get('rq_version', '?')}",
    ]
    cpu = data.get("cpu")
    if isinstance(cpu, dict):
        line, no_vnni = _cpu_text(cpu)
        items.append(line + (f". {NO_VNNI_NOTE}." if no_vnni else ""))
    else:
        items.append(f"CPU: {NOT_MEASURED}")
    advice = data.get("advice")
    if isinstance(advice, dict):
        items.append(f"INT8 advice: reduce_range={advice.get('reduce_range')} — {advice.get('reason', '')}")
    return [("h2", "Run"), ("list", items)]


def _method_text(drop: dict) -> str:
    method = drop.get("method")
    if method == "exact":
        return "exact McNemar / Clopper–Pearson interval on the discordant images"
    if method == "bootstrap":
        return "paired bootstrap percentile interval"
    return f"{method} interval"


def _agreement_cell(drop: dict | None) -> str:
    """Top-1 agreement with FP32 in percent: from ``agreement_pct``, or from the counts of older reports."""
    if not isinstance(drop, dict):
        return NOT_MEASURED
    if _is_number(drop.get("agreement_pct")):
        return _num(drop["agreement_pct"])
    n, differ = drop.get("n"), drop.get("disagreements")
    if _is_int(n) and _is_int(differ) and n > 0:
        return _num(100.0 * (n - differ) / n)
    return NOT_MEASURED


def _fidelity_blocks(data: dict) -> list[Block]:
    """Label-free fidelity on held-back calibration images (runs without --val)."""
    fid = data.get("fidelity")
    if not isinstance(fid, dict):
        return []
    rows = [
        ["Images", str(fid.get("source", "?"))],
        [
            "Top-1 agreement with FP32",
            f"{_num(fid.get('agreement_pct'))}% [{_num(fid.get('agreement_ci_low_pct'))}, "
            f"{_num(fid.get('agreement_ci_high_pct'))}] ({fid.get('disagreements')} of {fid.get('images')} differ)",
        ],
        ["Logits SQNR", f"{_num(fid.get('logits_sqnr_db'), 1)} dB"],
        ["Softmax KL (mean per image)", f"{_num(fid.get('softmax_kl'), 4)} nats"],
    ]
    return [
        ("h2", "Fidelity to FP32 (label-free)"),
        ("table", ["Measure", "Value"], rows),
        (
            "p",
            "Measured on calibration images that calibration did not use; no labels needed. A top-1 drop can "
            "never exceed the disagreement rate. With --val, rq measures the drop itself.",
        ),
    ]


def _results_blocks(data: dict) -> list[Block]:
    variants = _variants(data)
    if not variants:
        return [("h2", "Results"), ("p", f"No variants: {NOT_MEASURED}.")]
    batches = _all_batches(variants)
    drops = [v["drop"] for v in variants if isinstance(v.get("drop"), dict)]
    confs = {d.get("confidence") for d in drops}
    ci_label = f"{_pct(next(iter(confs)))}% CI" if len(confs) == 1 else "CI"
    headers = [
        "Variant",
        "Kind",
        "Top-1 %",
        "Top-5 %",
        f"Drop pt [{ci_label}]",
        "Agreement %",
        "Disagreements",
    ]
    headers += [f"Speedup b{b}" for b in batches] or ["Speedup"]
    headers += ["Size MB", "Quantized ops", "Pareto"]
    rows = []
    for v in variants:
        is_fp32 = v.get("kind") == "fp32"
        acc = v.get("accuracy") if isinstance(v.get("accuracy"), dict) else {}
        drop = v.get("drop") if isinstance(v.get("drop"), dict) else None
        bench = _bench_of(v)
        row = [
            str(v.get("name", "?")),
            str(v.get("kind", "?")).upper(),
            _num(acc.get("top1")),
            _num(acc.get("top5")),
            "reference" if is_fp32 and drop is None else _drop_cell(drop),
            "—" if is_fp32 and drop is None else _agreement_cell(drop),
            "—" if is_fp32 and drop is None else (str(drop.get("disagreements")) if drop else NOT_MEASURED),
        ]
        if not batches:
            row.append(NOT_MEASURED)
        for b in batches:
            if not bench:
                row.append(NOT_MEASURED)
            elif b in bench:
                row.append(f"{_num(bench[b].get('ratio_to_fp32'))}×")
            else:
                row.append("—")  # this variant was benchmarked, just not at this batch
        ops = v.get("quantized_ops")
        if isinstance(ops, dict):
            ops_text = f"{ops.get('quantized')}/{ops.get('candidates')}"
        else:
            ops_text = "—" if is_fp32 else NOT_MEASURED
        row += [
            _mb(v.get("size_bytes")),
            ops_text,
            ("★" if v.get("pareto") else "") + ("◆" if v.get("pareto_agreement") else ""),
        ]
        rows.append(row)
    blocks: list[Block] = [("h2", "Results"), ("table", headers, rows)]
    if drops:
        d = drops[0]
        blocks.append(
            (
                "p",
                f"Drop = FP32 top-1 − variant top-1 in percentage points (positive: INT8 lost accuracy), on "
                f"the same {d.get('n')} images; interval: {_method_text(d)} at {_pct(d.get('confidence'))}% "
                "confidence. Agreement = share of images where the variant predicts FP32's class; "
                "Disagreements = images where the two models predicted different classes. "
                "★ = on the top-1/speed Pareto front; ◆ = on the agreement/speed Pareto front.",
            )
        )
        significant = [
            str(v.get("name"))
            for v in variants
            if isinstance(v.get("drop"), dict) and v["drop"].get("significant")
        ]
        if significant:
            blocks.append(
                ("p", f"The interval excludes 0 (a real accuracy change) for: {', '.join(significant)}.")
            )
    else:
        blocks.append(("p", f"Accuracy drop: {NOT_MEASURED} (run with --val)."))
    if not batches:
        blocks.append(("p", f"Speed: {NOT_MEASURED} (run with --bench)."))
    else:
        blocks.append(("p", "Speedup = FP32 median latency / variant median latency at that batch size."))
    return blocks


def _bench_blocks(data: dict) -> list[Block]:
    blocks: list[Block] = [("h2", "Benchmark")]
    rows = []
    multi = len(_runtimes_of(_variants(data))) > 1 or any(
        v.get("runtime") not in (None, "ort") for v in _variants(data)
    )
    for v in _variants(data):
        for b, f in sorted(_bench_of(v).items()):
            row = [
                str(v.get("name", "?")),
                str(b),
                _num(f.get("median_ms")),
                _num(f.get("p90_ms")),
                _num(f.get("images_per_s"), 1),
                f"{_num(f.get('ratio_to_fp32'))}×",
            ]
            if multi:
                ort_ratio = f.get("ratio_to_ort_fp32")
                row[1:1] = [str(f.get("runtime", v.get("runtime", "?"))), str(f.get("precision", "?"))]
                row.append(f"{_num(ort_ratio)}×" if _is_number(ort_ratio) else "—")
            rows.append(row)
    bench = data.get("bench")
    if not rows and not isinstance(bench, dict):
        return [*blocks, ("p", f"Latency: {NOT_MEASURED} (run with --bench).")]
    if rows:
        headers = ["Variant", "Batch", "Median ms", "p90 ms", "Images/s", "vs FP32"]
        if multi:
            headers = ["Variant", "Runtime", "Precision", "Batch", "Median ms", "p90 ms", "Images/s"]
            headers += ["vs FP32 (same runtime)", "vs ORT FP32"]
        blocks.append(("table", headers, rows))
    if isinstance(bench, dict):
        context = []
        if bench.get("onnxruntime_version"):
            context.append(f"onnxruntime {bench['onnxruntime_version']}")
        if bench.get("provider"):
            context.append(str(bench["provider"]))
        versions = bench.get("runtime_versions")
        if isinstance(versions, dict) and set(versions) - {"ort"}:
            context.append("runtimes: " + ", ".join(str(x) for x in versions.values()))
        if bench.get("threads") is not None:
            context.append(f"{bench['threads']} intra-op thread(s)")
        if bench.get("runs") is not None:
            context.append(
                f"median of {bench['runs']} interleaved runs per model and batch (+{bench.get('warmup', 0)} warmup)"
            )
        if context:
            blocks.append(("p", "; ".join(context) + "."))
        notes = [str(n) for n in bench.get("notes") or []]
        if notes:
            blocks.append(("list", notes))
    return blocks


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def _recipe_blocks(data: dict) -> list[Block]:
    blocks: list[Block] = [("h2", "Recipes")]
    any_recipe = False
    for v in _variants(data):
        if v.get("kind") != "int8":
            continue
        any_recipe = True
        recipe = v.get("recipe")
        if isinstance(recipe, dict):
            blocks += [("p", f"{v.get('name')}:"), ("code", _json_text(recipe))]
        else:
            blocks.append(("p", f"{v.get('name')}: recipe not recorded."))
    if not any_recipe:
        blocks.append(("p", "No INT8 variants."))
    return blocks


def _skipped_items(skipped: Any) -> list[str]:
    if not isinstance(skipped, list):
        return []
    items = []
    for entry in skipped[:SKIPPED_SHOWN]:
        if isinstance(entry, (list, tuple)) and len(entry) == 2:
            items.append(f"{entry[0]} — {entry[1]}")
        else:
            items.append(str(entry))
    if len(skipped) > SKIPPED_SHOWN:
        items.append(f"… and {len(skipped) - SKIPPED_SHOWN} more")
    return items


def _model_blocks(data: dict) -> list[Block]:
    model = data.get("model")
    blocks: list[Block] = [("h2", "Model")]
    if not isinstance(model, dict):
        return [*blocks, ("p", NOT_MEASURED)]
    prep = model.get("preparation") if isinstance(model.get("preparation"), dict) else {}
    blocks.append(
        (
            "list",
            [
                f"Path: {model.get('path', '?')}",
                f"SHA-256: {model.get('sha256', '?')}",
                f"Size: {_mb(model.get('size_bytes'))} MB",
                f"Preparation time: {_seconds(prep.get('seconds'))}",
            ],
        )
    )
    steps = [str(s) for s in prep.get("steps") or []]
    blocks += [("p", "Preparation steps:"), ("list", steps) if steps else ("p", "none")]
    warnings = [str(w) for w in prep.get("warnings") or []]
    if warnings:
        blocks += [("p", "Preparation warnings:"), ("list", warnings)]
    if isinstance(model.get("signature"), dict) and model["signature"]:
        blocks += [("p", "Signature:"), ("code", _json_text(model["signature"]))]
    return blocks


def _dataset_blocks(data: dict, key: str, title: str) -> list[Block]:
    section = data.get(key)
    blocks: list[Block] = [("h2", title)]
    if not isinstance(section, dict):
        flag = "--calib" if key == "calibration" else "--val"
        return [*blocks, ("p", f"{NOT_MEASURED} (no {flag} folder in this run).")]
    items = [f"Folder: {section.get('folder', '?')}", f"Layout: {section.get('layout', '?')}"]
    if key == "calibration":
        items += [
            f"Images used: {section.get('images_used', '?')}",
            f"File list SHA-256: {section.get('file_list_sha256', '?')}",
        ]
    else:
        overlap = section.get("overlap_with_calibration")
        items += [f"Images: {section.get('images', '?')}", f"Overlap with calibration images: {overlap}"]
        if _is_number(section.get("images_per_s")):
            items.append(f"Evaluation throughput: {_num(section['images_per_s'], 1)} images/s")
        cluster = section.get("cluster")
        if isinstance(cluster, dict):
            nodes = cluster.get("nodes")
            items.append(
                f"Ran on: Ray cluster at {cluster.get('address', '?')}, {nodes} node{'s' if nodes != 1 else ''}, "
                f"{_num(cluster.get('cpus'), 0)} CPUs, {cluster.get('actors', '?')} inference actors"
            )
    items.append(f"Time: {_seconds(section.get('seconds'))}")
    blocks.append(("list", items))
    if (
        key == "validation"
        and _is_int(section.get("overlap_with_calibration"))
        and section["overlap_with_calibration"]
    ):
        blocks.append(
            (
                "p",
                "Warning: some validation images were also used for calibration; accuracy may be optimistic.",
            )
        )
    skipped = section.get("skipped") or []
    if skipped:
        blocks += [("p", f"Skipped files ({len(skipped)}):"), ("list", _skipped_items(skipped))]
    else:
        blocks.append(("p", "Skipped files: none."))
    return blocks


def _stage_blocks(data: dict) -> list[Block]:
    stages = data.get("stages")
    if not isinstance(stages, dict) or not stages:
        return [("h2", "Stage timings"), ("p", NOT_MEASURED)]
    names = [s for s in _STAGES if s in stages] + [s for s in stages if s not in _STAGES]
    rows = [[name, _seconds(stages[name])] for name in names]
    total = sum(float(stages[n]) for n in names if _is_number(stages[n]))
    rows.append(["total", _seconds(total)])
    return [("h2", "Stage timings"), ("table", ["Stage", "Time"], rows)]


def _ops_by_type(ops) -> str:
    """`Conv 53/53, Relu 49/49 fused; FP32: 1 excluded by the user` from a `quantized_ops` dict."""
    if not isinstance(ops, dict) or not isinstance(ops.get("by_type"), dict):
        return ""
    fused = ops.get("fused") if isinstance(ops.get("fused"), dict) else {}
    parts = []
    for kind, counts in sorted(ops["by_type"].items()):
        if isinstance(counts, list) and len(counts) == 2:
            parts.append(f"{kind} {counts[0]}/{counts[1]}" + (" fused" if fused.get(kind) else ""))
        else:
            parts.append(f"{kind} {counts}")
    text = ", ".join(parts)
    fp32 = ops.get("fp32") if isinstance(ops.get("fp32"), dict) else {}
    reasons: dict[str, int] = {}
    for entry in fp32.values():
        if isinstance(entry, list) and len(entry) == 2:
            reasons[str(entry[1])] = reasons.get(str(entry[1]), 0) + 1
    if reasons:
        text += "; FP32: " + ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    return text


def _artifact_blocks(data: dict) -> list[Block]:
    rows = []
    for v in _variants(data):
        ops = v.get("quantized_ops")
        by_type = _ops_by_type(ops)
        rows.append(
            [
                str(v.get("name", "?")),
                str(v.get("path") or "—"),
                str(v.get("sha256") or "—"),
                _mb(v.get("size_bytes")) if v.get("size_bytes") is not None else "—",
                by_type or "—",
            ]
        )
    if not rows:
        return [("h2", "Artifacts"), ("p", "none")]
    return [
        ("h2", "Artifacts"),
        ("table", ["Variant", "Path", "SHA-256", "Size MB", "Quantized by type"], rows),
    ]


def _package_blocks(data: dict) -> list[Block]:
    packages = data.get("packages")
    if not isinstance(packages, dict) or not packages:
        return [("h2", "Packages"), ("p", NOT_MEASURED)]
    rows = [[str(k), str(v) if v is not None else "not installed"] for k, v in sorted(packages.items())]
    return [("h2", "Packages"), ("table", ["Package", "Version"], rows)]


def _tuning_blocks(data: dict) -> list[Block]:
    """Accuracy-aware tuning: every step, what fell back, the drop on the tuning images and the speed it cost."""
    tuning = data.get("tuning")
    if not isinstance(tuning, dict):
        return []
    blocks: list[Block] = [("h2", "Tuning")]
    verdict = "met" if tuning.get("goal_met") else "NOT met"
    blocks.append(
        (
            "p",
            f"Backend {tuning.get('backend', '?')}: goal drop ≤ {_num(tuning.get('max_drop_pt'))} pt on "
            f"{tuning.get('tune_images', '?')} tuning images (FP32 top-1 there "
            f"{_num(tuning.get('fp32_top1_on_tune_images'))}%): goal {verdict}; chosen step "
            f"{tuning.get('chosen_step', '?')}, {len(tuning.get('fallback_nodes') or [])} node(s) kept in FP32.",
        )
    )
    if tuning.get("pool_images"):
        blocks.append(
            (
                "p",
                f"Objective: fidelity to FP32 on {tuning.get('pool_images')} images (the tuning images and "
                f"{tuning.get('holdout_calibration_images', 0)} held-back calibration images, no labels needed); "
                "the images held out for validation were not used to choose. A step meets the goal when the "
                "drop on the tuning images and the drop predicted from the agreement (disagreement rate × "
                f"{_num(tuning.get('loss_per_disagreement'), 3)}, the net loss per disagreement at step 0) "
                "are both within the goal.",
            )
        )
    rows = []
    for step in tuning.get("steps") or []:
        speed = step.get("speed_ratio_to_fp32") or {}
        rows.append(
            [
                str(step.get("step")),
                str(len(step.get("fallback_nodes") or [])),
                str(step.get("added") or "—"),
                _num(step.get("agreement_pct")),
                _num(step.get("softmax_kl"), 4),
                _num(step.get("top1")),
                _num(step.get("drop_pt")),
                _num(step.get("predicted_drop_pt")),
                ", ".join(f"b{b}: {_num(r)}×" for b, r in speed.items()) or NOT_MEASURED,
                str(step.get("error") or ""),
            ]
        )
    if rows:
        headers = ["Step", "FP32 nodes", "Fell back", "Agreement %", "Softmax KL", "Top-1 %", "Drop pt"]
        headers += ["Predicted drop pt", "Speed vs FP32", "Error"]
        blocks.append(("table", headers, rows))
    sensitivity = tuning.get("sensitivity") or []
    if sensitivity:
        worst = ", ".join(
            f"{s.get('node')} ({_num(s.get('added_noise_sqnr_db', s.get('logits_sqnr_db')), 1)} dB)"
            for s in sensitivity[:10]
        )
        blocks.append(("p", f"Most sensitive nodes (SQNR of the noise each adds, one pass): {worst}."))
    notes = [str(n) for n in tuning.get("notes") or []]
    if notes:
        blocks.append(("list", notes))
    return blocks


def _inspection_blocks(data: dict) -> list[Block]:
    """Per-node weight/activation error of an INT8 model, worst first."""
    inspection = data.get("inspection")
    if not isinstance(inspection, dict):
        return []
    nodes = inspection.get("nodes") or []
    blocks: list[Block] = [
        ("h2", "Per-node error"),
        (
            "p",
            f"{len(nodes)} nodes, {inspection.get('images', '?')} images; SQNR in dB (higher is better), "
            "activation = the node's output in the INT8 model vs FP32.",
        ),
    ]
    rows = [
        [
            str(n.get("node")),
            str(n.get("op_type")),
            _num(n.get("weight_sqnr_db"), 1),
            _num(n.get("activation_sqnr_db"), 1),
            _num(n.get("activation_cosine"), 4),
        ]
        for n in nodes
    ]
    if rows:
        blocks.append(("table", ["Node", "Op", "Weight SQNR", "Activation SQNR", "Cosine"], rows))
    return blocks


def _notes_blocks(data: dict) -> list[Block]:
    notes = [str(n) for n in data.get("notes") or []]
    return [("h2", "Notes"), ("list", notes) if notes else ("p", "none")]


def _title(data: dict) -> str:
    return f"rq report: {_model_name(data)} — run {data.get('run_id', '?')}"


def _document(data: dict) -> list[Block]:
    if not isinstance(data, dict):
        raise RqInputError(f"invalid report: expected a JSON object, got {_type_name(data)}")
    return [
        *_gate_blocks(data),
        *_run_blocks(data),
        *_results_blocks(data),
        *_fidelity_blocks(data),
        ("h2", "Accuracy vs speed"),
        ("plot",),
        *_bench_blocks(data),
        *_tuning_blocks(data),
        *_inspection_blocks(data),
        *_recipe_blocks(data),
        *_model_blocks(data),
        *_dataset_blocks(data, "calibration", "Calibration"),
        *_dataset_blocks(data, "validation", "Validation"),
        *_stage_blocks(data),
        *_artifact_blocks(data),
        *_package_blocks(data),
        *_notes_blocks(data),
    ]


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------


def _md(text: str) -> str:
    """Prose text for Markdown: one line, and no raw HTML (a ``<script>`` in a name must stay text)."""
    return " ".join(str(text).split()).replace("<", "&lt;")


def _md_cell(text: str) -> str:
    return _md(text).replace("|", "\\|") or " "


def _md_fence(text: str) -> str:
    # The fence must be longer than any backtick run inside, or a recipe string could close it early.
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def render_markdown(data: dict) -> str:
    """The report as GitHub-flavoured Markdown (the plot itself lives only in the HTML)."""
    out = [f"# {_md(_title(data))}", ""]
    for block in _document(data):
        kind = block[0]
        if kind == "h2":
            out += [f"## {_md(block[1])}", ""]
        elif kind == "p":
            out += [_md(block[1]), ""]
        elif kind == "verdict":
            out += [f"**{_md(block[2])}**", ""]
        elif kind == "list":
            out += [f"- {_md(item)}" for item in block[1]] + [""]
        elif kind == "table":
            headers, rows = block[1], block[2]
            out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
            out.append("|" + "|".join("---" for _ in headers) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("")
        elif kind == "code":
            fence = _md_fence(block[1])
            out += [f"{fence}json", block[1], fence, ""]
        elif kind == "plot":
            text = "The plot is embedded in report.html." if _plot_points(data) else PLOT_MISSING
            out += [_md(text), ""]
    return "\n".join(out).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2330;
       background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem 2rem 3rem; background: #fff; }
h1 { font-size: 1.5rem; margin: 0.5rem 0 1rem; }
h2 { font-size: 1.15rem; margin: 2rem 0 0.6rem; border-bottom: 1px solid #dde1e7; padding-bottom: 0.2rem; }
p, li { line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5rem 0; font-variant-numeric: tabular-nums; font-size: 0.92rem; }
th, td { border: 1px solid #dde1e7; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #eef1f5; }
tr:nth-child(even) td { background: #fafbfc; }
td { overflow-wrap: anywhere; }
pre { background: #f2f4f7; padding: 0.7rem; overflow-x: auto; font-size: 0.85rem; }
.verdict { font-weight: 700; font-size: 1.1rem; padding: 0.6rem 0.9rem; border-radius: 4px; }
.verdict.passed { background: #e3f4e8; color: #155d2b; border: 1px solid #9fd3ae; }
.verdict.failed { background: #fbe6e6; color: #8a1c1c; border: 1px solid #e7a5a5; }
.verdict.none { background: #eef1f5; color: #3b4453; border: 1px solid #d0d6df; }
img.plot { max-width: 100%; height: auto; border: 1px solid #dde1e7; }
.missing { color: #6b7280; font-style: italic; }
"""


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def render_html(data: dict) -> str:
    """The report as one self-contained HTML page: inline CSS, the plot as a base64 PNG data URI."""
    title = _title(data)
    body = [f"<h1>{_h(title)}</h1>"]
    for block in _document(data):
        kind = block[0]
        if kind == "h2":
            body.append(f"<h2>{_h(block[1])}</h2>")
        elif kind == "p":
            body.append(f"<p>{_h(block[1])}</p>")
        elif kind == "verdict":
            body.append(f'<p class="verdict {_h(block[1])}">{_h(block[2])}</p>')
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_h(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_h(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_h(c)}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "code":
            body.append(f"<pre><code>{_h(block[1])}</code></pre>")
        elif kind == "plot":
            png = plot_accuracy_vs_speed(data)
            if png is None:
                body.append(f'<p class="missing">{_h(PLOT_MISSING)}</p>')
            else:
                b64 = base64.b64encode(png).decode("ascii")
                body.append(
                    f'<img class="plot" alt="top-1 accuracy versus speedup over FP32" '
                    f'src="data:image/png;base64,{b64}">'
                )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_h(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------------------


def _runtimes_of(variants: list[dict]) -> list[str]:
    seen: list[str] = []
    for v in variants:
        rt = v.get("runtime")
        if isinstance(rt, str) and rt not in seen:
            seen.append(rt)
    return seen


def _plot_points(data: dict) -> tuple[int, list[tuple[str, str, float, float, bool]]] | None:
    """(batch, [(name, kind, speedup, top-1, on_front)]) for the plot, or None when there is nothing to show.

    The batch is the largest one at which some INT8 variant has both accuracy and a speed ratio. FP32 sits
    at x = 1 by definition. Pareto flags come from the report when it has them (so the plot agrees with
    the table), else are computed here over the plotted points. With several runtimes, x is the speedup
    against ONNX Runtime's FP32 (``ratio_to_ort_fp32``) when measured, so the runtimes share one axis.
    """
    variants = _variants(data)
    key = "ratio_to_ort_fp32" if len(_runtimes_of(variants)) > 1 and "ort" in _runtimes_of(variants) else None
    candidates = [
        b
        for v in variants
        if v.get("kind") == "int8" and _top1(v) is not None
        for b, f in _bench_of(v).items()
        if _is_number(f.get("ratio_to_fp32"))
    ]
    if not candidates:
        return None
    batch = max(candidates)
    points: list[tuple[str, str, float, float, bool | None]] = []
    for v in variants:
        top1 = _top1(v)
        if top1 is None:
            continue
        f = _bench_of(v).get(batch)
        if key and f is not None and _is_number(f.get(key)):
            x = float(f[key])
        elif v.get("kind") == "fp32":
            x = 1.0
        else:
            if f is None or not _is_number(f.get("ratio_to_fp32")):
                continue
            x = float(f["ratio_to_fp32"])
        flag = v.get("pareto")
        points.append(
            (str(v.get("name", "?")), str(v.get("kind")), x, top1, flag if isinstance(flag, bool) else None)
        )
    if all(p[4] is None for p in points):
        front = set(pareto_front([(p[2], p[3]) for p in points]))
        return batch, [(n, k, x, y, i in front) for i, (n, k, x, y, _f) in enumerate(points)]
    return batch, [(n, k, x, y, bool(f)) for n, k, x, y, f in points]


def _mpl_text(text: str) -> str:
    # A "$" in a variant name would switch matplotlib into mathtext (and may raise on parse errors).
    return text.replace("$", r"\$")


def plot_accuracy_vs_speed(data: dict) -> bytes | None:
    """PNG of top-1 (%) against speedup over FP32 at the largest benchmarked batch, or None.

    Every variant with accuracy and a speed figure at that batch is a labelled point (FP32 at x = 1);
    Pareto-front points are highlighted and joined. None when no INT8 variant has both accuracy and
    benchmark figures. Uses ``matplotlib.figure.Figure`` with an explicit Agg canvas — never pyplot — so
    the global backend and pyplot's figure registry of the calling program are left untouched.
    """
    found = _plot_points(data)
    if found is None:
        return None
    batch, points = found
    # Imported here: matplotlib takes a noticeable fraction of a second to import, and only this needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(7.5, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axvline(1.0, color="#9aa3ad", linestyle=":", linewidth=1, zorder=1)
    front = sorted((p for p in points if p[4]), key=lambda p: (p[2], -p[3]))
    if len(front) > 1:
        ax.plot([p[2] for p in front], [p[3] for p in front], color="#c0392b", linewidth=1.5, zorder=2)
    xs = [p[2] for p in points]
    x_mid = (min(xs) + max(xs)) / 2
    for name, kind, x, y, on_front in points:
        ax.scatter(
            [x],
            [y],
            s=70 if on_front else 45,
            marker="s" if kind == "fp32" else "o",
            color="#c0392b" if on_front else "#7f8c8d",
            edgecolors="black" if on_front else "none",
            linewidths=0.6,
            zorder=3,
        )
        # Labels point inwards: text is not counted by autoscaling, so an outward label at the
        # rightmost point would be cut off by the axes edge.
        right_half = len(points) > 1 and x > x_mid
        ax.annotate(
            _mpl_text(name),
            (x, y),
            xytext=(-6 if right_half else 6, 6),
            textcoords="offset points",
            ha="right" if right_half else "left",
            fontsize=8,
            color="#1d2330",
        )
    # Several runtimes: each is its own series, its variants joined in a colour of its own.
    runtimes = _runtimes_of(_variants(data))
    series_handles = []
    if len(runtimes) > 1:
        by_name = {p[0]: p for p in points}
        palette = ["#2471a3", "#27ae60", "#8e44ad", "#d35400"]
        for i, rt in enumerate(runtimes):
            members = [
                by_name[str(v.get("name"))]
                for v in _variants(data)
                if v.get("runtime") == rt and str(v.get("name")) in by_name
            ]
            if not members:
                continue
            members.sort(key=lambda p: p[2])
            color = palette[i % len(palette)]
            ax.plot(
                [p[2] for p in members],
                [p[3] for p in members],
                color=color,
                linestyle="--",
                linewidth=1,
                zorder=2,
            )
            series_handles.append(Line2D([], [], color=color, linestyle="--", label=_mpl_text(rt)))
    # Proxy artists: one legend entry per meaning, not per point.
    handles = [
        *series_handles,
        Line2D([], [], color="#c0392b", marker="o", markeredgecolor="black", label="Pareto front"),
        Line2D([], [], color="#7f8c8d", marker="o", linestyle="none", label="dominated"),
        Line2D([], [], color="#555555", marker="s", linestyle="none", label="FP32 (x = 1)"),
    ]
    versus = "ONNX Runtime FP32" if len(runtimes) > 1 and "ort" in runtimes else "FP32"
    ax.set_xlabel(f"speedup vs {versus} at batch {batch} (×, FP32 median / variant median)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(_mpl_text(f"{_model_name(data)}: accuracy vs speed"), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.2)
    ax.legend(handles=handles, loc="best", fontsize=8)
    buf = io.BytesIO()
    # No "Software" metadata: identical reports then give identical PNG bytes across matplotlib versions.
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
