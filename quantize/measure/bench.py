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
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from calibration.errors import RqInputError
from calibration.progress import NO_PROGRESS, Progress
from quantize.exits import ort_reason
from quantize.measure import runtimes as runtimes_mod
from quantize.measure.cpu import CpuInfo, detect_cpu, int8_speedup_note, physical_core_count
from quantize.measure.stats import speed_ratio_interval

logger = logging.getLogger(__name__)

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
    ratio_to_first: float  # first model's median / this median, same runtime and batch: > 1 means faster
    samples_ms: list[float] = field(default_factory=list)  # every timed run, in execution order
    runtime: str = "ort"
    precision: str = "f32"  # what the runtime computed in ("f32", "int8+f32", …)
    ratio_to_ort_first: float | None = None  # ORT's median of the first model / this median (None: no ORT)
    # Median CPU time of the whole process per run (all threads): the work done, which — unlike wall time —
    # does not grow when a shared machine preempts the run. Spinning threads count here too.
    cpu_median_ms: float | None = None
    # 95% bootstrap interval of ratio_to_first over this run's rounds (None: model #1 itself, or too few runs)
    ratio_interval: tuple[float, float] | None = None

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
            "runtime": self.runtime,
            "precision": self.precision,
            "ratio_to_ort_first": self.ratio_to_ort_first,
            "cpu_median_ms": self.cpu_median_ms,
            "ratio_interval": list(self.ratio_interval) if self.ratio_interval else None,
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
    # (model_index, batch, runtime) of every *timed* call in execution order (warmup excluded), so the
    # interleaving can be checked after the fact.
    order: list[tuple[int, int, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    session_config: dict[str, str] = field(default_factory=dict)
    runtimes: list[str] = field(default_factory=lambda: ["ort"])
    runtime_versions: dict[str, str] = field(default_factory=dict)
    # (model_index, runtime, one-line reason) of every model a runtime could not open or run: no rows for it.
    errors: list[tuple[int, str, str]] = field(default_factory=list)

    def row(self, model_index: int, batch: int, runtime: str | None = None) -> BenchRow:
        """The row of one model at one batch size in `runtime` (default: the first) (KeyError if not run)."""
        runtime = runtime or self.runtimes[0]
        for r in self.rows:
            if r.model_index == model_index and r.batch == batch and r.runtime == runtime:
                return r
        raise KeyError((model_index, batch, runtime))

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
            "order": [[i, b, rt] for i, b, rt in self.order],
            "notes": list(self.notes),
            "session_config": dict(self.session_config),
            "runtimes": list(self.runtimes),
            "runtime_versions": dict(self.runtime_versions),
            "errors": [[i, r, why] for i, r, why in self.errors],
        }

    def render_table(self):
        """A rich Table: one line per model × batch, with CPU/ISA/onnxruntime context in the caption."""
        from rich.table import Table
        from rich.text import Text

        cpu = CpuInfo.from_dict(self.cpu)
        table = Table(
            title=(
                f"Latency in ms — median of {self.runs} interleaved runs per model (+{self.warmup} warmup); "
                "vs #1 > 1 means faster than model #1; 95% CI of vs #1: bootstrap over this run's rounds (another "
                "run, under other load, can move it further)"
            ),
            title_justify="left",
            caption_justify="left",
        )
        multi = self.runtimes != ["ort"]
        table.add_column("#", justify="right", no_wrap=True)
        # File names are the one thing worth wrapping: an ellipsis would hide the INT8/FP32 suffix.
        table.add_column("model", overflow="fold", min_width=12)
        if multi:
            table.add_column("runtime", no_wrap=True)
            table.add_column("precision", no_wrap=True)
        headers = ["batch", "median", "p90", "mean", "min", "cpu", "img/s", "vs #1", "95% CI"]
        with_ort = multi and "ort" in self.runtimes
        if with_ort:
            headers.append("vs #1 ort")
        for header in headers:
            table.add_column(header, justify="right", no_wrap=True)
        for r in self.rows:
            cells = [str(r.model_index + 1), Text(r.name)]  # Text: a "[...]" in a file name is not markup
            if multi:
                cells += [r.runtime, r.precision]
            cells += [
                str(r.batch),
                f"{r.median_ms:.2f}",
                f"{r.p90_ms:.2f}",
                f"{r.mean_ms:.2f}",
                f"{r.min_ms:.2f}",
                "—" if r.cpu_median_ms is None else f"{r.cpu_median_ms:.1f}",
                f"{r.images_per_s:.1f}",
                f"{r.ratio_to_first:.2f}×",
                "—" if r.ratio_interval is None else f"{r.ratio_interval[0]:.2f}–{r.ratio_interval[1]:.2f}",
            ]
            if with_ort:
                cells.append("—" if r.ratio_to_ort_first is None else f"{r.ratio_to_ort_first:.2f}×")
            table.add_row(*cells)
        caption = [
            "cpu = median CPU time of the process per run (all threads; not inflated by preemption)",
            f"CPU: {self.cpu.get('describe') or cpu.describe()}",
            f"onnxruntime {self.onnxruntime_version}, {self.provider}, {self.threads} intra-op thread(s)"
            if "ort" in self.runtimes or not self.runtimes
            else f"{', '.join(self.runtime_versions.get(rt, rt) for rt in self.runtimes)}, "
            f"{self.threads} thread(s)",
        ]
        if multi:
            caption.append(
                "runtimes: "
                + ", ".join(self.runtime_versions.get(rt, rt) for rt in self.runtimes)
                + "; vs #1: against model #1 in the same runtime"
                + ("; vs #1 ort: against model #1 in onnxruntime" if with_ort else "")
            )
        for i, runtime, why in self.errors:
            caption.append(f"#{i + 1} in {runtime}: not measured, {why}")
        if not cpu.has_vnni:
            note = int8_speedup_note(cpu)
            if note:
                caption.append(note)
        caption.extend(self.notes)
        table.caption = Text("\n".join(caption))  # plain text: "[flags from …]" must not parse as markup
        return table


def _fmt_shape(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


#: The ORT session options that decide how its thread pool waits (what `rq bench` records, read back).
SPINNING_ENTRIES = ("session.intra_op.allow_spinning", "session.force_spinning_stop")


def ort_session_config(session) -> dict[str, str]:
    """The spinning entries as the ORT session holds them (read back, not restated from what was asked)."""
    options = session.session.get_session_options()
    config = {}
    for key in SPINNING_ENTRIES:
        try:
            config[key] = options.get_session_config_entry(key)
        except RuntimeError:  # ORT raises for an entry never set: the session runs with ORT's default
            config[key] = "unset (onnxruntime's default)"
    return config


def _open(runtime, path: Path, threads: int, allow_spinning: bool):
    runtimes_mod.check_model_file(path, f"cannot load {path} in {runtime.label}: no such file")
    try:
        return runtime.open(path, threads, allow_spinning=allow_spinning)
    except RqInputError:
        raise
    except Exception as e:  # a runtime's own exception types
        raise RqInputError(f"cannot load {path} in {runtime.label}: {ort_reason(e)}") from e


def _check_input(path: Path, sess, image_shape: Sequence[int] | None = None) -> list[int | str | None]:
    """The input shape to feed: the model's, with its free non-batch dims taken from `image_shape` (C, H, W or
    H, W, C as the model lays them out) when given."""
    if sess.input_type != "tensor(float)":
        raise RqInputError(
            f"{path}: input {sess.input_name!r} is {sess.input_type}; rq benchmarks float32-input models"
        )
    shape = list(sess.input_shape)
    if not shape:
        raise RqInputError(f"{path}: input {sess.input_name!r} is a scalar; rq needs a batched tensor input")
    rest = shape[1:]
    if image_shape is not None:
        if len(image_shape) != len(rest):
            raise RqInputError(
                f"{path}: --input-shape gives {len(image_shape)} dimensions, input {sess.input_name!r} has "
                f"{len(rest)} besides the batch ({_fmt_shape(shape)})"
            )
        clash = [
            (d, g) for d, g in zip(rest, image_shape, strict=True) if isinstance(d, int) and d > 0 and d != g
        ]
        if clash:
            raise RqInputError(
                f"{path}: input {sess.input_name!r} has shape {_fmt_shape(shape)}; --input-shape "
                f"{','.join(map(str, image_shape))} contradicts its fixed dimensions"
            )
        return [shape[0], *image_shape]
    if any(not isinstance(d, int) or d <= 0 for d in rest):
        raise RqInputError(
            f"{path}: input {sess.input_name!r} has shape {_fmt_shape(shape)}; "
            "give the size to benchmark with --input-shape (e.g. 3,224,224)"
        )
    return shape


def _run(sess, x: np.ndarray, path: Path, batch: int, label: str, cpu: list[int] | None = None) -> int:
    """One inference; returns its duration in ns (its process CPU time appended to `cpu`). Runtime failures
    become one-line RqInputErrors."""
    try:
        c0 = time.process_time_ns()
        t0 = time.perf_counter_ns()
        sess.run(x)
        t1 = time.perf_counter_ns()
        c1 = time.process_time_ns()
    except RqInputError:
        raise
    except Exception as e:
        raise RqInputError(f"{path} failed to run in {label} at batch {batch}: {ort_reason(e)}") from e
    if cpu is not None:
        cpu.append(c1 - c0)
    return t1 - t0


@dataclass
class _Unit:
    """One model opened in one runtime."""

    index: int
    path: Path
    runtime: str
    label: str
    session: object
    shape: list


def bench_models(
    model_paths: Sequence[Path],
    batch_sizes: Sequence[int] = (1, 8),
    threads: int | None = None,
    runs: int = 20,
    warmup: int = 3,
    seed: int = 0,
    *,
    progress: Progress | None = None,
    allow_spinning: bool = False,
    cpu: CpuInfo | None = None,
    runtimes: Sequence[str] = ("ort",),
    image_shape: Sequence[int] | None = None,
) -> BenchResult:
    """Time every model at every batch size in every runtime, interleaved, and return the statistics.

    ``image_shape``: the non-batch input dims to feed a model whose input leaves them free (dynamic H/W).

    Each model is opened in each runtime of ``runtimes`` (see quantize.measure.runtimes; ORT: CPU provider, all graph
    optimizations, ``threads`` intra-op threads — default: physical cores —, one inter-op thread, workers
    spinning during a run and stopping when it returns; ``allow_spinning``: ORT's default, spinning on). All
    models must take one float32 input of the same shape apart from the batch dim. Per batch size: ``warmup`` untimed runs per model and runtime, then ``runs`` rounds that run every (runtime, model)
    once in the given order. ``ratio_to_first`` compares each model with the first one *in the same
    runtime*; ``ratio_to_ort_first`` with the first one in ORT (when ORT is among the runtimes). A runtime
    that cannot open or run the first model is an error; one that cannot open or run a later model (and is
    not ORT) gives no rows for it and a one-line reason in ``errors``. ``cpu`` overrides host detection.
    ``progress`` (calibration.progress): a ``note`` per model loaded, then per batch size a ``stage``,
    ``total(runs)`` and an ``advance`` per timed round.
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
    runtime_names = runtimes_mod.parse(list(runtimes))
    chosen = [runtimes_mod.get(name) for name in runtime_names]
    versions = {rt.name: rt.version() for rt in chosen}  # a missing extra fails here, before any work

    import onnxruntime as ort

    progress = progress or NO_PROGRESS
    cpu = cpu or detect_cpu()
    n_threads = threads or physical_core_count(cpu)

    # A file that is no model is bad input whatever the runtime; a runtime that cannot read a model (after the
    # first) only loses that model's rows.
    runtimes_mod.check_model_files(paths)
    units: list[_Unit] = []
    errors: list[tuple[int, str, str]] = []
    reference_shape: list | None = None
    for rt in chosen:
        for i, p in enumerate(paths):
            logger.debug("bench: loading %s in %s (%d threads)", p, rt.label, n_threads)
            progress.note(f"loading {p.name} in {rt.label}")
            try:
                sess = _open(rt, p, n_threads, allow_spinning)
            except RqInputError as exc:
                if i == 0 or rt.name == "ort":
                    raise
                errors.append((i, rt.name, str(exc)))
                continue
            shape = _check_input(p, sess, image_shape)
            if reference_shape is not None and shape[1:] != reference_shape[1:]:
                raise RqInputError(
                    f"input shapes differ: {paths[0]} takes {_fmt_shape(reference_shape)} but {p} takes "
                    f"{_fmt_shape(shape)} (the batch dimension is ignored)"
                )
            reference_shape = reference_shape or shape
            units.append(_Unit(i, p, rt.name, rt.label, sess, shape))

    notes: list[str] = []
    plan: list[int] = []
    for b in batches:
        fixed = [(u.path, u.shape[0]) for u in units if isinstance(u.shape[0], int) and u.shape[0] != b]
        if fixed:
            p, d = fixed[0]
            notes.append(f"batch {b} skipped: {p.name} has a fixed batch dimension of {d}")
        else:
            plan.append(b)
    if not plan:
        raise RqInputError(f"no requested batch size can run: {'; '.join(notes)}")

    rest = [int(d) for d in reference_shape[1:]]  # validated as positive ints by _check_input
    ort_units = [u for u in units if u.runtime == "ort"]
    result = BenchResult(
        cpu=cpu.to_dict(),
        onnxruntime_version=ort.__version__,
        provider=ort_units[0].session.device if ort_units else units[0].session.device,
        threads=n_threads,
        runs=runs,
        warmup=warmup,
        models=[str(p) for p in paths],
        input_shape=["N", *rest],
        batch_sizes=plan,
        notes=notes,
        session_config=ort_session_config(ort_units[0].session) if ort_units else {},
        runtimes=runtime_names,
        runtime_versions=versions,
        errors=errors,
    )

    def failed(unit: _Unit, exc: RqInputError) -> None:
        if unit.index == 0 or unit.runtime == "ort":
            raise exc
        result.errors.append((unit.index, unit.runtime, str(exc)))
        units.remove(unit)

    for b in plan:
        # The same seeded tensor for every model (and for every rerun), so differences are the models'.
        x = np.random.default_rng(seed).standard_normal((b, *rest), dtype=np.float32)
        progress.stage(f"bench batch {b}")
        progress.note(f"batch {b}: warmup ({warmup} per model)")
        progress.total(runs)
        for u in list(units):
            try:  # at least one untimed run: an OpenVINO session compiles for the batch size on first use
                for _ in range(max(warmup, 1 if u.runtime != "ort" else 0)):
                    _run(u.session, x, u.path, b, u.label)
            except RqInputError as exc:
                failed(u, exc)
        samples: dict[int, list[int]] = {id(u): [] for u in units}
        cpu_ns: dict[int, list[int]] = {id(u): [] for u in units}
        # A GC pass landing inside one model's call would charge that model for garbage made by all.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for _round in range(runs):
                for u in list(units):
                    try:
                        samples[id(u)].append(_run(u.session, x, u.path, b, u.label, cpu_ns[id(u)]))
                    except RqInputError as exc:
                        failed(u, exc)
                        continue
                    result.order.append((u.index, b, u.runtime))
                progress.advance(1)
        finally:
            if gc_was_enabled:
                gc.enable()

        timed = {(u.runtime, u.index): np.asarray(samples[id(u)], dtype=np.float64) / 1e6 for u in units}
        medians = {key: float(np.percentile(ms, 50, method="linear")) for key, ms in timed.items()}
        for u in units:
            ms = timed[(u.runtime, u.index)]
            median = medians[(u.runtime, u.index)]
            first = medians.get((u.runtime, 0))
            ort_first = medians.get(("ort", 0))
            result.rows.append(
                BenchRow(
                    model=str(u.path),
                    name=u.path.name,
                    model_index=u.index,
                    batch=b,
                    median_ms=median,
                    p90_ms=float(np.percentile(ms, 90, method="linear")),
                    mean_ms=float(ms.mean()),
                    min_ms=float(ms.min()),
                    images_per_s=b / (median / 1e3) if median > 0 else float("inf"),
                    ratio_to_first=first / median if first and median > 0 else float("inf"),
                    samples_ms=[float(v) for v in ms],
                    runtime=u.runtime,
                    precision=u.session.precision,
                    ratio_to_ort_first=(ort_first / median if ort_first and median > 0 else None),
                    cpu_median_ms=float(np.median(cpu_ns[id(u)])) / 1e6 if cpu_ns[id(u)] else None,
                    # Element k of both lists ran in round k (model #1 never drops out: its failure ends
                    # the run), so the interval can resample rounds as wholes.
                    ratio_interval=(
                        speed_ratio_interval(timed[(u.runtime, 0)], ms) if u.index != 0 else None
                    ),
                )
            )
    return result
