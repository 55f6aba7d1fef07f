"""The canonical 1000 ILSVRC2012 classes.

Class indices everywhere in rq come from this list (the 0-based line number of
``data/synset_words.txt``), never from the position of a folder in a directory listing:
a validation folder that holds only some of the classes must still map ``n15075141`` to 999.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from calibration.errors import RqInputError

#: What a WordNet id looks like (``n01440764``). Used to tell class folders from other folders.
WNID_RE = re.compile(r"^n\d{8}$")

NUM_CLASSES = 1000


@dataclass(frozen=True)
class Synset:
    """One ImageNet class: its WordNet id and its human-readable names (most common first)."""

    wnid: str
    names: tuple[str, ...]

    @property
    def name(self) -> str:
        """The first (most common) name, e.g. ``"tench"``."""
        return self.names[0] if self.names else self.wnid


@cache
def _load() -> tuple[Synset, ...]:
    # importlib.resources works from a wheel, a zip, or a source checkout alike.
    text = resources.files("calibration").joinpath("data", "synset_words.txt").read_text(encoding="utf-8")
    synsets: list[Synset] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        wnid, _, rest = line.partition(" ")
        if not WNID_RE.match(wnid):
            # The file ships with the package; a bad line means a broken install, not user error.
            raise RuntimeError(f"calibration/data/synset_words.txt line {lineno}: bad wnid {wnid!r}")
        names = tuple(n.strip() for n in rest.split(",") if n.strip())
        synsets.append(Synset(wnid=wnid, names=names))
    if len(synsets) != NUM_CLASSES:
        raise RuntimeError(
            f"calibration/data/synset_words.txt has {len(synsets)} classes, expected {NUM_CLASSES}"
        )
    return tuple(synsets)


def load_synsets() -> list[Synset]:
    """The 1000 classes in canonical order (index = class id). Returns a fresh list; the parse is cached."""
    return list(_load())


@cache
def _wnid_index() -> dict[str, int]:
    return {s.wnid: i for i, s in enumerate(_load())}


def wnid_to_index() -> dict[str, int]:
    """Map ``"n01440764"`` → 0 … ``"n15075141"`` → 999 (a fresh copy; callers may mutate it)."""
    return dict(_wnid_index())


def index_of(wnid: str) -> int | None:
    """Class index of ``wnid``, or None if it is not one of the 1000 classes (no copy, for hot loops)."""
    return _wnid_index().get(wnid)


def class_name(index: int) -> str:
    """The first name of class ``index`` (0..999), e.g. ``class_name(0) == "tench"``."""
    synsets = _load()
    try:
        # operator.index accepts numpy integers (labels come out of int64 arrays) but not floats.
        i = operator.index(index)
    except TypeError:
        raise RqInputError(f"class index must be an integer, got {index!r}") from None
    if isinstance(index, bool) or not 0 <= i < len(synsets):
        raise RqInputError(f"class index {index!r} out of range 0..{len(synsets) - 1}")
    return synsets[i].name
