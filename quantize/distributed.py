"""Validation on a Ray cluster through Ray Data (the `ray` extra; `--ray [auto|local|ADDRESS]`).

What runs where:

* the driver (the machine running `rq`) lists the images and their labels exactly as a local run does, puts
  the model files' bytes into Ray's object store (no shared filesystem needed for models), and computes
  every statistic from the per-image top-5 indices that come back;
* Ray Data splits the file list into blocks; decoding and preprocessing (the same `PreprocessSpec`, through
  the same `calibration.load_image`, so the tensors are bit-identical) run as CPU tasks on the workers, which
  read the images by path (the folder must be visible at the same path on every node);
* an actor pool runs inference: each actor holds an ONNX Runtime session per model (FP32 and INT8 in the same
  actor), so each image's predictions from both models come from the same decoded tensor.

Actors are restarted and their in-flight batches retried when a worker process dies (`max_restarts=-1`,
`max_task_retries=-1`, Ray Data's defaults for actor pools); the driver checks that every image comes back exactly once.

Ray is imported only inside functions: core rq never needs it.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibration import PreprocessSpec, Sample
from calibration.errors import RqInputError
from calibration.progress import NO_PROGRESS, Progress

INSTALL_HINT = "pip install 'rq-quant[ray]'"
#: Seconds rq waits for a Ray cluster to answer before giving up (the issue's budget is 30 s in all).
CONNECT_TIMEOUT_S = 20.0
#: CPUs reserved by one inference actor and by one decode task (Ray's logical CPUs).
ACTOR_CPUS = 0.75
DECODE_CPUS = 0.25


def require_ray():
    """The `ray` module with Ray Data, or a one-line RqInputError naming the install command."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise RqInputError(f"--ray needs the ray extra: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class ClusterInfo:
    """The Ray cluster a run used: named in the report next to the figures."""

    address: str
    nodes: int
    cpus: float
    actors: int
    ray_version: str

    def to_dict(self) -> dict:
        return {
            "engine": "ray",
            "address": self.address,
            "nodes": self.nodes,
            "cpus": self.cpus,
            "actors": self.actors,
            "ray_version": self.ray_version,
        }

    def describe(self) -> str:
        nodes = f"{self.nodes} node{'s' if self.nodes != 1 else ''}"
        return f"Ray {self.ray_version} at {self.address}: {nodes}, {self.cpus:g} CPUs, {self.actors} actors"


def _host_port(address: str) -> tuple[str, int] | None:
    """`host:port` of an address (`ray://` prefix allowed), or None when it has no port."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connection to the cluster's address, so a wrong address fails in seconds, not minutes."""
    hp = _host_port(address)
    if hp is None:
        raise RqInputError(f"--ray {address}: expected auto, local or HOST:PORT (e.g. 10.0.0.5:6379)")
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RqInputError(
            f"cannot reach the Ray cluster at {address} ({reason}); start one with `ray start --head` "
            "or check the address"
        ) from None
    _check_speaks_grpc(address, hp, timeout)


def _check_speaks_grpc(address: str, hp: tuple[str, int], timeout: float) -> None:
    """Ray's head (its GCS) is a gRPC server: it answers an HTTP/2 client preface with a SETTINGS frame at
    once. Something else on that port would leave Ray's client retrying for minutes, so ask first."""
    if os.environ.get("RAY_USE_TLS", "0").lower() not in ("0", "", "false"):
        return  # a TLS cluster: a plain-text probe proves nothing
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    header = b""
    try:
        with socket.create_connection(hp, timeout=timeout) as conn:
            conn.settimeout(timeout)
            conn.sendall(preface)
            while len(header) < 9:
                chunk = conn.recv(9 - len(header))
                if not chunk:
                    break
                header += chunk
    except OSError:
        pass
    if len(header) < 9 or header[3] != 0x04:  # frame type 4: SETTINGS
        raise RqInputError(
            f"{address} accepts connections but does not answer like a Ray head within {timeout:.0f} s; "
            "check the address (the head's GCS port, 6379 unless `ray start --head --port` said otherwise)"
        )


class RayRunner:
    """A connection to a Ray cluster (started on this machine when asked) and validation on it.

    `address`: ``auto`` (Ray's own discovery: ``RAY_ADDRESS``, then a cluster started on this machine with
    ``ray start``, else a new local one), ``local`` (always a new local Ray on this machine) or
    ``HOST:PORT`` of an existing cluster's head. When Ray is already initialised in this process (tests),
    that connection is used and left open.
    """

    def __init__(self, address: str = "auto", *, actors: int | None = None, threads: int = 1):
        self.address = (address or "auto").strip()
        self.actors = actors
        self.threads = threads
        self._ray = None
        self._owns = False
        self.cluster: ClusterInfo | None = None

    # -- connection ----------------------------------------------------------------------------

    def connect(self) -> ClusterInfo:
        if self.cluster is not None:
            return self.cluster
        ray = require_ray()
        self._ray = ray
        if not ray.is_initialized():
            target = self.address
            if target == "auto" and os.environ.get("RAY_ADDRESS"):
                target = os.environ["RAY_ADDRESS"]
            if target not in ("auto", "local"):
                check_reachable(target)
            self._init(ray, None if target == "auto" else target)
            self._owns = True
        _quiet_ray_data(ray)
        resources = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = float(resources.get("CPU", 0.0))
        if cpus <= 0:
            raise RqInputError(f"the Ray cluster at {self.address} has no CPUs")
        actors = self.actors or max(1, math.floor(cpus / (ACTOR_CPUS + DECODE_CPUS)))
        context = ray.get_runtime_context()
        address = getattr(context, "gcs_address", None) or self.address
        self.cluster = ClusterInfo(
            address=str(address),
            nodes=len(nodes),
            cpus=cpus,
            actors=actors,
            ray_version=ray.__version__,
        )
        return self.cluster

    def _init(self, ray, address: str | None) -> None:
        """`ray.init` (on the main thread: Ray's driver does not start from another one)."""
        # A host that accepts TCP but is no Ray head would keep Ray's GCS client retrying for a minute.
        os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(int(CONNECT_TIMEOUT_S)))
        # ray.init replaces the SIGTERM handler with sys.exit; rq's own (quantize/exits.py) must stay.
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if on_main else None
        try:
            ray.init(
                address=address,
                logging_level=logging.ERROR,
                log_to_driver=False,
                include_dashboard=False,
            )
        except Exception as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RqInputError(f"cannot connect to the Ray cluster at {address or 'auto'}: {text}") from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def close(self) -> None:
        if self._owns and self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns = False

    def __enter__(self) -> RayRunner:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- validation ----------------------------------------------------------------------------

    def evaluate(
        self,
        models: Sequence[Path],
        samples: Sequence[Sample],
        spec: PreprocessSpec,
        *,
        batch_size: int = 32,
        progress: Progress | None = None,
    ):
        """The same `EvalRun` `quantize.measure.evaluate.evaluate` returns, computed on the cluster."""
        from quantize.measure.evaluate import evaluation_result

        run = self._run(models, samples, spec, batch_size=batch_size, progress=progress, keep_logits=False)
        return evaluation_result(
            models,
            [t[run.kept] for t in run.top5],
            labels=run.labels,
            paths=run.paths,
            skipped=run.skipped,
            offsets=run.offsets,
            infer_seconds=run.infer_seconds,
            seconds=run.seconds,
            batch_size=batch_size,
            cluster=run.cluster.to_dict(),
        )

    def logits(
        self, model: Path, samples: Sequence[Sample], spec: PreprocessSpec, *, batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray, list[Path]]:
        """One model's whole logits on the readable images, with their labels (-1 where unknown) and paths:
        what tuning's fidelity measures (SQNR, KL) need. Unreadable images are left out, as locally."""
        run = self._run([model], samples, spec, batch_size=batch_size, progress=None, keep_logits=True)
        return run.logits[0][run.kept], run.labels, run.paths

    def _run(self, models, samples, spec, *, batch_size, progress, keep_logits) -> _ClusterRun:
        from quantize.measure.evaluate import check_evaluation_inputs, read_model_outputs

        progress = progress or NO_PROGRESS
        check_evaluation_inputs(models, samples, batch_size)
        io = [read_model_outputs(Path(m)) for m in models]  # one-line errors before anything is shipped
        for m in models:
            _check_self_contained(Path(m))
        cluster = self.connect()
        ray = self._ray
        started = time.perf_counter()
        refs = [ray.put(Path(m).read_bytes()) for m in models]
        items = [{"idx": i, "path": str(s.path)} for i, s in enumerate(samples)]
        blocks = max(1, math.ceil(len(items) / batch_size))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(
            _decode_batch,
            fn_kwargs={"spec": spec.to_dict()},
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=DECODE_CPUS,
        )
        ds = ds.map_batches(
            InferenceActor,
            fn_constructor_kwargs={
                "model_refs": refs,
                "offsets": [o for _, o in io],
                "threads": self.threads,
                "keep_logits": keep_logits,
            },
            batch_size=batch_size,
            batch_format="numpy",
            concurrency=min(cluster.actors, blocks),
            num_cpus=ACTOR_CPUS,
            # Ray Data gives its actor pools max_restarts=-1 and max_task_retries=-1 (Ray 2.60): a dead actor is
            # restarted and its in-flight batch retried; the driver checks every image comes back once.
        )
        count = len(samples)
        seen = np.zeros(count, np.int64)
        top5 = [np.full((count, 5), -1, np.int64) for _ in models]
        chunks: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in models]
        errors: list[str] = [""] * count
        infer_seconds = [0.0 for _ in models]
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            idx = np.asarray(out["idx"], np.int64)
            np.add.at(seen, idx, 1)
            for i in range(len(models)):
                top5[i][idx] = out[f"top5_{i}"]
                infer_seconds[i] += float(np.sum(out[f"seconds_{i}"]))
                if keep_logits:
                    chunks[i].append((idx, np.asarray(out[f"logits_{i}"], np.float32)))
            for k, e in zip(idx.tolist(), out["error"].tolist(), strict=True):
                errors[k] = str(e)
            progress.advance(len(idx))
        seconds = time.perf_counter() - started
        lost, twice = int((seen == 0).sum()), int((seen > 1).sum())
        if lost or twice:
            raise RuntimeError(f"Ray returned {lost} images never and {twice} images more than once")
        kept = np.array([not e for e in errors], bool)
        skipped = [(Path(s.path), e) for s, e in zip(samples, errors, strict=True) if e]
        if not kept.any():
            path, reason = skipped[0]
            raise RqInputError(f"none of the {count} images could be decoded (e.g. {path}: {reason})")
        logits: list[np.ndarray | None] = [None for _ in models]
        for i, parts in enumerate(chunks):
            if parts:
                # A batch whose every image failed to decode carries a placeholder width: its rows are skipped.
                width = max(p.shape[1] for _, p in parts)
                logits[i] = np.zeros((count, width), np.float32)
                for idx, part in parts:
                    if part.shape[1] == width:
                        logits[i][idx] = part
        return _ClusterRun(
            kept=kept,
            top5=top5,
            logits=logits,
            labels=np.array(
                [-1 if s.label is None else s.label for s, k in zip(samples, kept, strict=True) if k],
                np.int64,
            ),
            paths=[Path(s.path) for s, k in zip(samples, kept, strict=True) if k],
            skipped=skipped,
            offsets=[o for _, o in io],
            infer_seconds=infer_seconds,
            seconds=seconds,
            cluster=cluster,
        )


@dataclass
class _ClusterRun:
    """What came back from the cluster, indexed like the samples (`kept`: the images that decoded)."""

    kept: np.ndarray
    top5: list[np.ndarray]
    logits: list[np.ndarray | None]
    labels: np.ndarray
    paths: list[Path]
    skipped: list[tuple[Path, str]]
    offsets: list[int]
    infer_seconds: list[float]
    seconds: float
    cluster: ClusterInfo


def _check_self_contained(path: Path) -> None:
    """Models travel to the workers as bytes: tensors in external data files would not come along."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise RqInputError(
            f"{path.name} keeps its weights in external data files, which --ray does not ship to the workers; "
            "save it as one file (onnx.save(model, path, save_as_external_data=False)) for --ray"
        )


def _quiet_ray_data(ray) -> None:
    """rq draws its own progress bar; Ray Data's bars and per-run log lines would interleave with it."""
    ctx = ray.data.DataContext.get_current()
    for name in ("enable_progress_bars", "enable_operator_progress_bars", "enable_rich_progress_bars"):
        if hasattr(ctx, name):
            setattr(ctx, name, False)
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _image_shape(spec: PreprocessSpec) -> tuple[int, int, int]:
    return (3, spec.crop, spec.crop) if spec.layout == "NCHW" else (spec.crop, spec.crop, 3)


def _decode_batch(batch: dict, spec: dict) -> dict:
    """A Ray task: decode and preprocess one block's images (a failed image gets zeros and its reason)."""
    from calibration.preprocess import ImageDecodeError, PreprocessSpec, load_image

    recipe = PreprocessSpec.from_dict(spec)
    images, errors = [], []
    for path in batch["path"].tolist():
        try:
            images.append(load_image(Path(path), recipe))
            errors.append("")
        except ImageDecodeError as exc:
            images.append(np.zeros(_image_shape(recipe), np.float32))
            errors.append(exc.reason)
    return {
        "idx": np.asarray(batch["idx"], np.int64),
        "image": np.stack(images).astype(np.float32, copy=False),
        "error": np.array(errors, dtype=object),
    }


class InferenceActor:
    """A Ray Data actor holding one ORT session per model, built from model bytes in the object store."""

    def __init__(self, model_refs: list, offsets: list[int], threads: int = 1, keep_logits: bool = False):
        import ray

        from quantize.measure.runtimes import ort_session

        self.sessions = []
        for ref in model_refs:
            blob = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
            self.sessions.append(ort_session(blob, threads=threads, inter_op_threads=1, log_severity=3))
        self.inputs = [s.get_inputs()[0].name for s in self.sessions]
        self.offsets = offsets
        self.keep_logits = keep_logits

    def __call__(self, batch: dict) -> dict:
        from quantize.measure.evaluate import run_model, top5_indices

        ok = np.array([not e for e in batch["error"].tolist()], bool)
        images = np.ascontiguousarray(batch["image"][ok], dtype=np.float32)
        out = {"idx": np.asarray(batch["idx"], np.int64), "error": batch["error"]}
        n = len(ok)
        for i, (session, name, offset) in enumerate(
            zip(self.sessions, self.inputs, self.offsets, strict=True)
        ):
            top5 = np.full((n, 5), -1, np.int64)
            seconds = 0.0
            logits = None
            if ok.any():
                t0 = time.perf_counter()
                logits = run_model(session, name, images)
                seconds = time.perf_counter() - t0
                top5[ok] = top5_indices(logits, offset)
            if self.keep_logits:
                full = np.zeros((n, logits.shape[1] if logits is not None else 1), np.float32)
                if logits is not None:
                    full[ok] = logits
                out[f"logits_{i}"] = full
            out[f"top5_{i}"] = top5
            out[f"seconds_{i}"] = np.full(n, seconds / n)
        return out


# -- sweeps: each recipe's quantization is a Ray task ------------------------------------------------


def _quantize_task(prepared_model: bytes, prepared, calibration, recipe, spec) -> tuple[bytes, object, float]:
    """A Ray task: quantize the prepared model (shipped as bytes) with shared calibration ranges."""
    import dataclasses
    import tempfile

    from quantize.pipeline import quantize_prepared

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rq-ray-quantize-") as tmp:
        workdir = Path(tmp)
        path = workdir / "prepared.onnx"
        path.write_bytes(prepared_model)
        local = dataclasses.replace(prepared, path=path)
        output = workdir / "int8.onnx"
        ops = quantize_prepared(local, calibration, recipe, spec, output, workdir)
        return output.read_bytes(), ops, time.perf_counter() - started


class QuantizeJobs:
    """Quantizations submitted to the cluster at once; collected one by one in the caller's order."""

    def __init__(self, runner: RayRunner, prepared):
        runner.connect()
        self._ray = runner._ray
        self._prepared = prepared
        self._model_ref = self._ray.put(Path(prepared.path).read_bytes())
        self._task = self._ray.remote(num_cpus=1, max_retries=3)(_quantize_task)
        self._futures: dict[str, object] = {}

    def submit(self, key: str, calibration, recipe, spec: PreprocessSpec) -> None:
        self._futures[key] = self._task.remote(self._model_ref, self._prepared, calibration, recipe, spec)

    def __contains__(self, key: str) -> bool:
        return key in self._futures

    def collect(self, key: str, output: Path):
        """Wait for one quantization, publish its model atomically at `output`; (QuantizedOps, seconds)."""
        from quantize.files import atomic_output

        try:
            blob, ops, seconds = self._ray.get(self._futures.pop(key))
        except self._ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            if isinstance(cause, RqInputError):
                raise RqInputError(str(cause)) from None
            raise RuntimeError(f"quantization task failed on the Ray cluster: {cause}") from None
        with atomic_output(Path(output), suffix=".onnx") as tmp:
            Path(tmp).write_bytes(blob)
        return ops, seconds

    def cancel(self) -> None:
        for future in self._futures.values():
            self._ray.cancel(future)
        self._futures.clear()
