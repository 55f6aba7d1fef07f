"""Model manifest and verified downloads.

The manifest (``models/manifest.json`` in the repository) lists the models rq knows by name: where to
download each one, the exact size and sha256 of the file, its input/output tensors, the preprocessing
preset it expects and its published accuracy. :func:`fetch` downloads a model into a folder and only
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
import json
import math
import os
import re
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibration.errors import RqInputError

__all__ = [
    "DEFAULT_MANIFEST_PATH",
    "REPO_ROOT",
    "FetchError",
    "ManifestError",
    "ModelEntry",
    "fetch",
    "fetch_with_progress",
    "is_verified",
    "load_manifest",
    "resolve",
    "sha256_file",
]

#: The repository root. The manifest is read from the source tree (not from package data), which is
#: where an editable install (``pip install -e .``, the documented install) finds it.
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST_PATH = REPO_ROOT / "models" / "manifest.json"

MANIFEST_VERSION = 1

# 64 KiB: small enough that the progress bar moves smoothly, large enough that the per-chunk
# Python overhead is negligible next to the network.
_CHUNK = 64 * 1024
_HASH_CHUNK = 1024 * 1024
_USER_AGENT = "rq-quant (model fetch; python urllib)"
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")

ProgressCallback = Callable[[int, "int | None"], None]


class FetchError(RqInputError):
    """A model could not be found, downloaded or verified. The message is one line."""


class ManifestError(FetchError):
    """The model manifest is missing, not valid JSON, or has a bad entry. The message is one line."""


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------

_REQUIRED = (
    "url",
    "filename",
    "size",
    "sha256",
    "input_name",
    "input_shape",
    "output_name",
    "output_shape",
    "preprocessing",
)
_OPTIONAL = (
    "aliases",
    "opset",
    "published_top1",
    "published_top5",
    "source",
    "notes",
    "local_hint",
)


@dataclass(frozen=True)
class ModelEntry:
    """One model of the manifest.

    ``size`` and ``sha256`` describe the exact file that :func:`fetch` accepts. ``input_shape`` and
    ``output_shape`` hold ints for fixed dimensions and strings (``"N"``) for symbolic ones.
    ``url`` is ``None`` for models that cannot be downloaded; ``local_hint`` then says where the file
    is expected (a path relative to the repository root, or absolute).
    """

    name: str
    aliases: tuple[str, ...]
    url: str | None
    filename: str
    size: int
    sha256: str
    opset: int | None
    input_name: str
    input_shape: tuple[int | str, ...]
    output_name: str
    output_shape: tuple[int | str, ...]
    preprocessing: str
    published_top1: float | None = None
    published_top5: float | None = None
    source: str | None = None
    notes: str | None = None
    local_hint: str | None = None

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> ModelEntry:
        """Build and validate an entry from its manifest JSON object.

        Raises :class:`ManifestError` naming the entry and the offending field.
        """
        where = f"model {name!r}"
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ManifestError(f"model name {name!r} must be a non-empty string without spaces")
        if not isinstance(data, Mapping):
            raise ManifestError(f"{where}: entry must be a JSON object, got {_type_name(data)}")
        unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise ManifestError(
                f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                f"allowed: {', '.join(_REQUIRED + _OPTIONAL)}"
            )
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ManifestError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")

        def bad(field: str, expected: str) -> ManifestError:
            return ManifestError(f"{where}: field {field!r} must be {expected}, got {_short(data[field])}")

        def text(field: str) -> str:
            value = data[field]
            if not isinstance(value, str) or not value.strip():
                raise bad(field, "a non-empty string")
            return value

        def optional_text(field: str) -> str | None:
            value = data.get(field)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise bad(field, "a non-empty string or null")
            return value

        def number(field: str, lo: float, hi: float) -> float | None:
            value = data.get(field)
            if value is None:
                return None
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not lo <= value <= hi:
                raise bad(field, f"a number in [{lo:g}, {hi:g}] or null")
            return float(value)

        def shape(field: str) -> tuple[int | str, ...]:
            value = data[field]
            dims_ok = isinstance(value, list) and value
            if dims_ok:
                for d in value:
                    is_int = isinstance(d, int) and not isinstance(d, bool) and d > 0
                    if not is_int and not (isinstance(d, str) and d.strip()):
                        dims_ok = False
            if not dims_ok:
                raise bad(field, 'a non-empty list of positive ints or symbolic names like "N"')
            return tuple(value)

        aliases = data.get("aliases", [])
        if not isinstance(aliases, list) or not all(
            isinstance(a, str) and a and not any(c.isspace() for c in a) for a in aliases
        ):
            raise bad("aliases", "a list of non-empty strings without spaces")

        url = data["url"]
        if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
            raise bad("url", "an http:// or https:// URL, or null")

        filename = data["filename"]
        # The filename is joined to the destination folder: a path in it could write outside that
        # folder, and a leading dot would collide with fetch's hidden temporary files.
        if (
            not isinstance(filename, str)
            or not filename
            or filename != Path(filename).name
            or "\\" in filename
            or filename.startswith(".")
        ):
            raise bad("filename", "a plain file name (no folders, not starting with '.')")

        size = data["size"]
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise bad("size", "a positive integer (bytes)")

        sha256 = data["sha256"]
        if not isinstance(sha256, str) or not _SHA256_RE.match(sha256):
            raise bad("sha256", "64 hex digits")

        opset = data.get("opset")
        if opset is not None and (not isinstance(opset, int) or isinstance(opset, bool) or opset < 1):
            raise bad("opset", "a positive integer or null")

        return cls(
            name=name,
            aliases=tuple(aliases),
            url=url,
            filename=filename,
            size=size,
            sha256=sha256.lower(),
            opset=opset,
            input_name=text("input_name"),
            input_shape=shape("input_shape"),
            output_name=text("output_name"),
            output_shape=shape("output_shape"),
            preprocessing=text("preprocessing"),
            published_top1=number("published_top1", 0, 100),
            published_top5=number("published_top5", 0, 100),
            source=optional_text("source"),
            notes=optional_text("notes"),
            local_hint=optional_text("local_hint"),
        )

    def local_hint_path(self) -> Path | None:
        """``local_hint`` as an absolute path (relative hints are relative to the repository root)."""
        if self.local_hint is None:
            return None
        hint = Path(self.local_hint).expanduser()
        return hint if hint.is_absolute() else (REPO_ROOT / hint).resolve()


def load_manifest(path: Path | str | None = None) -> dict[str, ModelEntry]:
    """Read and validate the model manifest; return its entries by name (in file order).

    ``path`` defaults to :data:`DEFAULT_MANIFEST_PATH` (``models/manifest.json`` in the repository).
    Raises :class:`ManifestError` with a one-line message naming the file, the entry and the field.
    """
    manifest_path = Path(path) if path is not None else DEFAULT_MANIFEST_PATH
    try:
        raw = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        hint = (
            " (rq reads it from the repository's models/ folder: install with `pip install -e .` "
            "or pass --manifest FILE)"
            if path is None
            else ""
        )
        raise ManifestError(f"model manifest not found: {manifest_path}{hint}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read model manifest {manifest_path}: {_reason(exc)}") from None
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"model manifest {manifest_path} is not valid JSON: {exc}") from None

    if not isinstance(doc, dict):
        raise ManifestError(f"model manifest {manifest_path}: top level must be a JSON object")
    version = doc.get("version")
    if version != MANIFEST_VERSION:
        raise ManifestError(
            f"model manifest {manifest_path}: unsupported version {_short(version)} "
            f"(this rq reads version {MANIFEST_VERSION})"
        )
    models = doc.get("models")
    if not isinstance(models, dict):
        raise ManifestError(f"model manifest {manifest_path}: 'models' must be a JSON object of entries")

    entries: dict[str, ModelEntry] = {}
    # Names and aliases share one case-insensitive namespace, so that resolve() is never ambiguous.
    seen: dict[str, str] = {}
    for name, data in models.items():
        try:
            entry = ModelEntry.from_dict(name, data)
        except ManifestError as exc:
            raise ManifestError(f"model manifest {manifest_path}: {exc}") from None
        for key in (entry.name, *entry.aliases):
            owner = seen.get(key.casefold())
            if owner is not None:
                raise ManifestError(
                    f"model manifest {manifest_path}: name or alias {key!r} of model {entry.name!r} "
                    f"is already used by model {owner!r}"
                )
            seen[key.casefold()] = entry.name
        entries[entry.name] = entry
    return entries


def resolve(name: str, manifest: Mapping[str, ModelEntry]) -> ModelEntry:
    """Find a model by name or alias (case-insensitive).

    Raises :class:`FetchError` listing the known names when nothing matches.
    """
    key = name.strip().casefold()
    for entry in manifest.values():
        if key == entry.name.casefold() or key in (a.casefold() for a in entry.aliases):
            return entry
    known = ", ".join(
        e.name + (f" (alias {', '.join(e.aliases)})" if e.aliases else "") for e in manifest.values()
    )
    raise FetchError(f"unknown model {name!r}; known models: {known or 'none (the manifest is empty)'}")


#: Where `rq fetch` puts models and where `rq quantize` without a model file looks for them (relative to the
#: current folder, as `rq fetch --dest`'s default).
DEFAULT_MODELS_DIR = Path("models")


def default_model_name(path: Path | str | None = None) -> str:
    """The manifest's `"default"` model (the one `rq quantize` uses when no model is given); without that
    key, its first entry."""
    entries = load_manifest(path)
    manifest_path = Path(path) if path is not None else DEFAULT_MANIFEST_PATH
    name = json.loads(manifest_path.read_text(encoding="utf-8")).get("default")
    if name is None:
        if not entries:
            raise ManifestError(f"model manifest {manifest_path} has no models")
        return next(iter(entries))
    if not isinstance(name, str) or name not in entries:
        raise ManifestError(
            f"model manifest {manifest_path}: 'default' must name one of its models, got {_short(name)}"
        )
    return name


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


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def sha256_file(path: Path | str) -> str:
    """Return the lowercase hex sha256 of a file, read in 1 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_verified(entry: ModelEntry, path: Path | str) -> bool:
    """True if ``path`` is a file with exactly the entry's size and sha256.

    The size is checked first so that a wrong file is usually rejected without hashing it.
    """
    p = Path(path)
    try:
        if not p.is_file() or p.stat().st_size != entry.size:
            return False
        return sha256_file(p) == entry.sha256
    except OSError:
        return False


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

    _prepare_dest_dir(dest_dir)

    try:
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{entry.filename}.", suffix=".part")
    except OSError as exc:
        raise FetchError(f"cannot write to destination folder {dest_dir}: {_reason(exc)}") from None
    tmp = Path(tmp_name)
    done = False
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
    return target


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


def _prepare_dest_dir(dest_dir: Path) -> None:
    if dest_dir.exists() and not dest_dir.is_dir():
        raise FetchError(f"destination {dest_dir} exists and is not a folder")
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create destination folder {dest_dir}: {_reason(exc)}") from None
    if not os.access(dest_dir, os.W_OK | os.X_OK):
        raise FetchError(f"destination folder {dest_dir} is not writable")


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


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )
