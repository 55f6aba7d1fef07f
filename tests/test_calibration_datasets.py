"""discover_dataset layouts, labels files, errors, and select_samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from calibration import (
    LAYOUT_FLAT_LABELS,
    LAYOUT_UNLABELED,
    LAYOUT_WNID_FOLDERS,
    LAYOUT_WNID_PREFIXED,
    DatasetError,
    ImageDataset,
    Sample,
    discover_dataset,
    select_samples,
    select_with_spares,
    wnid_to_index,
)
from tests.helpers.calib_images import IMAGENET, make_class_folders, write_rgb


def assert_one_line_error(func, *args, match: str | None = None, **kwargs) -> str:
    with pytest.raises(DatasetError) as e:
        func(*args, **kwargs)
    msg = str(e.value)
    assert msg and "\n" not in msg, repr(msg)
    if match is not None:
        assert match in msg, msg
    return msg


def write_flat_val(folder: Path, n: int = 4) -> list[Path]:
    return [
        write_rgb(folder / f"ILSVRC2012_val_{i:08d}.JPEG", size=(24, 20), seed=i) for i in range(1, n + 1)
    ]


# -- layouts -------------------------------------------------------------------------------------


def test_wnid_folders_use_canonical_index_not_folder_position(tmp_path):
    # Only 3 of the 1000 classes: folder positions would be 0, 1, 2, but the labels must be the
    # synset indices.
    make_class_folders(tmp_path, {"n01443537": 2, "n15075141": 3, "n02119789": 1})
    ds = discover_dataset(tmp_path)
    assert ds.layout == LAYOUT_WNID_FOLDERS
    assert ds.labels_source == "folder names"
    assert len(ds.samples) == 6 and ds.labelled and ds.num_classes_present == 3
    by_folder = {s.path.parent.name: s.label for s in ds.samples}
    assert by_folder == {"n01443537": 1, "n15075141": 999, "n02119789": wnid_to_index()["n02119789"]}
    assert [s.path for s in ds.samples] == sorted(s.path for s in ds.samples)
    assert any("3 classes" in n for n in ds.notes)


def test_extensions_case_insensitive_hidden_and_other_files_ignored(tmp_path):
    folder = tmp_path / "n01440764"
    for name in ("a.JpG", "b.PNG", "c.jpeg", "d.bmp", "e.webp", "f.tif", "g.TIFF", "h.ppm", "i.gif"):
        write_rgb(folder / name, size=(8, 8))
    (folder / "notes.txt").write_text("x")
    (folder / "labels.csv").write_text("x")
    write_rgb(folder / ".hidden.jpg", size=(8, 8))
    ds = discover_dataset(tmp_path)
    assert [s.path.name for s in ds.samples] == [
        "a.JpG",
        "b.PNG",
        "c.jpeg",
        "d.bmp",
        "e.webp",
        "f.tif",
        "g.TIFF",
        "h.ppm",
        "i.gif",
    ]
    assert {s.label for s in ds.samples} == {0}


def test_empty_class_folder_and_non_image_subfolder_are_notes(tmp_path):
    make_class_folders(tmp_path, {"n01440764": 2})
    (tmp_path / "n01443537").mkdir()
    (tmp_path / "cache").mkdir()
    ds = discover_dataset(tmp_path)
    assert ds.layout == LAYOUT_WNID_FOLDERS and len(ds.samples) == 2
    assert any("without images" in n and "n01443537" in n for n in ds.notes)
    assert any("cache" in n for n in ds.notes)


def test_flat_with_caffe_val_txt(tmp_path):
    images = tmp_path / "images"
    write_flat_val(images, 4)
    labels = tmp_path / "val.txt"
    # Image 4 is not listed: not an error at discovery, label None plus a note.
    labels.write_text(
        "ILSVRC2012_val_00000001.JPEG 65\nILSVRC2012_val_00000002.JPEG 970\n\n"
        "ILSVRC2012_val_00000003.JPEG 0\nILSVRC2012_val_00000099.JPEG 999\n"
    )
    ds = discover_dataset(images, labels=labels)
    assert ds.layout == LAYOUT_FLAT_LABELS
    assert [s.label for s in ds.samples] == [65, 970, 0, None]
    assert not ds.labelled and ds.num_classes_present == 3
    assert ds.labels_source == str(labels)
    assert "labels missing for 1 of 4 images" in ds.notes


def test_flat_with_kaggle_loc_val_solution_csv(tmp_path):
    images = tmp_path / "images"
    write_flat_val(images, 3)
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000002,n02119789 255 142 454 329 n02119789 44 21 322 295\n"
        "ILSVRC2012_val_00000001,n01751748 111 47 368 407\n"
        "ILSVRC2012_val_00000003,n15075141 1 2 3 4\n"
    )
    ds = discover_dataset(images, labels=labels)
    idx = wnid_to_index()
    assert ds.layout == LAYOUT_FLAT_LABELS and ds.labelled
    assert [s.label for s in ds.samples] == [idx["n01751748"], idx["n02119789"], 999]
    assert any("Kaggle" in n for n in ds.notes)


def test_val_txt_may_give_wnids_and_match_other_extensions(tmp_path):
    images = tmp_path / "images"
    write_rgb(images / "ILSVRC2012_val_00000001.png", size=(8, 8))
    labels = tmp_path / "val.txt"
    labels.write_text("ILSVRC2012_val_00000001.JPEG n01443537\n")
    ds = discover_dataset(images, labels=labels)
    assert [s.label for s in ds.samples] == [1]


def test_wnid_prefixed(tmp_path):
    write_rgb(tmp_path / "n01440764_tench.JPEG", size=(8, 8))
    write_rgb(tmp_path / "n15075141_toilet_tissue.JPEG", size=(8, 8))
    write_rgb(tmp_path / "n01443537_goldfish.jpg", size=(8, 8))
    ds = discover_dataset(tmp_path)
    assert ds.layout == LAYOUT_WNID_PREFIXED and ds.labelled
    assert {s.path.name: s.label for s in ds.samples} == {
        "n01440764_tench.JPEG": 0,
        "n01443537_goldfish.jpg": 1,
        "n15075141_toilet_tissue.JPEG": 999,
    }


def test_unlabeled_plain_folder(tmp_path):
    write_rgb(tmp_path / "cat.jpg", size=(8, 8))
    write_rgb(tmp_path / "dog.png", size=(8, 8))
    ds = discover_dataset(tmp_path)
    assert ds.layout == LAYOUT_UNLABELED and ds.labels_source is None
    assert [s.label for s in ds.samples] == [None, None]
    assert not ds.labelled and ds.num_classes_present == 0


def test_ilsvrc_names_without_labels_suggest_labels_option(tmp_path):
    write_flat_val(tmp_path, 2)
    ds = discover_dataset(tmp_path)
    assert ds.layout == LAYOUT_UNLABELED
    assert any("--labels" in n for n in ds.notes)


def test_labels_file_for_class_folders_wins_and_counts_disagreements(tmp_path):
    folder = tmp_path / "val"
    write_rgb(folder / "n01440764" / "ILSVRC2012_val_00000001.JPEG", size=(8, 8))
    write_rgb(folder / "n01440764" / "ILSVRC2012_val_00000002.JPEG", size=(8, 8))
    write_rgb(folder / "n01443537" / "ILSVRC2012_val_00000003.JPEG", size=(8, 8))
    labels = tmp_path / "val.txt"
    labels.write_text("ILSVRC2012_val_00000001.JPEG 0\nILSVRC2012_val_00000002.JPEG 5\n")
    ds = discover_dataset(folder, labels=labels)
    assert ds.layout == LAYOUT_WNID_FOLDERS and ds.labels_source == str(labels)
    assert [s.label for s in ds.samples] == [0, 5, 1]  # file, file (disagrees), folder (not in file)
    assert any("disagrees" in n and "1 of 3" in n for n in ds.notes)
    assert any("no entry for 1 of 3" in n for n in ds.notes)


# -- errors --------------------------------------------------------------------------------------


def test_error_missing_and_not_a_folder(tmp_path):
    assert_one_line_error(discover_dataset, tmp_path / "nope", match="not found")
    f = write_rgb(tmp_path / "x.jpg", size=(8, 8))
    assert_one_line_error(discover_dataset, f, match="not a folder")


def test_error_no_images(tmp_path):
    assert_one_line_error(discover_dataset, tmp_path, match="empty")
    for name in ("a.txt", "b.csv", "c.json"):
        (tmp_path / name).write_text("x")
    msg = assert_one_line_error(discover_dataset, tmp_path, match="found 3 non-image files")
    assert "no images" in msg


def test_error_points_to_subfolder_with_class_folders(tmp_path):
    make_class_folders(tmp_path / "val", {"n01440764": 1})
    msg = assert_one_line_error(discover_dataset, tmp_path, match="did you mean")
    assert str(tmp_path / "val") in msg


def test_error_unknown_wnid_folder(tmp_path):
    make_class_folders(tmp_path, {"n01440764": 1, "n99999999": 1})
    assert_one_line_error(discover_dataset, tmp_path, match="n99999999")


def test_error_non_wnid_subfolder_with_images(tmp_path):
    make_class_folders(tmp_path, {"n01440764": 1})
    write_rgb(tmp_path / "cats" / "c.jpg", size=(8, 8))
    assert_one_line_error(discover_dataset, tmp_path, match="'cats'")


def test_subfolders_that_are_not_class_ids_are_unlabelled_images(tmp_path):
    """cats/ and dogs/ (no wnid among them): calibration images without labels, not an error."""
    write_rgb(tmp_path / "cats" / "c1.jpg", size=(8, 8))
    write_rgb(tmp_path / "cats" / "c2.png", size=(8, 8))
    write_rgb(tmp_path / "dogs" / "d1.jpg", size=(8, 8))
    (tmp_path / "aaa-empty").mkdir()  # listed first, but not the example: it holds no image
    ds = discover_dataset(tmp_path)
    assert ds.layout == "unlabeled" and len(ds) == 3 and not ds.labelled
    assert any("not ImageNet class ids" in n and "'cats'" in n for n in ds.notes)
    # a labels file labels them by file name
    (tmp_path.parent / "lab.txt").write_text("c1.jpg 5\nd1.jpg 7\n")
    labelled = discover_dataset(tmp_path, tmp_path.parent / "lab.txt")
    assert {s.path.name: s.label for s in labelled.samples} == {"c1.jpg": 5, "c2.png": None, "d1.jpg": 7}


def test_broken_links_are_counted_in_the_notes(tmp_path):
    make_class_folders(tmp_path, {"n01440764": 2})
    (tmp_path / "n01440764" / "gone.JPEG").symlink_to(tmp_path / "nowhere.JPEG")
    ds = discover_dataset(tmp_path)
    assert len(ds) == 2
    assert "skipped 1 broken link(s) (e.g. n01440764/gone.JPEG)" in ds.notes
    # a class folder of broken links only is counted too; a folder of nothing else is one line naming them
    (tmp_path / "n01443537").mkdir()
    (tmp_path / "n01443537" / "lost.JPEG").symlink_to(tmp_path / "unmounted" / "lost.JPEG")
    assert "skipped 2 broken link(s) (e.g. n01440764/gone.JPEG)" in discover_dataset(tmp_path).notes
    dead = tmp_path / "dead"
    dead.mkdir()
    (dead / "a.jpg").symlink_to(tmp_path / "unmounted" / "a.jpg")
    assert_one_line_error(discover_dataset, dead, match="only 1 broken link")


def test_error_mixed_flat_and_subfolders(tmp_path):
    make_class_folders(tmp_path, {"n01440764": 1})
    write_rgb(tmp_path / "loose.jpg", size=(8, 8))
    assert_one_line_error(discover_dataset, tmp_path, match="n01440764")


def test_error_unknown_wnid_prefix(tmp_path):
    write_rgb(tmp_path / "n01440764_a.jpg", size=(8, 8))
    write_rgb(tmp_path / "n00000001_b.jpg", size=(8, 8))
    assert_one_line_error(discover_dataset, tmp_path, match="n00000001")


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        (None, "val.txt", "not found"),
        ("", "val.txt", "empty"),
        ("ILSVRC2012_val_00000001.JPEG 65\nILSVRC2012_val_00000002.JPEG\n", "val.txt", "line 2: expected"),
        ("ILSVRC2012_val_00000001.JPEG sixty\n", "val.txt", "line 1: expected"),
        ("ILSVRC2012_val_00000001.JPEG 1000\n", "val.txt", "out of range 0..999"),
        ("ILSVRC2012_val_00000001.JPEG -1\n", "val.txt", "out of range 0..999"),
        ("ILSVRC2012_val_00000001.JPEG n99999999\n", "val.txt", "unknown wnid n99999999"),
        ("a.JPEG 1\nb.JPEG 2\na.JPEG 3\n", "val.txt", "line 3"),
        ("ImageId,PredictionString\nILSVRC2012_val_00000001,n77777777 1 2 3 4\n", "s.csv", "unknown wnid"),
        ("ImageId,PredictionString\nILSVRC2012_val_00000001,1 2 3 4\n", "s.csv", "line 2: expected"),
        ("ImageId,PredictionString\nILSVRC2012_val_00000001\n", "s.csv", "line 2"),
        ("ImageId,PredictionString\n", "s.csv", "no labels"),
    ],
)
def test_labels_file_errors(tmp_path, content, name, match):
    images = tmp_path / "images"
    write_flat_val(images, 1)
    labels = tmp_path / name
    if content is not None:
        labels.write_text(content)
    msg = assert_one_line_error(discover_dataset, images, labels=labels, match=match)
    assert name in msg


def test_labels_file_is_a_folder_or_binary(tmp_path):
    images = tmp_path / "images"
    write_flat_val(images, 1)
    assert_one_line_error(discover_dataset, images, labels=images, match="not a file")
    binary = tmp_path / "val.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81\x82")
    assert_one_line_error(discover_dataset, images, labels=binary, match="text")


# -- select_samples ------------------------------------------------------------------------------


def _synthetic(classes: int, per_class: int, labelled: bool = True) -> ImageDataset:
    samples = [
        Sample(Path(f"/d/n{c:08d}/img_{i:03d}.jpg"), c if labelled else None)
        for c in range(classes)
        for i in range(per_class)
    ]
    return ImageDataset(Path("/d"), "wnid-folders", samples, "folder names" if labelled else None, [])


def test_select_all_and_more_than_all():
    ds = _synthetic(3, 4)
    assert select_samples(ds, None) == ds.samples
    assert select_samples(ds, 12) == ds.samples == select_samples(ds, 1000, seed=5)


def test_select_deterministic_and_seeded():
    ds = _synthetic(20, 10)
    a = select_samples(ds, 50, seed=0)
    assert a == select_samples(ds, 50, seed=0)
    assert a != select_samples(ds, 50, seed=1)
    assert len(a) == 50 and len(set(a)) == 50
    # Independent of the order samples were listed in.
    shuffled = ImageDataset(ds.root, ds.layout, list(reversed(ds.samples)), ds.labels_source, [])
    assert select_samples(shuffled, 50, seed=0) == a


def test_select_stratified():
    ds = _synthetic(20, 10)
    one_each = select_samples(ds, 20, seed=3)
    assert sorted(s.label for s in one_each) == list(range(20))
    counts: dict[int, int] = {}
    for s in select_samples(ds, 45, seed=3):
        counts[s.label] = counts.get(s.label, 0) + 1
    assert set(counts.values()) == {2, 3}  # as even as possible
    # Uneven classes: the small class is exhausted and the rest fill in.
    uneven = ImageDataset(Path("/d"), "wnid-folders", [*_synthetic(2, 10).samples[:11]], "x", [])
    chosen = select_samples(uneven, 6)
    assert sorted(s.label for s in chosen) == [0, 0, 0, 0, 0, 1]


def test_select_unlabeled_random_sample():
    ds = _synthetic(1, 100, labelled=False)
    a = select_samples(ds, 10, seed=0)
    assert len(set(a)) == 10 and a == select_samples(ds, 10, seed=0) != select_samples(ds, 10, seed=1)


def test_spares_are_the_rest_in_the_order_larger_selections_take():
    ds = _synthetic(6, 5)
    chosen, spares = select_with_spares(ds, 8, seed=2)
    assert chosen == select_samples(ds, 8, seed=2)
    # A larger selection extends the same order: the spares are what it would add.
    assert len(chosen) + len(spares) == 30
    assert select_samples(ds, 13, seed=2) == chosen + spares.order[:5]
    assert select_samples(ds, 29, seed=2) == chosen + spares.order[:21]
    assert not {s.path for s in chosen} & {s.path for s in spares.order}
    everything, none = select_with_spares(ds, None)
    assert everything == sorted(ds.samples, key=lambda s: str(s.path)) and len(none) == 0
    assert none.picker()(everything[0]) is None


def test_spares_replace_within_the_class_then_from_the_order():
    # Class 0 has 3 images, class 1 has 1: one image each is chosen.
    samples = [*_synthetic(1, 3).samples, Sample(Path("/d/n00000001/img_000.jpg"), 1)]
    ds = ImageDataset(Path("/d"), "wnid-folders", samples, "folder names", [])
    chosen, spares = select_with_spares(ds, 2, seed=0)
    assert sorted(s.label for s in chosen) == [0, 1]
    first_zero = next(s for s in chosen if s.label == 0)
    only_one = next(s for s in chosen if s.label == 1)
    pick = spares.picker()
    a = pick(first_zero)
    b = pick(only_one)  # class 1 has no other image: the next spare of any class
    c = pick(a)
    assert a.label == 0 and b.label == 0 and c is None  # class 0's two spares, then nothing left
    assert len({a.path, b.path, first_zero.path}) == 3
    # Every pass starts afresh: the same unreadable images get the same replacements.
    again = spares.picker()
    assert again(first_zero) == a and again(only_one) == b


def test_spares_of_an_unlabelled_selection():
    ds = _synthetic(1, 20, labelled=False)
    chosen, spares = select_with_spares(ds, 5, seed=1)
    assert chosen == select_samples(ds, 5, seed=1) and len(spares) == 15
    pick = spares.picker()
    drawn = [pick(chosen[0]) for _ in range(15)]
    assert {s.path for s in drawn} == {s.path for s in spares.order} and pick(chosen[0]) is None
    assert spares.order == select_with_spares(ds, 5, seed=1)[1].order


@pytest.mark.parametrize("n", [0, -3])
def test_select_rejects_non_positive(n):
    assert_one_line_error(select_samples, _synthetic(2, 2), n)


# -- real data -----------------------------------------------------------------------------------


@pytest.mark.skipif(not (IMAGENET / "val").is_dir(), reason="shared ImageNet val subset not present")
def test_real_imagenet_val_subset():
    ds = discover_dataset(IMAGENET / "val")
    assert ds.layout == LAYOUT_WNID_FOLDERS
    assert len(ds.samples) == 1300 and ds.num_classes_present == 725 and ds.labelled
    truth = {}
    with (IMAGENET / "val.txt").open() as f:
        for line in f:
            name, idx = line.split()
            truth[name] = int(idx)
    for s in ds.samples[:: len(ds.samples) // 10][:10]:
        assert s.label == truth[s.path.name], s.path
