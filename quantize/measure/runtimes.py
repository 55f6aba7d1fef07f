"""The runtime seam: the same ONNX file opened in the runtime the user deploys with.

A runtime turns a model path into a session-like object with one method, ``run(images) -> logits`` (the
first output, float32), and a few facts the benchmark and the evaluator need (input name/shape, output
shape, what it runs on, in which precision). Three are built in:

- ``ort``: ONNX Runtime's CPU execution provider (rq's core dependency);
- ``openvino``: the OpenVINO runtime reading the ONNX file directly (``pip install 'rq-quant[openvino]'``),
  imported only when asked for. OpenVINO runs "FP32" in bf16 on CPUs with AVX512_BF16/AMX unless told
  otherwise, so rq always compiles with ``INFERENCE_PRECISION_HINT=f32`` and reports the precision the
  compiled model says it uses; and with ``ENABLE_CPU_PINNING=NO`` (pinned, it was slowed by, and slowed, the
  ORT sessions interleaved with it in one process: benchmarks/README.md);
- ``ort-openvino``: ONNX Runtime with the OpenVINO execution provider, available only when the installed
  onnxruntime has that provider (the ``onnxruntime-openvino`` distribution, which replaces ``onnxruntime``).

Tests register their own runtime with :func:`register`.

The ONNX Runtime plumbing every rq module shares is here too: :func:`ort_session` (the one place an
``InferenceSession`` is created, with rq's session options) and :func:`quiet` / :func:`muted` (silence ORT's
quantization tooling).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from calibration.errors import RqInputError
from quantize.exits import ORT_LOG_SEVERITY, one_line, ort_reason

OPENVINO_INSTALL = "pip install 'rq-quant[openvino]'"
_INT8_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
}


def ort_session(
    model: Path | str | bytes,
    *,
    threads: int | None = None,
    inter_op_threads: int | None = None,
    graph_optimization: str | None = None,
    sequential: bool = False,
    allow_spinning: bool | None = None,
    stop_spinning_after_run: bool = False,
    log_severity: int | None = ORT_LOG_SEVERITY,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    provider_options: list[dict] | None = None,
):
    """An ``onnxruntime.InferenceSession`` on a model file or serialized bytes, with rq's options.

    Only what is asked is set (ORT's defaults otherwise): ``threads`` intra-op threads (falsy: ORT's choice),
    ``inter_op_threads``, ``graph_optimization`` ("all", "basic" or "off"), sequential execution, the intra-op
    pool's spinning (``allow_spinning``) and whether it stops when a run returns
    (``stop_spinning_after_run``: ``session.force_spinning_stop``), and ``log_severity`` (default: ORT's own
    coloured log lines muted, so that nothing precedes rq's one-line message; None keeps ORT's default).
    ORT's exceptions propagate: each caller words its own one-line error.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if graph_optimization is not None:
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        options.graph_optimization_level = levels[graph_optimization]
    if sequential:
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        options.intra_op_num_threads = threads
    if inter_op_threads is not None:
        options.inter_op_num_threads = inter_op_threads
    if allow_spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    if stop_spinning_after_run:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if log_severity is not None:
        options.log_severity_level = log_severity
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(
        source, sess_options=options, providers=list(providers), provider_options=provider_options
    )


@contextlib.contextmanager
def muted(name: str) -> Iterator[None]:
    """Silence one library logger entirely for the block (ORT logs an optimizer failure's traceback at ERROR)."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the Python loggers and stdout chatter of ORT's quantization tooling for the block."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            yield
    finally:
        root.setLevel(previous)


def check_model_file(path: Path, missing: str) -> None:
    """One line for a path that cannot be an ONNX model: a folder, nothing there (`missing`), an empty file."""
    if path.is_dir():
        raise RqInputError(f"{path} is a folder, not an ONNX model file")
    if not path.is_file():
        raise RqInputError(missing)
    if path.stat().st_size == 0:
        raise RqInputError(f"{path} is an empty file (0 bytes), not an ONNX model")


def check_model_files(paths: Sequence[Path]) -> None:
    """Each path an ONNX model file (or an OpenVINO IR ``.xml``, an onnxruntime ``.ort`` file: their runtime
    judges them) before any runtime opens one: a missing, empty or corrupt file is bad input in every runtime,
    never a row left out as if that runtime could not read it."""
    import onnx

    for path in map(Path, paths):
        check_model_file(path, f"model not found: {path}")
        if path.suffix.lower() in (".xml", ".ort"):
            continue
        try:
            onnx.load_model(str(path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError, onnx's own errors
            raise RqInputError(f"{path} is not an ONNX model: {one_line(exc)}") from None


class Session(Protocol):
    """What rq needs from an opened model, whatever runs it."""

    runtime: str  # the runtime's name ("ort", "openvino", …)
    input_name: str
    input_type: str  # "tensor(float)" for the float image input rq feeds
    input_shape: list[int | str | None]  # symbolic dims as names (or None)
    output_shape: list[int | str | None]
    device: str  # what executes it, for tables ("CPUExecutionProvider", "OpenVINO CPU", …)
    precision: str  # how it computes: "f32", "int8+f32", "int8+bf16", …

    def prepare(self, batch: int) -> None:
        """Whatever a first run of `batch` images does besides inference (OpenVINO: compile for it)."""

    def run(self, images: np.ndarray) -> np.ndarray: ...


class Runtime(Protocol):
    name: str  # what --runtime takes
    label: str  # for messages: "cannot load X in <label>: …"

    def version(self) -> str: ...

    def check(self) -> None: ...  # one-line RqInputError when the runtime is not installed

    def open(self, path: Path, threads: int | None = None, *, allow_spinning: bool = False) -> Session: ...


def _has_int8(path: Path) -> bool:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    return any(n.op_type in _INT8_OPS for n in model.graph.node)


# -- ONNX Runtime ---------------------------------------------------------------------------------------


@dataclass
class OrtSession:
    session: object  # onnxruntime.InferenceSession
    runtime: str
    input_name: str
    input_type: str
    input_shape: list
    output_shape: list
    device: str
    precision: str

    def prepare(self, batch: int) -> None:
        pass  # an ORT session serves every batch size as it is

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images})[0]


class OrtRuntime:
    """ONNX Runtime, CPU execution provider (or another provider it was built with)."""

    def __init__(
        self,
        name: str = "ort",
        providers: Sequence[str] = ("CPUExecutionProvider",),
        label: str = "onnxruntime",
    ):
        self.name = name
        self.label = label
        self.providers = tuple(providers)

    def version(self) -> str:
        import onnxruntime as ort

        return f"onnxruntime {ort.__version__}"

    def _check_available(self) -> None:
        pass

    def check(self) -> None:
        """Raise the one-line error `open` would raise for a missing runtime, before any work starts."""
        self._check_available()

    def _provider_options(self, threads: int | None) -> list[dict] | None:
        return None

    def open(self, path: Path, threads: int | None = None, *, allow_spinning: bool = False) -> OrtSession:
        path = Path(path)
        check_model_file(path, f"model not found: {path}")
        self._check_available()
        try:
            # The pool's workers spin between the operators of a run, as in ORT's default (a deployed session):
            # parked between them instead, they wake up for every operator, which cost the many short
            # operators of an INT8 graph 12 % at batch 1 and FP32 5 % (benchmarks/README.md). Unless asked
            # (`allow_spinning`), they stop spinning when the run returns, so that a session which just ran
            # does not busy-wait on the cores of the next one (interleaved benchmarks, models evaluated
            # batch by batch).
            sess = ort_session(
                path,
                threads=threads,
                inter_op_threads=1,
                graph_optimization="all",
                sequential=True,
                allow_spinning=True,
                stop_spinning_after_run=not allow_spinning,
                providers=self.providers,
                provider_options=self._provider_options(threads),
            )
        except Exception as exc:  # ORT raises its own pybind exception types
            raise RqInputError(f"cannot load {path} in {self.label}: {ort_reason(exc)}") from None
        inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
        return OrtSession(
            session=sess,
            runtime=self.name,
            input_name=inp.name,
            input_type=inp.type,
            input_shape=list(inp.shape),
            output_shape=list(out.shape),
            device=sess.get_providers()[0],
            precision="int8+f32" if _has_int8(path) else "f32",
        )


class OrtOpenVinoRuntime(OrtRuntime):
    """ONNX Runtime's OpenVINO execution provider (the onnxruntime-openvino distribution)."""

    PROVIDER = "OpenVINOExecutionProvider"

    def __init__(self):
        super().__init__("ort-openvino", (self.PROVIDER,), "onnxruntime-openvino")

    def version(self) -> str:
        return f"{super().version()} with {self.PROVIDER}"

    def _check_available(self) -> None:
        import onnxruntime as ort

        if self.PROVIDER not in ort.get_available_providers():
            raise RqInputError(
                f"--runtime ort-openvino needs onnxruntime-openvino, which replaces onnxruntime "
                f"(onnxruntime {ort.__version__} here has no {self.PROVIDER}); see the README"
            )

    def _provider_options(self, threads: int | None) -> list[dict]:
        options = {"device_type": "CPU", "precision": "FP32"}
        if threads:
            options["num_of_threads"] = str(threads)
        return [options]


# -- OpenVINO -------------------------------------------------------------------------------------------


_OV_NOISE = re.compile(r"^(Exception from |Check '.*' failed at |FrontEnd API failed|Summary:)|\bsrc/\S+:\d+")


def ov_reason(exc: BaseException) -> str:
    """OpenVINO's message without its source locations: the lines that say what is wrong, on one line."""
    lines = [ln.strip(" -") for ln in str(exc).splitlines() if ln.strip(" -")]
    useful = [ln for ln in lines if not _OV_NOISE.search(ln)]
    return " ".join(useful) if useful else ort_reason(exc)


def _onnx_frontend():
    from openvino.frontend import FrontEndManager

    return FrontEndManager().load_by_framework("onnx")


def _ov_dims(partial_shape) -> list[int | str | None]:
    return [d.get_length() if d.is_static else None for d in partial_shape]


class OpenVinoSession:
    """An OpenVINO CPU model; a dynamic batch is compiled static per batch size on first use."""

    runtime = "openvino"

    def __init__(self, core, model, path: Path, config: dict, int8: bool):
        self._core = core
        self._model = model
        self._path = path
        self._config = config
        self._compiled: dict[int, object] = {}
        inp, out = model.inputs[0], model.outputs[0]
        self.input_name = inp.get_any_name()
        self.input_type = (
            "tensor(float)"
            if inp.get_element_type().get_type_name() == "f32"
            else str(inp.get_element_type())
        )
        self.input_shape = _ov_dims(inp.get_partial_shape())
        self.output_shape = _ov_dims(out.get_partial_shape())
        self.device = "OpenVINO CPU"
        self._int8 = int8
        self.precision = ("int8+" if int8 else "") + "f32"  # refined from the first compiled model

    def prepare(self, batch: int) -> None:
        """Compile for `batch` images now (a compile is not inference: callers time `run` after this)."""
        self._request(batch)

    def _request(self, batch: int):
        request = self._compiled.get(batch)
        if request is None:
            model = self._model
            if self.input_shape and self.input_shape[0] is None:
                model = model.clone()
                model.reshape({self.input_name: [batch, *self.input_shape[1:]]})
            try:
                compiled = self._core.compile_model(model, "CPU", self._config)
            except Exception as exc:
                raise RqInputError(f"openvino cannot compile {self._path.name}: {ov_reason(exc)}") from None
            hint = compiled.get_property("INFERENCE_PRECISION_HINT")
            hint = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
            self.precision = executed_precision(compiled, hint, self._int8)
            request = compiled.create_infer_request()
            self._compiled[batch] = request
        return request

    def run(self, images: np.ndarray) -> np.ndarray:
        request = self._request(len(images))
        request.infer({0: images})
        return np.array(request.get_output_tensor(0).data, copy=True)


#: OpenVINO CPU runtime-graph layer types that do the multiply-accumulate work (the ones INT8 is for).
_OV_COMPUTE_LAYERS = frozenset(
    {"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul"}
)


def executed_precision(compiled, hint: str, has_int8: bool) -> str:
    """The precision OpenVINO *ran* `compiled` in, read from its runtime graph, not from the file's Q/DQ nodes.

    A file with Q/DQ nodes is not necessarily run in integers: OpenVINO's CPU plugin has no u8-weight
    convolution, so a U8U8 file (``--weight-type uint8``) runs every convolution in float, emulating the
    quantize steps (measured: ResNet-50 v1 at FP32's speed). Then the label says so instead of "int8".
    """
    if not has_int8:
        return hint
    try:
        layers = [op.get_rt_info() for op in compiled.get_runtime_model().get_ordered_ops()]
        compute = [
            str(info["runtimePrecision"].astype(str))
            for info in layers
            if str(info["layerType"].astype(str)) in _OV_COMPUTE_LAYERS
        ]
    except Exception:  # an OpenVINO without this runtime-graph API: fall back to the file's Q/DQ nodes
        return f"int8+{hint}"
    # "int8+f32" already says part ran in float (rq's default keeps the classifier head FP32); what it must
    # not say is "int8" when no compute layer ran in integers.
    if compute and not any(precision in ("u8", "i8") for precision in compute):
        return f"{hint} (Q/DQ emulated)"
    return f"int8+{hint}"


class OpenVinoRuntime:
    """OpenVINO reading the ONNX file (no conversion step): ``pip install 'rq-quant[openvino]'``."""

    name = "openvino"
    label = "openvino"

    def __init__(self, extra_config: dict[str, str] | None = None):
        # CPU plugin properties added to (and overriding) rq's: for experiments such as
        # benchmarks/interleave_check.py --ov-config; rq's commands leave it empty.
        self.extra_config = dict(extra_config or {})

    def _ov(self):
        try:
            import openvino
        except ImportError:
            raise RqInputError(f"--runtime openvino needs the openvino extra: {OPENVINO_INSTALL}") from None
        return openvino

    def version(self) -> str:
        return f"openvino {self._ov().__version__.split('-')[0]}"

    def check(self) -> None:
        self._ov()

    def open(
        self, path: Path, threads: int | None = None, *, allow_spinning: bool = False
    ) -> OpenVinoSession:
        ov = self._ov()
        path = Path(path)
        check_model_file(path, f"model not found: {path}")
        # OpenVINO's read_model tries every frontend it has on a file the ONNX one rejects, and the TensorFlow
        # one prints parse errors to stderr: say it in one line instead (an .xml file is an OpenVINO IR).
        if path.suffix.lower() != ".xml" and not _onnx_frontend().supported(str(path)):
            raise RqInputError(f"openvino cannot read {path.name}: not an ONNX model")
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as exc:
            raise RqInputError(f"openvino cannot read {path.name}: {ov_reason(exc)}") from None
        config = {
            # f32, not the bf16 OpenVINO silently picks on AVX512_BF16/AMX CPUs: the FP32 baseline must be FP32.
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
            # Pinned TBB workers cannot leave a core another thread (an ORT session of the same process, any
            # other process) holds: interleaved with ORT, or on a shared machine, OpenVINO then ran up to 1.5x
            # slower than alone, and ORT beside it 1.25x slower. Unpinned, both equal alone (benchmarks/README.md).
            "ENABLE_CPU_PINNING": "NO",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        config.update(self.extra_config)
        return OpenVinoSession(core, model, path, config, _has_int8(path))


# -- the registry -----------------------------------------------------------------------------------------

_RUNTIMES: dict[str, Runtime] = {}


def register(runtime: Runtime) -> None:
    """Make `runtime` selectable by its name (``--runtime NAME``)."""
    _RUNTIMES[runtime.name] = runtime


def unregister(name: str) -> None:
    _RUNTIMES.pop(name, None)


def names() -> list[str]:
    return list(_RUNTIMES)


def get(name: str) -> Runtime:
    runtime = _RUNTIMES.get(name)
    if runtime is None:
        raise RqInputError(f"unknown runtime {name!r}; choose from {', '.join(_RUNTIMES)}")
    return runtime


def parse(text: str | Sequence[str] | None) -> list[str]:
    """``"ort,openvino"`` → ``["ort", "openvino"]`` (known names, no duplicates, at least one)."""
    if text is None:
        return ["ort"]
    items = text.split(",") if isinstance(text, str) else list(text)
    chosen: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        get(item)
        if item not in chosen:
            chosen.append(item)
    if not chosen:
        raise RqInputError("--runtime needs at least one runtime")
    for name in chosen:
        get(name).check()
    return chosen


register(OrtRuntime())
register(OrtOpenVinoRuntime())
register(OpenVinoRuntime())
