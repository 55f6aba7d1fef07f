"""One progress protocol for every long step of rq (calibration, validation, fidelity, benchmarking).

Library code reports progress through a :class:`Progress` and diagnostics through ``logging`` (one logger per
module, ``logging.getLogger(__name__)``); it never prints. What shows, and how, is the caller's choice: the
CLI draws a rich progress bar from a :class:`Progress`, a script may pass nothing (:data:`NO_PROGRESS`).

The protocol, all four methods called from the thread that runs the step:

* ``stage(name)`` — a new step begins ("calibrate", "validate", "bench batch 8");
* ``total(n)`` — the current step will ``advance`` by ``n`` in all (images, rounds);
* ``advance(n=1)`` — ``n`` more units of the current step are done;
* ``note(text)`` — a one-line status worth showing now ("loading model.onnx in onnxruntime").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["NO_PROGRESS", "Progress", "ProgressCallbacks"]


@runtime_checkable
class Progress(Protocol):
    def stage(self, name: str) -> None: ...

    def total(self, n: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def note(self, text: str) -> None: ...


class _NoProgress:
    """Reports nothing."""

    def stage(self, name: str) -> None:
        pass

    def total(self, n: int) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def __repr__(self) -> str:
        return "NO_PROGRESS"


#: The default everywhere a ``progress`` argument is optional.
NO_PROGRESS: Progress = _NoProgress()


@dataclass(frozen=True)
class ProgressCallbacks:
    """A :class:`Progress` made of optional callables, e.g. ``ProgressCallbacks(on_advance=bar.advance)``."""

    on_stage: Callable[[str], None] | None = None
    on_total: Callable[[int], None] | None = None
    on_advance: Callable[[int], None] | None = None
    on_note: Callable[[str], None] | None = None

    def stage(self, name: str) -> None:
        if self.on_stage is not None:
            self.on_stage(name)

    def total(self, n: int) -> None:
        if self.on_total is not None:
            self.on_total(n)

    def advance(self, n: int = 1) -> None:
        if self.on_advance is not None:
            self.on_advance(n)

    def note(self, text: str) -> None:
        if self.on_note is not None:
            self.on_note(text)
