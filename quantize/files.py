"""Files rq writes: atomic outputs, its work folder, and strict JSON.

- Every artifact rq publishes goes through a temporary file in the same folder + rename (:func:`atomic_output`):
  a crash, Ctrl-C or SIGTERM never leaves a half-written model, report or cache entry where a reader would
  find it; the previous file (if any) stays in place until the new one is complete.
- Everything rq or its libraries write while working goes under one work folder in ``$TMPDIR``
  (:func:`work_folder`), removed at the end however the run ends, and never halfway.
- A write the machine refuses (disk full, permission lost mid-run) becomes an
  :class:`~calibration.errors.RqEnvironmentError` that names the path (exit code 5, see quantize/exits.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from calibration.errors import RqEnvironmentError, RqInputError
from quantize.exits import environment_error, is_environment_error, uninterruptible


@contextlib.contextmanager
def atomic_output(path: Path | str, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; publish it at `path` when the block succeeds, else remove it."""
    path = Path(path)
    tmp: str | None = None
    try:
        with uninterruptible():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
            os.close(fd)
        yield Path(tmp)
        with uninterruptible():
            # mkstemp creates the file 0600; outputs are meant to be read like any other file.
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
    except BaseException as exc:
        with uninterruptible():
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        if is_environment_error(exc):
            raise environment_error(exc, path) from None
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def work_folder(prefix: str = "rq-") -> Iterator[Path]:
    """A fresh folder in ``$TMPDIR`` for the run's scratch files, removed at the end (never halfway).

    While it exists, Python's ``tempfile`` default folder points into it, so the temporary files of the
    libraries rq calls (ONNX Runtime's pre-processing, INC) land there too. A write refused by the machine
    inside the block names the work folder when the error does not name its own file.
    """
    path: Path | None = None
    previous_tempdir = tempfile.tempdir
    try:
        with uninterruptible():
            try:
                path = Path(tempfile.mkdtemp(prefix=prefix))
            except OSError as exc:
                if is_environment_error(exc) or isinstance(exc, FileNotFoundError):
                    raise environment_error(exc, tempfile.gettempdir()) from None
                raise
            scratch = path / "tmp"
            scratch.mkdir()
            tempfile.tempdir = str(scratch)
        yield path
    except OSError as exc:
        if is_environment_error(exc):
            raise environment_error(exc, path) from None
        raise
    finally:
        with uninterruptible():
            tempfile.tempdir = previous_tempdir
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def inside(folder: Path) -> Iterator[None]:
    """Run the block with `folder` as the current directory (for libraries that write into the CWD)."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _writable(directory: Path) -> OSError | None:
    """None when a file can be created in `directory` (tried, then removed), else the error."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return exc
    return None


def check_output_path(output: Path) -> None:
    """Fail (bad input) before any expensive work when the output file cannot be written."""
    directory = output.parent
    if output.exists() and output.is_dir():
        raise RqInputError(f"output path is a folder: {output}")
    if directory.exists() and not directory.is_dir():
        raise RqInputError(f"output folder is a file, not a folder: {directory}")
    if not directory.is_dir():
        raise RqInputError(f"output folder does not exist: {directory}")
    if _writable(directory) is not None:
        raise RqInputError(f"output folder is not writable: {directory}")


def ensure_writable_dir(directory: Path, what: str = "report folder") -> None:
    """Check files can be written under `directory` (before any long work) without creating it yet."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RqInputError(f"{what} is not writable: {directory} ({existing} is not a folder)")
    exc = _writable(existing)
    if exc is not None:
        raise RqInputError(f"{what} is not writable: {directory} ({exc.strerror or exc})") from None


def finite_or_none(value):
    """`value` with every NaN/±inf float replaced by None (JSON's null), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # numpy scalars and arrays
        return finite_or_none(value.tolist())
    return value


def json_text(data, **kwargs) -> str:
    """Strict JSON (``allow_nan=False``): a non-finite number is written as null, never as a bare ``NaN``."""
    return json.dumps(finite_or_none(data), allow_nan=False, **kwargs)


__all__ = [
    "RqEnvironmentError",
    "atomic_output",
    "atomic_write_text",
    "check_output_path",
    "ensure_writable_dir",
    "finite_or_none",
    "inside",
    "json_text",
    "work_folder",
]
