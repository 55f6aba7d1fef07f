"""BatchStream (ordering, skipping, bounded prefetch, shutdown) and ImageCalibrationReader."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnxruntime.quantization import CalibrationDataReader

import calibration.preprocess
from calibration import (
    BatchStream,
    DatasetError,
    ImageCalibrationReader,
    PreprocessSpec,
    RqInputError,
    Sample,
    Spares,
)
from calibration.loader import THREAD_NAME_PREFIX, pad_batch
from calibration.progress import ProgressCallbacks
from tests.helpers.calib_images import write_rgb, write_text_as_image, write_truncated_jpeg, write_zero_byte

SMALL = PreprocessSpec(resize=16, crop=16)


def make_samples(folder: Path, n: int, size=(20, 18)) -> list[Sample]:
    return [Sample(write_rgb(folder / f"img_{i:03d}.png", size=size, seed=i), i % 1000) for i in range(n)]


def decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME_PREFIX) and t.is_alive()]


def wait_for_no_decode_threads(timeout: float = 3.0) -> list[threading.Thread]:
    deadline = time.monotonic() + timeout
    while decode_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return decode_threads()


# -- BatchStream ---------------------------------------------------------------------------------


def test_batches_in_order(tmp_path):
    samples = make_samples(tmp_path, 10)
    samples[3] = Sample(samples[3].path, None)
    seen: list[int] = []
    stream = BatchStream(
        samples, SMALL, batch_size=4, workers=3, progress=ProgressCallbacks(on_advance=seen.append)
    )
    batches = list(stream)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [p for b in batches for p in b.paths] == [s.path for s in samples]
    assert batches[0].images.shape == (4, 3, 16, 16) and batches[0].images.dtype == np.float32
    assert batches[0].labels.dtype == np.int64
    assert batches[0].labels.tolist() == [0, 1, 2, -1]
    for b in batches:  # each image equals a direct load_image call
        for img, p in zip(b.images, b.paths, strict=True):
            np.testing.assert_array_equal(img, calibration.preprocess.load_image(p, SMALL))
    assert stream.used == 10 and stream.skipped == [] and len(stream) == 10 and stream.num_batches == 3
    assert seen == [4, 4, 2]


def test_nhwc_and_workers_do_not_change_results(tmp_path):
    samples = make_samples(tmp_path, 7)
    spec = SMALL.with_overrides(layout="NHWC")
    one = [b.images for b in BatchStream(samples, spec, batch_size=3, workers=1)]
    many = [b.images for b in BatchStream(samples, spec, batch_size=3, workers=4, prefetch_batches=0)]
    assert one[0].shape == (3, 16, 16, 3)
    for a, b in zip(one, many, strict=True):
        np.testing.assert_array_equal(a, b)


def test_corrupt_files_are_skipped_and_recorded(tmp_path):
    good = make_samples(tmp_path, 5)
    bad = [
        Sample(write_truncated_jpeg(tmp_path / "trunc.JPEG"), 1),
        Sample(write_zero_byte(tmp_path / "zero.JPEG"), 2),
        Sample(write_text_as_image(tmp_path / "text.JPEG"), 3),
    ]
    # Batch 2 (samples 3..5) is entirely bad: it must vanish, not come out empty.
    samples = [*good[:3], *bad, *good[3:]]
    progress: list[int] = []
    stream = BatchStream(
        samples, SMALL, batch_size=3, workers=2, progress=ProgressCallbacks(on_advance=progress.append)
    )
    batches = list(stream)
    assert all(len(b) > 0 for b in batches)
    assert [len(b) for b in batches] == [3, 2]
    assert stream.used == 5 and sum(progress) == 8
    assert [p for p, _ in stream.skipped] == [s.path for s in bad]
    reasons = [r for _, r in stream.skipped]
    assert "truncated" in reasons[0] and "empty" in reasons[1] and "not an image" in reasons[2]
    assert all("\n" not in r for r in reasons)


def test_unreadable_images_are_replaced_in_their_batch_by_spares(tmp_path):
    images = make_samples(tmp_path, 9)
    bad = [
        Sample(write_truncated_jpeg(tmp_path / "trunc.JPEG"), 1),
        Sample(write_zero_byte(tmp_path / "zero.JPEG"), 2),
    ]
    spare_bad = Sample(write_text_as_image(tmp_path / "text.JPEG"), 3)
    samples = [images[0], bad[0], images[1], images[2], bad[1], images[3]]
    # The first spare is unreadable too: the next one is drawn for the same image. A spare that is one of the
    # samples (images[1]) is never drawn.
    spares = Spares([spare_bad, images[1], images[4], images[5]], labelled=False)
    progress: list[int] = []
    stream = BatchStream(
        samples,
        SMALL,
        batch_size=2,
        workers=2,
        spares=spares,
        progress=ProgressCallbacks(on_advance=progress.append),
    )
    batches = list(stream)
    # Each replacement takes its unreadable image's place: as many batches, as full, as with readable images.
    assert [[p.name for p in b.paths] for b in batches] == [
        ["img_000.png", "img_004.png"],
        ["img_001.png", "img_002.png"],
        ["img_005.png", "img_003.png"],
    ]
    assert stream.used == len(samples) == sum(len(b) for b in batches) and sum(progress) == len(samples)
    assert [p for p, _ in stream.skipped] == [bad[0].path, spare_bad.path, bad[1].path]
    assert stream.replaced == [(bad[0].path, images[4].path), (bad[1].path, images[5].path)]
    # A second pass reads the same images in the same order.
    assert [b.paths for b in stream] == [b.paths for b in batches]


def test_replacements_stop_when_the_spares_run_out(tmp_path):
    good = make_samples(tmp_path, 3)
    samples = [
        good[0],
        Sample(write_zero_byte(tmp_path / "z1.jpg"), 1),
        Sample(write_zero_byte(tmp_path / "z2.jpg"), 2),
    ]
    stream = BatchStream(samples, SMALL, batch_size=3, spares=Spares([good[1]], labelled=False))
    assert [len(b) for b in stream] == [2]
    assert (
        stream.used == 2 and len(stream.skipped) == 2 and stream.replaced == [(samples[1].path, good[1].path)]
    )


def test_a_folder_nothing_can_decode_fails_after_as_many_spares_as_samples(tmp_path):
    samples = [Sample(write_zero_byte(tmp_path / f"z{i}.jpg"), None) for i in range(3)]
    spares = [Sample(write_zero_byte(tmp_path / f"spare{i}.jpg"), None) for i in range(20)]
    tried: list[Path] = []
    stream = BatchStream(samples, SMALL, batch_size=2, spares=Spares(spares, labelled=False))
    real = stream._decode
    stream._decode = lambda path: (tried.append(path), real(path))[1]
    with pytest.raises(DatasetError) as e:
        list(stream)
    assert str(e.value).startswith("none of the 3 images could be decoded, nor 3 spare image(s) (e.g. ")
    assert len(tried) == 6


def test_everything_corrupt_raises(tmp_path):
    samples = [Sample(write_zero_byte(tmp_path / f"z{i}.jpg"), None) for i in range(3)]
    stream = BatchStream(samples, SMALL, batch_size=2)
    with pytest.raises(DatasetError) as e:
        list(stream)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("none of the 3 images could be decoded")
    assert "z0.jpg" in msg and "empty" in msg
    assert wait_for_no_decode_threads() == []


def test_argument_validation(tmp_path):
    samples = make_samples(tmp_path, 1)
    for kwargs in ({"batch_size": 0}, {"batch_size": -1}, {"workers": 0}, {"prefetch_batches": -1}):
        with pytest.raises(RqInputError) as e:
            BatchStream(samples, SMALL, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(DatasetError):
        list(BatchStream([], SMALL))


def test_prefetch_is_bounded(tmp_path, monkeypatch):
    """With a slow consumer, decoding never runs more than a couple of batches ahead."""
    samples = [Sample(tmp_path / f"fake_{i}.jpg", None) for i in range(60)]
    lock = threading.Lock()
    state = {"decoded": 0, "consumed": 0, "max_ahead": 0}

    def fake_load(path, spec):
        with lock:
            state["decoded"] += 1
            state["max_ahead"] = max(state["max_ahead"], state["decoded"] - state["consumed"])
        return np.zeros(spec.input_shape(1)[1:], np.float32)

    monkeypatch.setattr(calibration.preprocess, "load_image", fake_load)
    batch_size, prefetch = 3, 2
    stream = BatchStream(samples, SMALL, batch_size=batch_size, workers=4, prefetch_batches=prefetch)
    for batch in stream:
        time.sleep(0.01)  # slow consumer: workers have every chance to run ahead
        with lock:
            state["consumed"] += len(batch)
            state["max_ahead"] = max(state["max_ahead"], state["decoded"] - state["consumed"])
    assert state["decoded"] == 60 == stream.used
    assert state["max_ahead"] <= batch_size * (prefetch + 2), state
    assert state["max_ahead"] >= batch_size  # it does decode ahead


def test_early_break_cancels_and_stops_threads(tmp_path, monkeypatch):
    calls = []

    def slow_load(path, spec):
        calls.append(path)
        time.sleep(0.02)
        return np.zeros(spec.input_shape(1)[1:], np.float32)

    monkeypatch.setattr(calibration.preprocess, "load_image", slow_load)
    samples = [Sample(tmp_path / f"fake_{i}.jpg", None) for i in range(200)]

    # 1) break out of a for loop
    stream = BatchStream(samples, SMALL, batch_size=4, workers=4)
    for _ in stream:
        break
    assert wait_for_no_decode_threads() == []
    assert len(calls) <= 4 * 4, len(calls)  # pending decodes were cancelled, not run

    # 2) explicit close() while the consumer still holds the iterator
    it = iter(stream)
    next(it)
    assert decode_threads()
    stream.close()
    assert wait_for_no_decode_threads() == []
    with pytest.raises(StopIteration):
        next(it)

    # 3) an exception (e.g. KeyboardInterrupt) in the consumer, inside a with block
    with pytest.raises(KeyboardInterrupt), BatchStream(samples, SMALL, batch_size=4, workers=4) as s2:
        for _ in s2:
            raise KeyboardInterrupt
    assert wait_for_no_decode_threads() == []


def test_iterating_again_restarts(tmp_path):
    samples = make_samples(tmp_path, 5)
    samples.append(Sample(write_zero_byte(tmp_path / "z.png"), None))
    stream = BatchStream(samples, SMALL, batch_size=2)
    first = [b.paths for b in stream]
    second = [b.paths for b in stream]
    assert first == second and stream.used == 5 and len(stream.skipped) == 1


# -- reader --------------------------------------------------------------------------------------


def relu_model(path: Path) -> Path:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3, 224, 224])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["output"])], "relu", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_reader_feeds_onnxruntime(tmp_path):
    samples = make_samples(tmp_path / "img", 7, size=(260, 240))
    samples.append(Sample(write_truncated_jpeg(tmp_path / "img" / "bad.jpg"), None))
    stream = BatchStream(samples, PreprocessSpec(), batch_size=3, workers=2)
    reader = ImageCalibrationReader(stream, "input")
    assert isinstance(reader, CalibrationDataReader) and len(reader) == 3
    session = ort.InferenceSession(
        str(relu_model(tmp_path / "relu.onnx")), providers=["CPUExecutionProvider"]
    )

    def drain() -> list[int]:
        sizes = []
        while (feed := reader.get_next()) is not None:
            assert list(feed) == ["input"]
            (out,) = session.run(None, feed)
            np.testing.assert_array_equal(out, np.maximum(feed["input"], 0))
            sizes.append(out.shape[0])
        return sizes

    assert drain() == [3, 3, 1]
    assert reader.used == 7 and [p.name for p, _ in reader.skipped] == ["bad.jpg"]
    assert reader.get_next() is None  # stays exhausted until rewind
    reader.rewind()
    assert drain() == [3, 3, 1]
    reader.rewind()
    assert reader.get_next() is not None
    reader.close()
    assert wait_for_no_decode_threads() == []


def test_reader_drives_quantize_static(tmp_path):
    """End to end on a 1-conv model: onnxruntime's static quantizer consumes the reader."""
    from onnxruntime.quantization import QuantType, quantize_static

    rng = np.random.default_rng(0)
    w = helper.make_tensor(
        "w", TensorProto.FLOAT, [4, 3, 1, 1], rng.normal(size=12).astype(np.float32).tolist()
    )
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, 32, 32])
    graph = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["output"])], "conv", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "conv.onnx")

    samples = make_samples(tmp_path / "img", 6, size=(40, 36))
    reader = ImageCalibrationReader(
        BatchStream(samples, PreprocessSpec(resize=36, crop=32), batch_size=4), "input"
    )
    quantize_static(
        str(tmp_path / "conv.onnx"),
        str(tmp_path / "conv.int8.onnx"),
        reader,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    assert reader.used == 6
    q = onnx.load(tmp_path / "conv.int8.onnx")
    assert any(n.op_type in ("QuantizeLinear", "QLinearConv") for n in q.graph.node)


def test_reader_argument_validation(tmp_path):
    stream = BatchStream(make_samples(tmp_path, 1), SMALL)
    with pytest.raises(RqInputError):
        ImageCalibrationReader(stream, "")
    with pytest.raises(RqInputError):
        ImageCalibrationReader([], "input")  # type: ignore[arg-type]
    for bad in (0, -1, 2.0, True):
        with pytest.raises(RqInputError, match="fixed_batch must be a positive integer"):
            ImageCalibrationReader(stream, "input", fixed_batch=bad)


def test_reader_pads_the_short_last_batch_of_a_fixed_batch_model(tmp_path):
    stream = BatchStream(make_samples(tmp_path, 6), SMALL, batch_size=4, workers=1)
    reader = ImageCalibrationReader(stream, "input", fixed_batch=4)
    first, last = reader.get_next()["input"], reader.get_next()["input"]
    assert reader.get_next() is None and reader.used == 6
    assert first.shape[0] == last.shape[0] == 4
    np.testing.assert_array_equal(last[2], last[1])  # images 5 and 6, then image 6 repeated
    np.testing.assert_array_equal(last[3], last[1])
    reader.close()


def test_pad_batch_repeats_the_last_image_up_to_a_fixed_batch():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    padded = pad_batch(x, 4)
    np.testing.assert_array_equal(padded, x[[0, 1, 1, 1]])
    assert pad_batch(x, 2) is x
    with pytest.raises(ValueError, match="cannot pad 2 images to a batch of 1"):
        pad_batch(x, 1)
