"""Verified model downloads, and the MODEL argument that names a file or a manifest model.

The manifest (``models/manifest.json``, read by quantize.manifest) lists the models rq knows by name, with
the exact size and sha256 of each file. :func:`fetch` downloads a model into a folder and only
ever leaves a file there whose size and sha256 match the manifest: the download goes to a hidden
temporary file in the same folder, is verified, and is then renamed into place atomically, so an
interrupted or corrupted download never looks like a model.

All failures are raised as :class:`FetchError` (a :class:`~calibration.errors.RqInputError`) with a
one-line message, which the CLI prints without a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from quantize.manifest import (
    DEFAULT_MANIFEST_PATH,
    REPO_ROOT,
    FetchError,
    ManifestError,
    ModelEntry,
    default_model_name,
    is_verified,
    load_manifest,
    resolve,
    sha256_file,
)

# The manifest's names are re-exported: `from quantize.fetch import load_manifest, sha256_file` keeps working.
__all__ = [
    "DEFAULT_MANIFEST_PATH",
    "DEFAULT_MODELS_DIR",
    "REPO_ROOT",
    "FetchError",
    "ManifestError",
    "ModelEntry",
    "default_model_name",
    "fetch",
    "fetch_with_progress",
    "is_verified",
    "load_manifest",
    "model_argument",
    "resolve",
    "sha256_file",
]

# 64 KiB: small enough that the progress bar moves smoothly, large enough that the per-chunk
# Python overhead is negligible next to the network.
_CHUNK = 64 * 1024
_USER_AGENT = "rq-quant (model fetch; python urllib)"

ProgressCallback = Callable[[int, "int | None"], None]


#: Where `rq fetch` puts models and where `rq quantize` without a model file looks for them (relative to the
#: current folder, as `rq fetch --dest`'s default).
DEFAULT_MODELS_DIR = Path("models")


def model_argument(
    model: str | None,
    *,
    manifest: Path | str | None = None,
    models_dir: Path | str = DEFAULT_MODELS_DIR,
    fetcher: Callable[[ModelEntry, Path], Path] | None = None,
) -> Path:
    """The model file a command's optional MODEL argument names.

    A path (an existing file, or anything with a folder or an `.onnx` suffix) is returned as given. A
    manifest name or alias (`resnet50-v2`, `resnet50-v2-7`), or no argument at all (the manifest's default
    model), is the verified file `models_dir/<filename>`, downloaded and verified first when absent
    (`fetcher(entry, models_dir)`, default :func:`fetch`). When that is impossible (offline, no URL) the
    error is one line saying which file to put where, and nothing is left behind (not even `models_dir`).
    """
    if model is not None:
        path = Path(model).expanduser()
        if path.exists() or path.suffix.lower() == ".onnx" or "/" in model or os.sep in model:
            return path
    entries = load_manifest(manifest)
    name = model if model is not None else default_model_name(manifest)
    try:
        entry = resolve(name, entries)
    except FetchError:
        known = ", ".join(sorted({n for e in entries.values() for n in (e.name, *e.aliases)}))
        raise FetchError(
            f"model {model!r} is neither a file nor a model of the manifest (known models: {known})"
        ) from None
    models_dir = Path(models_dir)
    target = models_dir / entry.filename
    if is_verified(entry, target):
        return target
    put = f"put {entry.filename} (sha256 {entry.sha256}) at {target}"
    if entry.url is None:
        raise FetchError(f"{_no_url_message(entry, target)}")
    created = not models_dir.exists()
    try:
        return (fetcher or fetch)(entry, models_dir)
    except FetchError as exc:
        if created:
            with contextlib.suppress(OSError):
                models_dir.rmdir()  # only when empty: fetch has removed its partial file
        raise FetchError(f"model {entry.name} is not in {models_dir}/ and {exc}; {put}") from None


def fetch(
    entry: ModelEntry,
    dest_dir: Path | str,
    *,
    progress: ProgressCallback | None = None,
    force: bool = False,
    timeout: float = 60,
) -> Path:
    """Make sure ``dest_dir/entry.filename`` holds the verified model file; return its path.

    If the file is already there with the manifest's size and sha256 it is returned without any
    network access (unless ``force``). Otherwise it is downloaded with urllib into a hidden temporary
    file in ``dest_dir`` (``.<filename>.<random>.part``), checked against the manifest's size and
    sha256, and renamed over the destination atomically. ``progress(bytes_done, total)`` is called
    after every chunk; ``total`` is the expected size in bytes (``None`` only if unknown).
    ``timeout`` bounds the connection and every single read, in seconds (not the whole download).

    Raises :class:`FetchError` (one line) on a network error, an HTTP error status, a short or
    oversized download, a sha256 mismatch, an unwritable destination, or an entry without URL. The
    temporary file is removed on every failure, KeyboardInterrupt included; a pre-existing file at
    the destination is only ever replaced by a verified one.
    """
    dest_dir = Path(dest_dir)
    target = dest_dir / entry.filename

    if not force and is_verified(entry, target):
        return target

    if entry.url is None:
        raise FetchError(_no_url_message(entry, target))

    created = _prepare_dest_dir(dest_dir)
    done = False
    try:
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{entry.filename}.", suffix=".part")
    except OSError as exc:
        _remove_empty(created)
        raise FetchError(f"cannot write to destination folder {dest_dir}: {_reason(exc)}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _download(entry, out, progress=progress, timeout=timeout)
            try:
                out.flush()
                # fsync before the rename: after a crash the destination holds either the old file or
                # the complete new one, never a renamed but partly written file.
                os.fsync(out.fileno())
            except OSError as exc:
                raise FetchError(f"could not write {tmp}: {_reason(exc)}") from None
        got = digest.hexdigest()
        if got != entry.sha256:
            raise FetchError(
                f"downloaded {entry.name} from {entry.url} but its sha256 is {got}, expected "
                f"{entry.sha256}; the file was discarded"
            )
        try:
            # mkstemp creates the file 0600; a model file is not a secret.
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except OSError as exc:
            raise FetchError(f"could not move the download into place at {target}: {_reason(exc)}") from None
        done = True
    finally:
        # BaseException included: Ctrl-C during a 100 MB download must not leave a .part behind.
        if not done:
            with contextlib.suppress(OSError):
                tmp.unlink()
            _remove_empty(created)  # a failed fetch leaves no folder it made behind
    return target


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; rmdir leaves a folder something else wrote into
        with contextlib.suppress(OSError):
            folder.rmdir()


def fetch_with_progress(
    entry: ModelEntry,
    dest_dir: Path | str,
    force: bool = False,
    *,
    timeout: float = 60,
    console: Any | None = None,
) -> Path:
    """:func:`fetch` with a rich progress bar and a one-line outcome, both on stderr.

    ``console`` is a ``rich.console.Console`` (default: a new one on stderr, so that stdout stays free
    for machine-readable output). Returns the path of the verified model file.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = console if console is not None else Console(stderr=True)
    target = Path(dest_dir) / entry.filename
    if not force and is_verified(entry, target):
        console.print(f"{entry.name}: already present at {target} (size and sha256 verified)", markup=False)
        return target
    if entry.url is None:
        # Raised before the progress bar starts, so that only the one-line error is shown.
        raise FetchError(_no_url_message(entry, target))
    if target.exists() and not force:
        console.print(
            f"{entry.name}: {target} does not match the manifest's size/sha256; downloading again",
            markup=False,
        )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(escape(entry.name), total=entry.size)

        def on_progress(received: int, total: int | None) -> None:
            bar.update(task, completed=received, total=total)

        # force=True here as well: the verified-copy check above already ran, and running it again
        # inside fetch() would hash a 100 MB file twice.
        path = fetch(entry, dest_dir, progress=on_progress, force=True, timeout=timeout)
    console.print(f"{entry.name}: saved {path} ({entry.size:,} bytes, sha256 verified)", markup=False)
    return path


# --------------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------------


def _download(entry: ModelEntry, out: Any, *, progress: ProgressCallback | None, timeout: float) -> Any:
    """Stream ``entry.url`` into the open file ``out``; return the sha256 of what was written.

    Returns only when exactly ``entry.size`` bytes arrived; anything shorter or longer is a FetchError.
    """
    assert entry.url is not None
    url = entry.url

    def fail(reason: str) -> FetchError:
        return FetchError(f"could not download {entry.name} from {url}: {reason}")

    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    digest = hashlib.sha256()
    received = 0
    try:
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except ValueError as exc:  # a malformed URL; caught here only, so a buggy callback is not masked
            raise fail(_reason(exc)) from None
        with response:
            status = getattr(response, "status", 200)
            if status != 200:
                raise fail(f"HTTP {status} {getattr(response, 'reason', '')}".strip())
            total = _content_length(response)
            if total is not None and total != entry.size:
                # Fail before downloading 100 MB of the wrong thing (an HTML error page, an LFS pointer).
                raise fail(f"the server announces {total} bytes, the manifest expects {entry.size}")
            if total is None:
                total = entry.size
            while True:
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                received += len(chunk)
                if received > entry.size:
                    raise fail(f"the server sent more than the expected {entry.size} bytes")
                digest.update(chunk)
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise FetchError(
                        f"could not write the download of {entry.name}: {_reason(exc)}"
                    ) from None
                if progress is not None:
                    progress(received, total)
    except FetchError:
        raise
    except urllib.error.HTTPError as exc:
        raise fail(f"HTTP {exc.code} {exc.reason}".strip()) from None
    except urllib.error.URLError as exc:
        raise fail(_reason(exc.reason, timeout)) from None
    except http.client.IncompleteRead as exc:
        raise fail(f"connection closed after {received + len(exc.partial)} of {entry.size} bytes") from None
    except (http.client.HTTPException, OSError) as exc:
        raise fail(_reason(exc, timeout)) from None

    if received < entry.size:
        # A server that closes the connection early without announcing a length ends up here.
        raise fail(f"connection closed after {received} of {entry.size} bytes")
    return digest


def _content_length(response: Any) -> int | None:
    value = response.headers.get("Content-Length") if response.headers is not None else None
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None


def _prepare_dest_dir(dest_dir: Path) -> list[Path]:
    """Create `dest_dir` if needed; the folders it created, deepest first (removed again if the fetch fails)."""
    if dest_dir.exists() and not dest_dir.is_dir():
        raise FetchError(f"destination {dest_dir} exists and is not a folder")
    created = []
    missing = dest_dir
    while not missing.exists() and missing != missing.parent:
        created.append(missing)
        missing = missing.parent
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create destination folder {dest_dir}: {_reason(exc)}") from None
    if not os.access(dest_dir, os.W_OK | os.X_OK):
        raise FetchError(f"destination folder {dest_dir} is not writable")
    return created


def _no_url_message(entry: ModelEntry, target: Path) -> str:
    msg = f"model {entry.name} has no download URL"
    hint = entry.local_hint_path()
    if hint is None:
        return f"{msg}; place a copy with sha256 {entry.sha256} at {target}"
    state = "present" if hint.is_file() else "missing"
    return (
        f"{msg}; the file is expected at {entry.local_hint} ({hint}, {state}): pass that path to rq "
        f"directly, or copy it to {target}"
    )


def _reason(exc: BaseException | str | None, timeout: float | None = None) -> str:
    """A one-line, human-readable reason for a network or file error."""
    if isinstance(exc, TimeoutError) or (isinstance(exc, str) and exc == "timed out"):
        return f"no response within {timeout:g} s" if timeout is not None else "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    elif isinstance(exc, BaseException):
        text = str(exc) or type(exc).__name__
    else:
        text = str(exc) if exc else "unknown error"
    return " ".join(text.split())
