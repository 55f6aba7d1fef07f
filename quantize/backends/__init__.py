"""Quantization backends behind one seam: `get(name)` returns the backend a recipe names.

A backend turns a prepared FP32 model into an INT8 file in a scratch path; everything around it (preparation,
reading the calibration images, rq's calibrator, rq's fallback tuner, the checks and the atomic publish) is
quantize/pipeline.py's and the same for every backend. What a backend must provide is `Backend` below.

- `ort` (quantize/backends/ort.py): ONNX Runtime's `quantize_static`, fed the ranges of rq's calibrator.
- `inc` (quantize/backends/inc.py): Intel Neural Compressor (the `inc` extra), which calibrates and tunes by
  itself; its module imports nothing of INC at import time.

Adding one: a module with a class implementing `Backend` (optional packages imported inside its methods only,
`require()` naming the extra to install), one line in `_BUILTIN` (or `register()` at run time), and the name in
quantize/recipe.py's `BACKENDS` (the recipe validates it; `rq quantize --backend` offers it). Without a tuner of
its own, `--tune` runs rq's fallback tuner over its `quantize`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from calibration.errors import RqInputError

if TYPE_CHECKING:
    from calibration import PreprocessSpec
    from calibration.progress import Progress
    from quantize.graph.prepare import PreparedModel
    from quantize.pipeline import CalibrationRun
    from quantize.recipe import QuantRecipe
    from quantize.tune import TuneReport, TuneRequest


@dataclass
class Tuned:
    """What a backend's own tuner returns: the recipe it ended with (its `exclude_nodes` include the tuner's
    fallbacks), rq's tuning report, and the model it chose, in scratch (the pipeline checks and publishes it)."""

    recipe: QuantRecipe
    report: TuneReport
    scratch: Path


class Backend(Protocol):
    """What quantize/pipeline.py asks of a backend."""

    name: str
    #: True: the pipeline runs rq's calibrator (quantize/calibrate.py) and hands the ranges to `quantize` as
    #: `calibration.ranges`. False: the backend calibrates by itself from `calibration.samples` (`ranges` None).
    uses_rq_ranges: bool
    #: Whether the backend brings its own accuracy-driven tuner (`tune`). Without one, `--tune` runs rq's
    #: fallback tuner (quantize/tune.py), which re-runs `quantize` with more nodes excluded at each step.
    has_tuner: bool

    def require(self) -> None:
        """Fail with one line (RqInputError) when the backend's package is not installed: before any work."""

    def versions(self) -> dict[str, str]:
        """Package versions that shape this backend's output beyond rq's, onnx's and onnxruntime's (cache keys)."""

    def adapt(self, recipe: QuantRecipe) -> QuantRecipe:
        """The recipe this backend really runs: fields it does not implement set to what it does instead."""

    def quantize(
        self,
        prepared: PreparedModel,
        calibration: CalibrationRun,
        recipe: QuantRecipe,
        spec: PreprocessSpec,
        scratch: Path,
        workdir: Path,
    ) -> None:
        """Write the INT8 model for `recipe` to `scratch`; may set `calibration.bias_correction`."""

    def tune(
        self,
        prepared: PreparedModel,
        calibration: CalibrationRun,
        recipe: QuantRecipe,
        spec: PreprocessSpec,
        workdir: Path,
        request: TuneRequest,
        top1: Callable[[Path], float],
        progress: Progress,
    ) -> Tuned:
        """Only when `has_tuner`: tune against `top1` (ONNX path → top-1 % on the tuning images)."""


_BUILTIN = {"ort": "quantize.backends.ort:OrtBackend", "inc": "quantize.backends.inc:IncBackend"}
_registered: dict[str, Callable[[], Backend]] = {}
_instances: dict[str, Backend] = {}


def register(name: str, factory: Callable[[], Backend]) -> None:
    """Make `name` (a recipe's `backend`) resolve to `factory()`."""
    _registered[name] = factory
    _instances.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*_BUILTIN, *_registered]))


def get(name: str) -> Backend:
    """The backend a recipe names (its module imported on first use)."""
    if name not in _instances:
        if name in _registered:
            _instances[name] = _registered[name]()
        elif name in _BUILTIN:
            module, cls = _BUILTIN[name].split(":")
            _instances[name] = getattr(importlib.import_module(module), cls)()
        else:
            raise RqInputError(f"backend must be one of {', '.join(names())}, not {name!r}")
    return _instances[name]


__all__ = ["Backend", "Tuned", "get", "names", "register"]
