"""Finding the images in a folder and their ImageNet labels.

Supported layouts (the name is reported back so the user sees what rq understood):

``wnid-folders``   class subfolders named by WordNet id: ``val/n01440764/ILSVRC2012_val_….JPEG``
``flat+labels``    one flat folder of images, labels from a file given with ``--labels``
``wnid-prefixed``  one flat folder of files named ``<wnid>_….JPEG`` (e.g. ``n01440764_tench.JPEG``)
``unlabeled``      any flat folder of images without labels, or subfolders none of which is named by a wnid
                   (fine for calibration, not for accuracy)

Labels files: Caffe ``val.txt`` (``ILSVRC2012_val_00000001.JPEG 65``, 0-based index into the
canonical synset list; a wnid instead of the index is accepted too) and Kaggle
``LOC_val_solution.csv`` (``ImageId,PredictionString`` with the first wnid as the label).

Class indices always come from the canonical synset list (:mod:`calibration.synsets`), never from
the position of a folder in the listing — a folder with 725 of the 1000 classes must still map
``n15075141`` to 999.
"""

from __future__ import annotations

import csv
import io
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from calibration.errors import DatasetError
from calibration.synsets import NUM_CLASSES, WNID_RE, index_of

LAYOUT_WNID_FOLDERS = "wnid-folders"
LAYOUT_FLAT_LABELS = "flat+labels"
LAYOUT_WNID_PREFIXED = "wnid-prefixed"
LAYOUT_UNLABELED = "unlabeled"
LAYOUTS = (LAYOUT_WNID_FOLDERS, LAYOUT_FLAT_LABELS, LAYOUT_WNID_PREFIXED, LAYOUT_UNLABELED)

#: Image file extensions, compared case-insensitively.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif"})

_WNID_PREFIX_RE = re.compile(r"^(n\d{8})_")
_ILSVRC_NAME_RE = re.compile(r"^ILSVRC\d{4}_(val|test)_\d+$", re.IGNORECASE)


@dataclass(frozen=True)
class Sample:
    """One image and its class index (0..999), or None when unknown."""

    path: Path
    label: int | None


@dataclass
class ImageDataset:
    """What :func:`discover_dataset` found: the images (sorted by path), the layout it recognised,
    where the labels came from, and notes worth showing the user."""

    root: Path
    layout: str
    samples: list[Sample]
    labels_source: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        """True when every sample has a known label (needed for accuracy evaluation)."""
        return bool(self.samples) and all(s.label is not None for s in self.samples)

    @property
    def num_classes_present(self) -> int:
        """Distinct known labels among the samples."""
        return len({s.label for s in self.samples if s.label is not None})

    def __len__(self) -> int:
        return len(self.samples)


def is_image_file(path: Path) -> bool:
    """By extension (case-insensitive); hidden files such as macOS ``._x.jpg`` are not images."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _ext_list() -> str:
    return " ".join(sorted(IMAGE_EXTENSIONS))


def _quote(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def _listdir(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except PermissionError:
        raise DatasetError(f"cannot read folder {folder}: permission denied") from None
    except OSError as e:
        raise DatasetError(f"cannot read folder {folder}: {e.strerror or e}") from None


def _images_in(folder: Path) -> list[Path]:
    return [p for p in _listdir(folder) if p.is_file() and is_image_file(p)]


def _link_target(link: Path) -> str:
    try:
        return str(link.readlink())
    except OSError:
        return "?"


def _broken_links(folder: Path) -> list[Path]:
    """Image-named symbolic links in `folder` whose target does not exist."""
    return [p for p in _listdir(folder) if is_image_file(p) and p.is_symlink() and not p.exists()]


# -- labels files ------------------------------------------------------------------------------


@dataclass
class _Labels:
    by_stem: dict[str, int]
    description: str


def _read_labels_file(path: Path) -> _Labels:
    """Parse a Caffe ``val.txt`` or a Kaggle ``LOC_val_solution.csv``; errors name the line."""
    if not path.exists():
        raise DatasetError(f"labels file not found: {path}")
    if not path.is_file():
        raise DatasetError(f"labels file is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate a BOM from Excel/Windows
    except UnicodeDecodeError:
        raise DatasetError(f"labels file {path} is not a UTF-8 text file") from None
    except OSError as e:
        raise DatasetError(f"cannot read labels file {path}: {e.strerror or e}") from None

    lines = text.splitlines()
    first = next((ln.strip() for ln in lines if ln.strip()), None)
    if first is None:
        raise DatasetError(f"labels file {path} is empty")

    by_stem: dict[str, int] = {}
    first_line: dict[str, int] = {}

    def add(name: str, label: int, lineno: int) -> None:
        # Match on the stem: the CSV has no extension, and val.txt may say .JPEG for a .png copy.
        stem = Path(name.strip()).stem
        old = by_stem.get(stem)
        if old is not None and old != label:
            raise DatasetError(
                f"labels file {path} line {lineno}: {name.strip()} has label {label}, "
                f"but line {first_line[stem]} gave it {old}"
            )
        by_stem[stem] = label
        first_line.setdefault(stem, lineno)

    if first.lower().replace(" ", "").startswith("imageid,"):
        fmt = "Kaggle LOC_val_solution.csv"
        expected = "'ImageId,PredictionString' rows like 'ILSVRC2012_val_00008726,n02119789 255 142 454 329'"
        header_seen = False
        for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            if not row or not any(c.strip() for c in row):
                continue
            if not header_seen:
                header_seen = True
                continue
            tokens = row[1].split() if len(row) == 2 else []
            if len(row) != 2 or not row[0].strip() or not tokens or not WNID_RE.match(tokens[0]):
                raise DatasetError(
                    f"labels file {path} line {lineno}: expected {expected}, got {_quote(','.join(row))}"
                )
            label = index_of(tokens[0])
            if label is None:
                raise DatasetError(
                    f"labels file {path} line {lineno}: unknown wnid {tokens[0]} "
                    f"(not one of the {NUM_CLASSES} ILSVRC2012 classes)"
                )
            add(row[0], label, lineno)
    else:
        fmt = "Caffe val.txt"
        expected = "'<image file> <class index 0-999>' like 'ILSVRC2012_val_00000001.JPEG 65'"
        for lineno, line in enumerate(lines, start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            parts = stripped.rsplit(maxsplit=1)  # rsplit: file names may contain spaces
            token = parts[1] if len(parts) == 2 else ""
            if WNID_RE.match(token):  # some ground-truth files give the wnid instead of the index
                label = index_of(token)
                if label is None:
                    raise DatasetError(
                        f"labels file {path} line {lineno}: unknown wnid {token} "
                        f"(not one of the {NUM_CLASSES} ILSVRC2012 classes)"
                    )
            elif re.fullmatch(r"-?\d+", token):
                label = int(token)
                if not 0 <= label < NUM_CLASSES:
                    raise DatasetError(
                        f"labels file {path} line {lineno}: "
                        f"class index {label} out of range 0..{NUM_CLASSES - 1}"
                    )
            else:
                raise DatasetError(
                    f"labels file {path} line {lineno}: expected {expected}, got {_quote(stripped)}"
                )
            add(parts[0], label, lineno)

    if not by_stem:
        raise DatasetError(f"labels file {path} has a header but no labels")
    return _Labels(by_stem=by_stem, description=f"{fmt}, {len(by_stem)} entries")


# -- discovery ---------------------------------------------------------------------------------


def _no_images_error(root: Path, entries: list[Path]) -> DatasetError:
    files = [p for p in entries if p.is_file()]
    dirs = [p for p in entries if p.is_dir()]
    found = []
    if files:
        found.append(f"{len(files)} non-image file{'s' if len(files) != 1 else ''} (e.g. {files[0].name})")
    if dirs:
        found.append(f"{len(dirs)} subfolder{'s' if len(dirs) != 1 else ''} with no images directly inside")
    what = "found " + " and ".join(found) if found else "the folder is empty"
    # Someone pointed at the parent of val/: suggest the subfolder(s) that hold class folders.
    candidates = []
    for d in dirs:
        try:
            if any(c.is_dir() and WNID_RE.match(c.name) for c in d.iterdir()):
                candidates.append(str(d))
        except OSError:
            continue
    hint = f"; did you mean {' or '.join(candidates[:3])}?" if candidates else ""
    return DatasetError(f"no images in {root}: {what} (image types: {_ext_list()}){hint}")


def discover_dataset(root: Path | str, labels: Path | str | None = None) -> ImageDataset:
    """Find the images under ``root``, recognise the layout and attach labels.

    A labels file that does not cover every image is not an error here: those samples get label
    None and ``notes`` says how many (calibration does not need labels; evaluation will refuse).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"image folder not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"not a folder: {root} (give the folder that holds the images)")
    labels_path = Path(labels).expanduser() if labels is not None else None
    label_file = _read_labels_file(labels_path) if labels_path is not None else None

    entries = _listdir(root)
    flat_images = [p for p in entries if p.is_file() and is_image_file(p)]
    subdirs = [p for p in entries if p.is_dir()]
    subdir_images = {d: _images_in(d) for d in subdirs}
    dirs_with_images = [d for d in subdirs if subdir_images[d]]

    # A link whose target is gone is not an image, but the user put it there: say so rather than drop it.
    broken = [p for folder in (root, *subdirs) for p in _broken_links(folder)]
    if flat_images and dirs_with_images:
        raise DatasetError(
            f"{root} has images both directly inside ({len(flat_images)}) and in subfolders "
            f"(e.g. {dirs_with_images[0].name}/); use either one flat folder or one subfolder per class"
        )
    if not flat_images and not dirs_with_images:
        if broken:
            raise DatasetError(
                f"{root} holds no readable image, only {len(broken)} broken link(s) "
                f"(e.g. {broken[0].relative_to(root)} → {_link_target(broken[0])}); is their target mounted?"
            )
        raise _no_images_error(root, entries)

    notes: list[str] = []
    if broken:
        notes.append(f"skipped {len(broken)} broken link(s) (e.g. {broken[0].relative_to(root)})")
    if flat_images:
        layout, samples, source = _flat(root, flat_images, label_file, labels_path, notes)
    else:
        layout, samples, source = _class_folders(root, subdirs, subdir_images, label_file, labels_path, notes)

    missing = sum(1 for s in samples if s.label is None)
    if missing and layout != LAYOUT_UNLABELED:
        notes.append(f"labels missing for {missing} of {len(samples)} images")
        if missing == len(samples):
            notes.append(
                f"none of the images is listed in {labels_path}; is it the labels file for this folder?"
            )
    return ImageDataset(root=root, layout=layout, samples=samples, labels_source=source, notes=notes)


def _flat(
    root: Path,
    images: list[Path],
    label_file: _Labels | None,
    labels_path: Path | None,
    notes: list[str],
) -> tuple[str, list[Sample], str | None]:
    prefixes = [_WNID_PREFIX_RE.match(p.stem) for p in images]

    if label_file is not None:
        samples = [Sample(p, label_file.by_stem.get(p.stem)) for p in images]
        notes.append(f"labels from {labels_path.name if labels_path else 'file'} ({label_file.description})")
        # The file wins over name prefixes, but say so if they contradict each other.
        disagree = sum(
            1
            for s, m in zip(samples, prefixes, strict=True)
            if m and s.label is not None and index_of(m.group(1)) not in (None, s.label)
        )
        if disagree:
            notes.append(f"labels file disagrees with the wnid file-name prefix for {disagree} images")
        return LAYOUT_FLAT_LABELS, samples, str(labels_path)

    if all(prefixes):
        samples = []
        for p, m in zip(images, prefixes, strict=True):
            assert m is not None  # all(prefixes) above
            label = index_of(m.group(1))
            if label is None:
                raise DatasetError(
                    f"{p.name} in {root}: file-name prefix {m.group(1)} is not one of the "
                    f"{NUM_CLASSES} ILSVRC2012 classes"
                )
            samples.append(Sample(p, label))
        notes.append(f"labels from <wnid>_ file-name prefixes ({len({s.label for s in samples})} classes)")
        return LAYOUT_WNID_PREFIXED, samples, "file-name prefixes"

    samples = [Sample(p, None) for p in images]
    prefixed = sum(1 for m in prefixes if m)
    if prefixed:
        notes.append(
            f"{prefixed} of {len(images)} files are named <wnid>_…, the rest are not; "
            "treating all as unlabeled"
        )
    if any(_ILSVRC_NAME_RE.match(p.stem) for p in images):
        notes.append(
            "file names look like ILSVRC2012 validation images; pass --labels val.txt "
            "(or LOC_val_solution.csv) to attach their labels"
        )
    notes.append("no labels: fine for calibration, but accuracy cannot be measured")
    return LAYOUT_UNLABELED, samples, None


def _class_folders(
    root: Path,
    subdirs: list[Path],
    subdir_images: dict[Path, list[Path]],
    label_file: _Labels | None,
    labels_path: Path | None,
    notes: list[str],
) -> tuple[str, list[Sample], str | None]:
    if not any(WNID_RE.match(d.name) for d in subdirs):
        return _unlabelled_folders(root, subdirs, subdir_images, label_file, labels_path, notes)
    samples: list[Sample] = []
    empty: list[str] = []
    ignored: list[str] = []
    for d in subdirs:
        if WNID_RE.match(d.name):
            label = index_of(d.name)
            if label is None:
                raise DatasetError(
                    f"class folder {d.name} in {root} is not one of the {NUM_CLASSES} ILSVRC2012 classes"
                )
            if not subdir_images[d]:
                empty.append(d.name)
            samples.extend(Sample(p, label) for p in subdir_images[d])
        elif subdir_images[d]:
            raise DatasetError(
                f"subfolder {d.name!r} in {root} holds images but is not an ImageNet class id "
                "(class folders must be named by wnid, like n01440764)"
            )
        else:
            ignored.append(d.name)

    if empty:
        notes.append(
            f"{len(empty)} class folder{'s' if len(empty) != 1 else ''} without images (e.g. {empty[0]})"
        )
    if ignored:
        notes.append(f"ignored {len(ignored)} subfolder(s) without images (e.g. {ignored[0]})")
    nested = sum(1 for d in subdirs if WNID_RE.match(d.name) and any(c.is_dir() for c in _listdir(d)))
    if nested:
        notes.append(f"{nested} class folder(s) contain subfolders; only images directly inside are used")

    if label_file is None:
        notes.append(f"labels from class folder names ({len({s.label for s in samples})} classes)")
        return LAYOUT_WNID_FOLDERS, samples, "folder names"

    # A labels file for class folders: the file wins; the folder fills gaps.
    out: list[Sample] = []
    disagree = from_folder = 0
    for s in samples:
        file_label = label_file.by_stem.get(s.path.stem)
        if file_label is None:
            from_folder += 1
            out.append(s)
        else:
            disagree += file_label != s.label
            out.append(Sample(s.path, file_label))
    notes.append(f"labels from {labels_path.name if labels_path else 'file'} ({label_file.description})")
    if disagree:
        notes.append(f"labels file disagrees with the class folder for {disagree} of {len(out)} images")
    if from_folder:
        notes.append(
            f"labels file has no entry for {from_folder} of {len(out)} images; used their class folder"
        )
    return LAYOUT_WNID_FOLDERS, out, str(labels_path)


def _unlabelled_folders(
    root: Path,
    subdirs: list[Path],
    subdir_images: dict[Path, list[Path]],
    label_file: _Labels | None,
    labels_path: Path | None,
    notes: list[str],
) -> tuple[str, list[Sample], str | None]:
    """Subfolders none of which is an ImageNet class id (``cats/``, ``batch1/``): their images, labelled only by
    a labels file. Calibration needs no labels; a folder mixing class ids with other names is refused instead,
    as it is more likely a mistake."""
    images = [p for d in subdirs for p in subdir_images[d]]
    used = [d for d in subdirs if subdir_images[d]]
    nested = sum(1 for d in used if any(c.is_dir() for c in _listdir(d)))
    if nested:
        notes.append(f"{nested} subfolder(s) contain subfolders; only images directly inside are used")
    if label_file is not None:
        samples = [Sample(p, label_file.by_stem.get(p.stem)) for p in images]
        notes.append(
            f"images from {len(used)} subfolder(s) that are not class ids; labels from "
            f"{labels_path.name if labels_path else 'file'} ({label_file.description})"
        )
        stems = defaultdict(int)
        for p in images:
            stems[p.stem] += 1
        repeated = sum(n for n in stems.values() if n > 1)
        if repeated:
            # A labels file names images by file name: the same name in two subfolders gets one label.
            notes.append(
                f"{repeated} images share their file name with another subfolder's: they get one label"
            )
        return LAYOUT_FLAT_LABELS, samples, str(labels_path)
    notes.append(
        f"images from {len(used)} subfolder(s) whose names are not ImageNet class ids (e.g. {_quote(used[0].name)}): "
        "no labels, fine for calibration, but accuracy cannot be measured"
    )
    return LAYOUT_UNLABELED, [Sample(p, None) for p in images], None


# -- sampling ----------------------------------------------------------------------------------


def select_samples(dataset: ImageDataset, n: int | None, seed: int = 0) -> list[Sample]:
    """A deterministic subset of ``n`` samples.

    * ``n`` None or ``n >= len(dataset)`` → every sample, in sorted path order.
    * labelled dataset → stratified: classes are visited round-robin in a seeded shuffled order,
      each class's images in a seeded shuffled order, so ``n = number of classes`` gives one image
      per class and any ``n`` spreads as evenly as the classes allow. The round-robin order is kept
      (consecutive calibration batches then mix classes); it depends only on the sample list and
      ``seed``, never on the file system's listing order or on ``PYTHONHASHSEED``.
    * otherwise → a seeded random sample (in the order drawn).

    Uses :class:`random.Random`, whose shuffle/sample sequence is stable across Python versions
    and independent of numpy.
    """
    return select_with_spares(dataset, n, seed)[0]


def select_with_spares(dataset: ImageDataset, n: int | None, seed: int = 0) -> tuple[list[Sample], Spares]:
    """:func:`select_samples`'s subset, and the :class:`Spares` that stand in for its unreadable images."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        raise DatasetError(f"number of calibration images must be a whole number, got {n!r}")
    if n is not None and n <= 0:
        raise DatasetError(f"number of calibration images must be at least 1, got {n}")
    samples = sorted(dataset.samples, key=lambda s: str(s.path))
    if n is None or n >= len(samples):
        return samples, Spares([], labelled=False)
    rng = random.Random(seed)

    if not dataset.labelled:
        chosen = rng.sample(samples, n)
        taken = {s.path for s in chosen}
        rest = [s for s in samples if s.path not in taken]
        random.Random(seed).shuffle(rest)
        return chosen, Spares(rest, labelled=False)

    by_class: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        assert s.label is not None  # dataset.labelled
        by_class[s.label].append(s)
    classes = sorted(by_class)
    rng.shuffle(classes)
    for c in classes:  # shuffled in that (seeded) order, so the RNG stream is reproducible
        rng.shuffle(by_class[c])

    # The whole round-robin order; the first n are the subset. A larger n gives a longer prefix of the same
    # order, so the spares are the images the next larger subsets would add, in that order.
    order: list[Sample] = []
    for depth in range(max(len(m) for m in by_class.values())):
        order.extend(by_class[c][depth] for c in classes if depth < len(by_class[c]))
    return order[:n], Spares(order[n:], labelled=True)


class Spares:
    """The images a selection left out, in the order they stand in for unreadable ones.

    A labelled selection replaces an unreadable image by the next unused image of *its class* (so a
    one-per-class calibration set stays one per class), and by the next image of the selection's own order
    when that class has none left; an unlabelled one by the next image of a seeded shuffle of the rest. An
    unreadable spare is followed by the next one drawn for the same image (its class, not the spare's).
    Each pass over the images takes a fresh :meth:`picker`, so the same unreadable images get the same
    replacements in every pass.
    """

    def __init__(self, order: list[Sample], *, labelled: bool) -> None:
        self.order = order
        self.by_class: dict[int, list[Sample]] = defaultdict(list)
        if labelled:
            for s in order:
                assert s.label is not None
                self.by_class[s.label].append(s)

    def __len__(self) -> int:
        return len(self.order)

    def picker(self, exclude: Iterable[Path] = ()) -> Callable[[Sample], Sample | None]:
        """A function from an unreadable sample to its replacement (None when no image is left); it never
        returns a path of `exclude` (the sample itself) or one it returned before."""
        taken: set[Path] = set(exclude)
        cursors: dict[int | None, int] = defaultdict(int)

        def next_from(queue: list[Sample], key: int | None) -> Sample | None:
            while cursors[key] < len(queue):
                candidate = queue[cursors[key]]
                cursors[key] += 1
                if candidate.path not in taken:
                    taken.add(candidate.path)
                    return candidate
            return None

        def pick(unreadable: Sample) -> Sample | None:
            same_class = self.by_class.get(unreadable.label) if unreadable.label is not None else None
            return (same_class and next_from(same_class, unreadable.label)) or next_from(self.order, None)

        return pick


__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "LAYOUT_FLAT_LABELS",
    "LAYOUT_UNLABELED",
    "LAYOUT_WNID_FOLDERS",
    "LAYOUT_WNID_PREFIXED",
    "ImageDataset",
    "Sample",
    "Spares",
    "discover_dataset",
    "is_image_file",
    "select_samples",
    "select_with_spares",
]
