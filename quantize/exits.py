"""rq's exit-code contract and its signal handling, in one place (the README's "Exit codes" table).

| code | exception | meaning |
|---|---|---|
| 0 | — | success (and the gate passed, when one was set) |
| 1 | anything else | an unexpected internal error (one line; ``RQ_DEBUG=1`` shows the traceback) |
| 2 | :class:`~calibration.errors.RqInputError` | bad input (a model ONNX Runtime cannot load or run is bad input); nothing is written |
| 3 | — (the CLI's gate) | the accuracy gate failed: the model and the report are written |
| 4 | :class:`QuantizerError` | the quantizer crashed or its result failed rq's checks; nothing is written |
| 5 | :class:`~calibration.errors.RqEnvironmentError`, an ``OSError`` such as ENOSPC | the machine failed (disk full, permission lost mid-run); the message names the path |
| 6 | :class:`ReportFailed` | the INT8 model **was** written but the report could not be |
| 130 | ``KeyboardInterrupt`` (SIGINT) | interrupted |
| 143 / 129 | :class:`Terminated` (SIGTERM / SIGHUP) | terminated: 128 + the signal number |

Interrupted and terminated runs leave no work folder and no half-written file; files completed before the
signal (an INT8 model before its validation, sweep cache entries) stay.

Signals: inside :func:`handle_signals` (every CLI command), SIGTERM and SIGHUP raise :class:`Terminated`
(a ``KeyboardInterrupt``, so every ``finally``/``except KeyboardInterrupt`` that cleans up after Ctrl-C runs for
them too). Code inside :func:`uninterruptible` (creating and removing the work folder, publishing a file) is
never cut halfway: a signal that arrives there is raised when the block ends. After the first signal, the
next one is ignored while rq cleans up; a third ends the process at once (the escape hatch if cleanup hangs).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from calibration.errors import RqEnvironmentError, RqInputError

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3
EXIT_QUANTIZATION_FAILED = 4
EXIT_ENVIRONMENT = 5
EXIT_REPORT_FAILED = 6
EXIT_INTERRUPTED = 130  # 128 + SIGINT

HANDLED_SIGNALS = tuple(
    s
    for s in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
    if s is not None
)

# errno values that say the machine, not the user's input, failed: a full disk or quota, a file system gone
# read-only, permissions changed under a running job, an I/O error, too many open files.
ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES", "EPERM", "EIO", "EMFILE", "ENFILE", "ENOMEM")
    if hasattr(errno, name)
)

#: ONNX Runtime's log severity for rq's sessions and its default logger: FATAL only. ORT's ERROR lines are
#: ANSI-coloured duplicates of the exception rq turns into its own one-line message.
ORT_LOG_SEVERITY = 4


class QuantizerError(Exception):
    """The quantizer (ONNX Runtime's or INC's) crashed, or its model failed rq's checks. Not the user's input."""


class ReportFailed(Exception):
    """The INT8 model was written, then the report could not be. The message says both."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def signal_exit_code(signum: int) -> int:
    return 128 + int(signum)


def is_environment_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS


def environment_error(exc: OSError, path: object = None) -> RqEnvironmentError:
    """One line naming what failed, where: `no space left on device: /tmp/rq-x/prepared.onnx`."""
    where = exc.filename if exc.filename is not None else path
    reason = (exc.strerror or type(exc).__name__).lower()
    return RqEnvironmentError(f"{reason}: {where}" if where is not None else reason, path=where)


@dataclass(frozen=True)
class Outcome:
    """What the CLI prints and returns for an exception."""

    code: int
    label: str  # "error", "internal error", ...
    message: str


def classify(exc: BaseException) -> Outcome:
    """The one mapping from an exception to an exit code and a one-line message."""
    if isinstance(exc, Terminated):
        return Outcome(
            signal_exit_code(exc.signum),
            "terminated",
            f"{exc.name} received; the work folder was removed and no half-written file was left "
            "(files completed before stay)",
        )
    if isinstance(exc, KeyboardInterrupt):
        return Outcome(
            EXIT_INTERRUPTED,
            "interrupted",
            "the work folder was removed and no half-written file was left (files completed before stay)",
        )
    if isinstance(exc, RqInputError):
        # NothingToQuantize carries exit code 3: the input is valid, but no INT8 model can come of it.
        return Outcome(getattr(exc, "exit_code", EXIT_BAD_INPUT), "error", one_line(exc))
    if isinstance(exc, QuantizerError):
        return Outcome(
            EXIT_QUANTIZATION_FAILED, "quantization failed", one_line(exc) + "; nothing was written"
        )
    if isinstance(exc, ReportFailed):
        return Outcome(EXIT_REPORT_FAILED, "report failed", one_line(exc))
    if isinstance(exc, RqEnvironmentError):
        return Outcome(EXIT_ENVIRONMENT, "environment error", one_line(exc))
    if is_environment_error(exc):
        return Outcome(EXIT_ENVIRONMENT, "environment error", one_line(environment_error(exc)))
    return Outcome(EXIT_INTERNAL, "internal error", f"{type(exc).__name__}: {one_line(exc)}")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*[A-Z_]+\s*:\s*")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def ort_reason(exc: BaseException) -> str:
    """ONNX Runtime's message on one plain line: no `[ONNXRuntimeError] : 1 : FAIL :` prefix, no ANSI codes."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    return _ORT_PREFIX.sub("", lines[0]) if lines else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------------------


class _SignalState:
    def __init__(self) -> None:
        self.installed = False
        self.critical = 0  # depth of uninterruptible() blocks
        self.pending: int | None = None  # a signal that arrived inside one
        self.raised = False  # a signal was raised already: ignore later ones while cleaning up
        self.ignored = 0  # signals ignored since; the second of them ends the process at once


_state = _SignalState()


def _exception_for(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _on_signal(signum: int, _frame) -> None:
    if _state.raised:
        _state.ignored += 1
        if _state.ignored >= 2:  # the escape hatch when cleanup hangs: the third signal kills as usual
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        return
    if _state.critical:
        if _state.pending is None:
            _state.pending = signum
        return
    _state.raised = True
    raise _exception_for(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into exceptions for the block (main thread only; else a no-op)."""
    if _state.installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in HANDLED_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_IGN:
            continue  # `nohup rq …` ignores SIGHUP, a background job SIGINT: keep it that way
        with contextlib.suppress(OSError, ValueError):
            previous[signum] = signal.signal(signum, _on_signal)
    _state.installed, _state.critical, _state.pending, _state.raised, _state.ignored = True, 0, None, False, 0
    try:
        yield
    finally:
        for signum, handler in previous.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        _state.installed, _state.critical, _state.pending, _state.raised, _state.ignored = (
            False,
            0,
            None,
            False,
            0,
        )


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """Run the block to its end even when a signal arrives; the signal is raised when the block ends.

    Only signals handled by :func:`handle_signals` are deferred (the CLI installs it for every command).
    """
    _state.critical += 1
    try:
        yield
    finally:
        _state.critical -= 1
        if not _state.critical and _state.pending is not None and not _state.raised:
            signum, _state.pending = _state.pending, None
            _state.raised = True
            raise _exception_for(signum)


def quiet_onnxruntime() -> None:
    """ONNX Runtime logs a coloured ERROR line for every failure it also raises: keep only rq's message."""
    import onnxruntime as ort

    ort.set_default_logger_severity(ORT_LOG_SEVERITY)


__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_ENVIRONMENT",
    "EXIT_GATE_FAILED",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_QUANTIZATION_FAILED",
    "EXIT_REPORT_FAILED",
    "ORT_LOG_SEVERITY",
    "QuantizerError",
    "ReportFailed",
    "Terminated",
    "classify",
    "environment_error",
    "handle_signals",
    "ort_reason",
    "uninterruptible",
]
