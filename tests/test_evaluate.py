"""`quantize.measure.evaluate.evaluate` on tiny models whose answer is known in advance.

The "one-hot" models ignore their input: ``input → ReduceMean → Flatten → Mul 0 → Add <constant row>``, so
every image gets the same logits and the top-1 / top-5 sets are fixed by construction. With images of two
classes in wnid folders, top-1 is exactly the share of images of the predicted class. The builders are in
tests/helpers/onehot.py, shared with the other test files of the validate/sweep/tune/inspect features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calibration import discover_dataset
from calibration.errors import RqInputError
from calibration.progress import ProgressCallbacks
from quantize.measure.evaluate import evaluate, require_labels
from quantize.measure.validate import validation_samples
from tests.helpers.calib_images import make_class_folders, write_rgb, write_truncated_jpeg
from tests.helpers.onehot import J, K, onehot_model, onehot_row, wnid
from tests.helpers.tiny_models import SMALL_SPEC, bad_output_rank, tiny_cnn

# Classes of the two-class validation folder: K (6 images) and J (2 images).
N_K, N_J = 6, 2


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-val")
    make_class_folders(root, {wnid(K): N_K, wnid(J): N_J}, size=(40, 36))
    return root


@pytest.fixture(scope="module")
def samples(val_dir):
    _dataset, chosen = validation_samples(val_dir, None, None)
    return chosen


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("eval-models")
    others = [11, 12, 13, 14]
    return {
        # top-1 K; top-5 {K, 11..14}: J is outside the top 5
        "k": onehot_model(d / "k.onnx", onehot_row(1000, [K, *others])),
        # top-1 J; top-5 {J, 11, 12, K, 13}: K is inside the top 5 at rank 4
        "j_then_k": onehot_model(d / "j.onnx", onehot_row(1000, [J, 11, 12, K, 13])),
        # top-1 11 (neither class); top-5 {11, 12, 13, 14, 15}
        "other": onehot_model(d / "other.onnx", onehot_row(1000, [11, 12, 13, 14, 15])),
        # 1001 outputs, background first and *largest*: it must be dropped, then class K wins
        "bg": onehot_model(
            d / "bg.onnx", np.concatenate([[100.0], onehot_row(1000, [K, *others])]).astype(np.float32)
        ),
    }


def test_top1_is_the_share_of_the_predicted_class(models, samples):
    run = evaluate([models["k"], models["j_then_k"], models["other"]], samples, SMALL_SPEC, batch_size=3)
    k, j, other = run.models
    n = N_K + N_J
    assert run.images == n
    assert k.top1 == pytest.approx(100.0 * N_K / n)
    assert j.top1 == pytest.approx(100.0 * N_J / n)
    assert other.top1 == 0.0
    assert (k.predictions == K).all() and (j.predictions == J).all()
    # per-image correctness follows the labels, image by image
    assert (k.correct_top1 == (run.labels == K)).all()
    assert (j.correct_top1 == (run.labels == J)).all()


def test_top5_sets(models, samples):
    run = evaluate([models["k"], models["j_then_k"], models["other"]], samples, SMALL_SPEC, batch_size=5)
    k, j, other = run.models
    n = N_K + N_J
    assert k.top5 == pytest.approx(100.0 * N_K / n)  # J is not among k's top 5
    assert j.top5 == 100.0  # both J and K are among its top 5
    assert other.top5 == 0.0
    assert (j.correct_top5 & ~j.correct_top1).sum() == N_K  # right in top-5 only: the K images


def test_labels_come_from_the_wnid_not_the_folder_position(samples):
    assert sorted({s.label for s in samples}) == [K, J]


def test_1001_outputs_background_first(models, samples):
    run = evaluate([models["bg"], models["k"]], samples, SMALL_SPEC)
    bg, k = run.models
    assert bg.label_offset == 1 and k.label_offset == 0
    assert (bg.predictions == K).all()
    assert bg.top1 == k.top1 == pytest.approx(100.0 * N_K / (N_K + N_J))
    assert bg.to_dict()["label_offset"] == 1
    assert any("1001" in note and "background" in note for note in run.notes)


def test_1000_outputs_have_no_background_note(models, samples):
    run = evaluate([models["k"]], samples, SMALL_SPEC)
    assert run.notes == []


def test_output_not_n_by_classes(tmp_path, samples):
    with pytest.raises(RqInputError, match=r"expected \[N, classes\]"):
        evaluate([bad_output_rank(tmp_path / "fmap.onnx")], samples, SMALL_SPEC)


def test_not_an_imagenet_classifier(tmp_path, samples):
    with pytest.raises(RqInputError, match="10 output classes"):
        evaluate([tiny_cnn(tmp_path / "ten.onnx")], samples, SMALL_SPEC)


def test_missing_model(tmp_path, samples):
    with pytest.raises(RqInputError, match="model not found"):
        evaluate([tmp_path / "nope.onnx"], samples, SMALL_SPEC)


@pytest.mark.parametrize("batch", [0, -1])
def test_batch_below_one(models, samples, batch):
    with pytest.raises(RqInputError, match="--batch must be"):
        evaluate([models["k"]], samples, SMALL_SPEC, batch_size=batch)


def test_no_models(samples):
    with pytest.raises(RqInputError, match="no model"):
        evaluate([], samples, SMALL_SPEC)


def _flat_with_partial_labels(tmp_path: Path) -> tuple[Path, Path]:
    flat = tmp_path / "flat"
    for i in range(5):
        write_rgb(flat / f"ILSVRC2012_val_{i + 1:08d}.JPEG", size=(40, 36), seed=i)
    labels = tmp_path / "val.txt"
    # only 3 of the 5 images are listed
    labels.write_text("".join(f"ILSVRC2012_val_{i + 1:08d}.JPEG {K}\n" for i in range(3)))
    return flat, labels


def test_labels_file_missing_some_images_says_how_many(tmp_path):
    flat, labels = _flat_with_partial_labels(tmp_path)
    with pytest.raises(RqInputError, match="labels are missing for 2 of 5 images"):
        validation_samples(flat, labels, None)


def test_evaluate_refuses_samples_without_labels(tmp_path, models):
    """evaluate() itself must not count an unlabelled image as a wrong prediction (tuning calls it directly)."""
    flat, labels = _flat_with_partial_labels(tmp_path)
    dataset = discover_dataset(flat, labels)
    with pytest.raises(RqInputError, match="2 of 5"):
        evaluate([models["k"]], dataset.samples, SMALL_SPEC)


def test_folder_without_labels(tmp_path):
    flat = tmp_path / "unlabelled"
    for i in range(3):
        write_rgb(flat / f"photo_{i}.png", size=(40, 36), seed=i)
    with pytest.raises(RqInputError, match="has no labels"):
        validation_samples(flat, None, None)
    dataset = discover_dataset(flat)
    with pytest.raises(RqInputError, match="has no labels"):
        require_labels(dataset, dataset.samples)


def test_limit_takes_a_deterministic_subset(val_dir):
    _d, a = validation_samples(val_dir, None, 4)
    _d, b = validation_samples(val_dir, None, 4)
    assert len(a) == 4 and a == b


def test_two_models_same_batches_equal_lengths(tmp_path, models):
    """Both models see the same decoded batches: one unreadable image is skipped for both alike."""
    root = tmp_path / "val"
    make_class_folders(root, {wnid(K): 4, wnid(J): 3}, size=(40, 36))
    write_truncated_jpeg(root / wnid(J) / "broken.JPEG")
    _dataset, chosen = validation_samples(root, None, None)
    seen = []
    run = evaluate(
        [models["k"], models["j_then_k"]],
        chosen,
        SMALL_SPEC,
        batch_size=3,
        progress=ProgressCallbacks(on_advance=seen.append),
    )
    a, b = run.models
    assert len(run.skipped) == 1 and run.skipped[0][0].name == "broken.JPEG"
    assert run.images == 7 == len(run.paths) == len(run.labels)
    for m in (a, b):
        assert len(m.predictions) == len(m.correct_top1) == len(m.correct_top5) == run.images
    assert sum(seen) == 8  # progress counts every sample, the skipped one included
    assert a.top1 == pytest.approx(100 * 4 / 7) and b.top1 == pytest.approx(100 * 3 / 7)
    data = run.to_dict()
    assert data["images"] == 7 and len(data["models"]) == 2 and len(data["skipped"]) == 1


@pytest.mark.parametrize("limit", [0, -3])
def test_limit_below_one_is_an_error(val_dir, limit):
    """`--limit 0` / `--val-limit 0` must not silently mean "every image"."""
    with pytest.raises(RqInputError, match="limit"):
        validation_samples(val_dir, None, limit)
