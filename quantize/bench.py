"""Latency/throughput benchmark of ONNX classifiers in onnxruntime, with interleaved runs.

Several models (typically FP32 and its INT8 version) are timed *interleaved*: each round runs every model
once, in order A B C …, so slow drift of the machine (thermal/turbo state, a noisy neighbour on a shared
VM, background jobs) hits every model alike instead of biasing whichever model happened to run during the
bad minute. Medians are the primary figure because latency distributions have a long right tail.

Only the ``session.run`` call is timed (``time.perf_counter_ns``); the input tensor is built once per batch
size, from a seeded generator, and shared by all models.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration.errors import RqInputError
from quantize.cpu import CpuInfo, detect_cpu, int8_speedup_note, physical_core_count
from quantize.exits import ORT_LOG_SEVERITY, ort_reason

PROVIDER = "CPUExecutionProvider"


@dataclass
class BenchRow:
    """Timing statistics of one model at one batch size (all times in milliseconds)."""

    model: str  # the path as given
    name: str  # file name, for tables
    model_index: int  # position in the model list (0 = the reference model)
    batch: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    images_per_s: float  # batch / median seconds
    ratio_to_first: float  # first model's median / this median at the same batch: > 1 means faster
    samples_ms: list[float] = field(default_factory=list)  # every timed run, in execution order

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "name": self.name,
            "model_index": self.model_index,
            "batch": self.batch,
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "mean_ms": self.mean_ms,
            "min_ms": self.min_ms,
            "images_per_s": self.images_per_s,
            "ratio_to_first": self.ratio_to_first,
            "samples_ms": list(self.samples_ms),
        }


@dataclass
class BenchResult:
    """Everything :func:`bench_models` measured, plus the context needed to interpret it."""

    cpu: dict  # CpuInfo.to_dict()
    onnxruntime_version: str
    provider: str
    threads: int  # intra-op threads per session
    runs: int  # timed runs per model per batch size
    warmup: int = 0
    models: list[str] = field(default_factory=list)
    input_shape: list[int | str] = field(default_factory=list)  # batch dim shown as "N"
    batch_sizes: list[int] = field(default_factory=list)  # the batch sizes actually run
    rows: list[BenchRow] = field(default_factory=list)
    # (model_index, batch) of every *timed* call in execution order (warmup excluded), so the
    # interleaving can be checked after the fact.
    order: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    session_config: dict[str, str] = field(default_factory=dict)

    def row(self, model_index: int, batch: int) -> BenchRow:
        """The row of one model at one batch size (KeyError if it was not run)."""
        for r in self.rows:
            if r.model_index == model_index and r.batch == batch:
                return r
        raise KeyError((model_index, batch))

    def to_dict(self) -> dict:
        return {
            "cpu": self.cpu,
            "onnxruntime_version": self.onnxruntime_version,
            "provider": self.provider,
            "threads": self.threads,
            "runs": self.runs,
            "warmup": self.warmup,
            "models": list(self.models),
            "input_shape": list(self.input_shape),
            "batch_sizes": list(self.batch_sizes),
            "rows": [r.to_dict() for r in self.rows],
            "order": [[i, b] for i, b in self.order],
            "notes": list(self.notes),
            "session_config": dict(self.session_config),
        }

    def render_table(self):
        """A rich Table: one line per model × batch, with CPU/ISA/onnxruntime context in the caption."""
        from rich.table import Table
        from rich.text import Text

        cpu = CpuInfo.from_dict(self.cpu)
        table = Table(
            title=(
                f"Latency in ms — median of {self.runs} interleaved runs per model (+{self.warmup} warmup); "
                "vs #1 > 1 means faster than model #1"
            ),
            title_justify="left",
            caption_justify="left",
        )
        table.add_column("#", justify="right", no_wrap=True)
        # File names are the one thing worth wrapping: an ellipsis would hide the INT8/FP32 suffix.
        table.add_column("model", overflow="fold", min_width=12)
        for header in ("batch", "median", "p90", "mean", "min", "img/s", "vs #1"):
            table.add_column(header, justify="right", no_wrap=True)
        for r in self.rows:
            table.add_row(
                str(r.model_index + 1),
                Text(r.name),  # Text, not a str: a "[...]" in a file name is not rich markup
                str(r.batch),
                f"{r.median_ms:.2f}",
                f"{r.p90_ms:.2f}",
                f"{r.mean_ms:.2f}",
                f"{r.min_ms:.2f}",
                f"{r.images_per_s:.1f}",
                f"{r.ratio_to_first:.2f}×",
            )
        caption = [
            f"CPU: {self.cpu.get('describe') or cpu.describe()}",
            f"onnxruntime {self.onnxruntime_version}, {self.provider}, {self.threads} intra-op thread(s)",
        ]
        if not cpu.has_vnni:
            note = int8_speedup_note(cpu)
            if note:
                caption.append(note)
        caption.extend(self.notes)
        table.caption = Text("\n".join(caption))  # plain text: "[flags from …]" must not parse as markup
        return table


def _first_line(exc: BaseException) -> str:
    """ORT's message on one plain line, without its ``[ONNXRuntimeError] : N : CODE :`` prefix."""
    return ort_reason(exc)


def _fmt_shape(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _load_session(path: Path, threads: int, allow_spinning: bool):
    import onnxruntime as ort

    if not path.is_file():
        raise RqInputError(f"cannot load {path} in onnxruntime: no such file")
    if path.stat().st_size == 0:
        raise RqInputError(f"{path} is an empty file (0 bytes), not an ONNX model")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Each session owns a thread pool. With spinning on, the pool of the model that just ran keeps its
    # workers busy-waiting while the *next* model in the round runs, stealing cores from it; interleaving
    # makes that systematic, so spinning is off by default (it also matches no-spin production configs).
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    so.log_severity_level = ORT_LOG_SEVERITY  # ORT's log lines (warnings, coloured errors) would interleave
    try:
        sess = ort.InferenceSession(str(path), sess_options=so, providers=[PROVIDER])
    except Exception as e:  # ORT raises its own pybind exception types, not one base class
        raise RqInputError(f"cannot load {path} in onnxruntime: {_first_line(e)}") from e
    return sess


def _check_input(path: Path, sess) -> tuple[str, list[int | str | None]]:
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise RqInputError(
            f"{path} has {len(inputs)} inputs ({names}); rq benchmarks single-input image classifiers"
        )
    inp = inputs[0]
    if inp.type != "tensor(float)":
        raise RqInputError(f"{path}: input {inp.name!r} is {inp.type}; rq benchmarks float32-input models")
    shape = list(inp.shape)
    if not shape:
        raise RqInputError(f"{path}: input {inp.name!r} is a scalar; rq needs a batched tensor input")
    rest = shape[1:]
    if any(not isinstance(d, int) or d <= 0 for d in rest):
        raise RqInputError(
            f"{path}: input {inp.name!r} has shape {_fmt_shape(shape)}; "
            "all dimensions but the batch must be fixed to benchmark it"
        )
    return inp.name, shape


def _run(sess, feed: dict, path: Path, batch: int) -> int:
    """One inference; returns its duration in ns. Runtime failures become one-line RqInputErrors."""
    try:
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        t1 = time.perf_counter_ns()
    except Exception as e:
        raise RqInputError(f"{path} failed to run in onnxruntime at batch {batch}: {_first_line(e)}") from e
    return t1 - t0


def bench_models(
    model_paths: Sequence[Path],
    batch_sizes: Sequence[int] = (1, 8),
    threads: int | None = None,
    runs: int = 20,
    warmup: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    *,
    allow_spinning: bool = False,
    cpu: CpuInfo | None = None,
) -> BenchResult:
    """Time every model at every batch size, interleaved, and return the statistics.

    Each model gets an onnxruntime CPU session (all graph optimizations, ``threads`` intra-op threads,
    default: physical cores; one inter-op thread). All models must take one float32 input of the same
    shape apart from the batch dim. Per batch size: ``warmup`` untimed runs per model, then ``runs``
    rounds that run every model once in the given order. ``ratio_to_first`` compares each model with the
    first one (> 1: faster than the first). ``cpu`` overrides host detection (for reports and tests).
    """
    paths = [Path(p) for p in model_paths]
    if not paths:
        raise RqInputError("no models to benchmark")
    batches: list[int] = []
    for b in batch_sizes:
        if int(b) < 1:
            raise RqInputError("--batch must be ≥ 1")
        if int(b) not in batches:
            batches.append(int(b))
    if not batches:
        raise RqInputError("--batch needs at least one batch size")
    if runs < 1:
        raise RqInputError("--runs must be ≥ 1")
    if warmup < 0:
        raise RqInputError("--warmup must be ≥ 0")
    if threads is not None and threads < 1:
        raise RqInputError("--threads must be ≥ 1")

    import onnxruntime as ort

    def say(msg: str) -> None:
        if progress is not None:
            progress(msg)

    cpu = cpu or detect_cpu()
    n_threads = threads or physical_core_count(cpu)

    sessions = []
    input_names: list[str] = []
    shapes: list[list[int | str | None]] = []
    for p in paths:
        say(f"loading {p.name}")
        sess = _load_session(p, n_threads, allow_spinning)
        name, shape = _check_input(p, sess)
        if shapes and shape[1:] != shapes[0][1:]:
            raise RqInputError(
                f"input shapes differ: {paths[0]} takes {_fmt_shape(shapes[0])} but {p} takes "
                f"{_fmt_shape(shape)} (the batch dimension is ignored)"
            )
        sessions.append(sess)
        input_names.append(name)
        shapes.append(shape)

    notes: list[str] = []
    plan: list[int] = []
    for b in batches:
        fixed = [(paths[i], s[0]) for i, s in enumerate(shapes) if isinstance(s[0], int) and s[0] != b]
        if fixed:
            p, d = fixed[0]
            notes.append(f"batch {b} skipped: {p.name} has a fixed batch dimension of {d}")
        else:
            plan.append(b)
    if not plan:
        raise RqInputError(f"no requested batch size can run: {'; '.join(notes)}")

    rest = [int(d) for d in shapes[0][1:]]  # validated as positive ints by _check_input
    result = BenchResult(
        cpu=cpu.to_dict(),
        onnxruntime_version=ort.__version__,
        provider=sessions[0].get_providers()[0],
        threads=n_threads,
        runs=runs,
        warmup=warmup,
        models=[str(p) for p in paths],
        input_shape=["N", *rest],
        batch_sizes=plan,
        notes=notes,
        session_config={"session.intra_op.allow_spinning": "1" if allow_spinning else "0"},
    )

    for b in plan:
        # The same seeded tensor for every model (and for every rerun), so differences are the models'.
        x = np.random.default_rng(seed).standard_normal((b, *rest), dtype=np.float32)
        feeds = [{name: x} for name in input_names]
        say(f"batch {b}: warmup ({warmup} per model)")
        for _ in range(warmup):
            for i, sess in enumerate(sessions):
                _run(sess, feeds[i], paths[i], b)
        samples: list[list[int]] = [[] for _ in sessions]
        # A GC pass landing inside one model's call would charge that model for garbage made by all.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for r in range(runs):
                for i, sess in enumerate(sessions):
                    samples[i].append(_run(sess, feeds[i], paths[i], b))
                    result.order.append((i, b))
                say(f"batch {b}: round {r + 1}/{runs}")
        finally:
            if gc_was_enabled:
                gc.enable()

        medians: list[float] = []
        for i, ns in enumerate(samples):
            ms = np.asarray(ns, dtype=np.float64) / 1e6
            median = float(np.percentile(ms, 50, method="linear"))
            medians.append(median)
            result.rows.append(
                BenchRow(
                    model=str(paths[i]),
                    name=paths[i].name,
                    model_index=i,
                    batch=b,
                    median_ms=median,
                    p90_ms=float(np.percentile(ms, 90, method="linear")),
                    mean_ms=float(ms.mean()),
                    min_ms=float(ms.min()),
                    images_per_s=b / (median / 1e3) if median > 0 else float("inf"),
                    ratio_to_first=medians[0] / median if median > 0 else float("inf"),
                    samples_ms=[float(v) for v in ms],
                )
            )
    return result
