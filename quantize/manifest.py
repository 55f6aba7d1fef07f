"""The model manifest (``models/manifest.json``): the models rq knows by name, typed.

Each entry says where to download a model, the exact size and sha256 of the file, its input/output tensors,
the preprocessing preset it expects and its published accuracy. :class:`ModelEntry` declares those fields;
:func:`load_manifest` reads and checks the file, with one-line errors naming the file, the entry and the field.
Downloading is quantize.fetch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from calibration.config import UNKNOWN_FIELD_ERRORS, config_dataclass, first_error, type_name
from calibration.errors import RqInputError

#: The repository root. The manifest is read from the source tree (not from package data), which is
#: where an editable install (``pip install -e .``, the documented install) finds it.
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST_PATH = REPO_ROOT / "models" / "manifest.json"
MANIFEST_VERSION = 1

_HASH_CHUNK = 1024 * 1024


class FetchError(RqInputError):
    """A model could not be found, downloaded or verified. The message is one line."""


class ManifestError(FetchError):
    """The model manifest is missing, not valid JSON, or has a bad entry. The message is one line."""


def _nonblank(value: str) -> str:
    if not value.strip():
        raise ValueError("blank")
    return value


def _plain_name(value: str) -> str:
    # The filename is joined to the destination folder: a path in it could write outside that folder, and a
    # leading dot would collide with fetch's hidden temporary files.
    if not value or value != Path(value).name or "\\" in value or value.startswith("."):
        raise ValueError("not a plain file name")
    return value


_Text = Annotated[StrictStr, AfterValidator(_nonblank)]
_Name = Annotated[StrictStr, Field(pattern=r"^\S+$")]
_Dims = Annotated[tuple[Annotated[StrictInt, Field(gt=0)] | _Text, ...], Field(min_length=1)]
_Percent = Annotated[StrictFloat, Field(ge=0, le=100, allow_inf_nan=False)]

# What each field must be, as the error says it.
_EXPECTED = {
    "aliases": "a list of non-empty strings without spaces",
    "url": "an http:// or https:// URL, or null",
    "filename": "a plain file name (no folders, not starting with '.')",
    "size": "a positive integer (bytes)",
    "sha256": "64 hex digits",
    "opset": "a positive integer or null",
    "input_name": "a non-empty string",
    "output_name": "a non-empty string",
    "input_shape": 'a non-empty list of positive ints or symbolic names like "N"',
    "output_shape": 'a non-empty list of positive ints or symbolic names like "N"',
    "preprocessing": "a non-empty string",
    "published_top1": "a number in [0, 100] or null",
    "published_top5": "a number in [0, 100] or null",
    "source": "a non-empty string or null",
    "notes": "a non-empty string or null",
    "local_hint": "a non-empty string or null",
}
_REQUIRED = ("url", "filename", "size", "sha256", "input_name", "input_shape", "output_name", "output_shape")
_REQUIRED += ("preprocessing",)


def _explain(exc: ValidationError) -> str:
    loc, kind, value, _ = first_error(exc)
    field = str(loc[0]) if loc else "?"
    if kind in UNKNOWN_FIELD_ERRORS:
        return f"unknown field(s) {field!r}; allowed: {', '.join(_EXPECTED)}"
    if kind in ("missing", "missing_argument"):
        return f"missing field(s) {field!r}"
    return f"field {field!r} must be {_EXPECTED.get(field, 'valid')}, got {_short(value)}"


@config_dataclass(_explain)
class ModelEntry:
    """One model of the manifest.

    ``size`` and ``sha256`` describe the exact file that :func:`quantize.fetch.fetch` accepts.
    ``input_shape`` and ``output_shape`` hold ints for fixed dimensions and strings (``"N"``) for symbolic
    ones. ``url`` is ``None`` for models that cannot be downloaded; ``local_hint`` then says where the file
    is expected (a path relative to the repository root, or absolute).
    """

    name: _Name
    url: Annotated[StrictStr, Field(pattern=r"^https?://")] | None
    filename: Annotated[StrictStr, AfterValidator(_plain_name)]
    size: Annotated[StrictInt, Field(gt=0)]
    sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-fA-F]{64}$"), AfterValidator(str.lower)]
    input_name: _Text
    input_shape: _Dims
    output_name: _Text
    output_shape: _Dims
    preprocessing: _Text
    aliases: tuple[_Name, ...] = ()
    opset: Annotated[StrictInt, Field(ge=1)] | None = None
    published_top1: _Percent | None = None
    published_top5: _Percent | None = None
    source: _Text | None = None
    notes: _Text | None = None
    local_hint: _Text | None = None

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> ModelEntry:
        """Build and validate an entry from its manifest JSON object.

        Raises :class:`ManifestError` naming the entry and the offending field.
        """
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ManifestError(f"model name {name!r} must be a non-empty string without spaces")
        where = f"model {name!r}"
        if not isinstance(data, Mapping):
            raise ManifestError(f"{where}: entry must be a JSON object, got {type_name(data)}")
        unknown = sorted(set(data) - set(_EXPECTED))
        if unknown:
            raise ManifestError(
                f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(_EXPECTED)}"
            )
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise ManifestError(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
        try:
            return cls(name=name, **data)
        except RqInputError as exc:
            raise ManifestError(f"{where}: {exc}") from None

    def local_hint_path(self) -> Path | None:
        """``local_hint`` as an absolute path (relative hints are relative to the repository root)."""
        if self.local_hint is None:
            return None
        hint = Path(self.local_hint).expanduser()
        return hint if hint.is_absolute() else (REPO_ROOT / hint).resolve()


def _read_manifest(path: Path | str | None) -> tuple[Path, dict]:
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
        reason = " ".join(str(getattr(exc, "strerror", None) or exc).split())
        raise ManifestError(f"cannot read model manifest {manifest_path}: {reason}") from None
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"model manifest {manifest_path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"model manifest {manifest_path}: top level must be a JSON object")
    return manifest_path, doc


def load_manifest(path: Path | str | None = None) -> dict[str, ModelEntry]:
    """Read and validate the model manifest; return its entries by name (in file order).

    ``path`` defaults to :data:`DEFAULT_MANIFEST_PATH` (``models/manifest.json`` in the repository).
    Raises :class:`ManifestError` with a one-line message naming the file, the entry and the field.
    """
    manifest_path, doc = _read_manifest(path)
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


def default_model_name(path: Path | str | None = None) -> str:
    """The manifest's `"default"` model (the one `rq quantize` uses when no model is given); without that
    key, its first entry."""
    entries = load_manifest(path)
    manifest_path, doc = _read_manifest(path)
    name = doc.get("default")
    if name is None:
        if not entries:
            raise ManifestError(f"model manifest {manifest_path} has no models")
        return next(iter(entries))
    if not isinstance(name, str) or name not in entries:
        raise ManifestError(
            f"model manifest {manifest_path}: 'default' must name one of its models, got {_short(name)}"
        )
    return name


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


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value) if not isinstance(value, str) else repr(value)
    except TypeError:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
