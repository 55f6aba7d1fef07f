"""Stage 2, calibrate: ranges computed by streaming batches through ORT's calibrators."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from tiny_models import random_inputs

from calibration.errors import RqInputError
from quantize.calibrate import CalibrationRanges, calibrate, calibrator_options
from quantize.prepare import prepare_model
from quantize.recipe import QuantRecipe

N_IMAGES = 48
BATCH = 8


@pytest.fixture(scope="module")
def prepared(tiny_model, tmp_path_factory):
    return prepare_model(tiny_model, tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return random_inputs(N_IMAGES, seed=7)


def batches_of(x: np.ndarray, size: int):
    for i in range(0, len(x), size):
        yield x[i : i + size]


def run_calibration(prepared, x, recipe, workdir: Path, size: int = BATCH, **kwargs) -> CalibrationRanges:
    workdir.mkdir(exist_ok=True)
    return calibrate(
        prepared.path, prepared.signature.input_name, batches_of(x, size), recipe, workdir, **kwargs
    )


def observed_ranges(model_path: Path, names, x: np.ndarray) -> dict[str, tuple[float, float]]:
    """True min/max of `names`, computed independently: expose them as graph outputs and run ORT ourselves."""
    model = onnx.load(str(model_path))
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = list(names)
    values = session.run(wanted, {session.get_inputs()[0].name: x})
    return {n: (float(v.min()), float(v.max())) for n, v in zip(wanted, values, strict=True)}


@pytest.fixture(scope="module")
def minmax(prepared, images, tmp_path_factory) -> CalibrationRanges:
    return run_calibration(prepared, images, QuantRecipe(calibration="minmax"), tmp_path_factory.mktemp("mm"))


@pytest.fixture(scope="module")
def entropy(prepared, images, tmp_path_factory) -> CalibrationRanges:
    # The default 2048 bins (a few seconds on the tiny model: ORT's KL search is pure Python).
    return run_calibration(
        prepared, images, QuantRecipe(calibration="entropy"), tmp_path_factory.mktemp("en")
    )


def test_minmax_equals_true_activation_ranges(prepared, images, minmax):
    ranges = minmax.ranges()
    assert minmax.method == "minmax"
    assert (minmax.batches, minmax.images) == (N_IMAGES // BATCH, N_IMAGES)
    # Inputs and outputs of the Conv/Gemm nodes are calibrated, the model input among them.
    assert {"input", "logits"} <= set(ranges)
    assert ranges["input"] == pytest.approx((float(images.min()), float(images.max())), abs=1e-6)
    truth = observed_ranges(prepared.path, ranges, images)
    for name, (low, high) in ranges.items():
        assert isinstance(low, float) and isinstance(high, float)
        assert (low, high) == pytest.approx(truth[name], abs=1e-5), name


def test_ranges_are_plain_floats(minmax, entropy):
    """ranges() reads ORT's shape-(1,) MinMax arrays as well as the histogram methods' scalars."""
    for result in (minmax, entropy):
        for low, high in result.ranges().values():
            assert type(low) is float and type(high) is float and low <= high


def test_entropy_is_really_entropy(prepared, images, minmax, entropy):
    mm, en = minmax.ranges(), entropy.ranges()
    assert entropy.method == "entropy" and set(en) == set(mm)
    truth = observed_ranges(prepared.path, en, images)
    for name, (low, high) in en.items():
        seen_low, seen_high = truth[name]
        assert seen_low - 1e-5 <= low <= high <= seen_high + 1e-5, name
    # KL divergence clips long tails: at least one range is clearly narrower than MinMax's.
    narrower = [n for n in en if en[n][1] - en[n][0] < 0.9 * (mm[n][1] - mm[n][0])]
    assert narrower, f"entropy ranges {en} equal MinMax {mm}"
    # ReLU outputs keep a lower bound of 0 (observed), not the symmetric -t of ORT's KL search.
    assert en["relu1_out"][0] == pytest.approx(0.0, abs=1e-6)


def test_entropy_with_orts_128_bins_degenerates_to_minmax(prepared, images, minmax, tmp_path):
    """Why rq does not calibrate entropy through quantize_static: with 128 bins (and all data in one
    histogram, as quantize_static collects it) the KL search has a single candidate, the full range."""
    recipe = QuantRecipe(calibration="entropy", num_bins=128)
    coarse = run_calibration(prepared, images, recipe, tmp_path, size=N_IMAGES)
    mm = minmax.ranges()
    for name, (low, high) in coarse.ranges().items():
        assert (low, high) == pytest.approx(mm[name], rel=1e-4, abs=1e-5), name


def test_percentile_within_observed(prepared, images, minmax, tmp_path):
    result = run_calibration(
        prepared, images, QuantRecipe(calibration="percentile", percentile=99.0), tmp_path
    )
    mm = minmax.ranges()
    pc = result.ranges()
    assert set(pc) == set(mm)
    for name, (low, high) in pc.items():
        assert mm[name][0] - 1e-5 <= low <= high <= mm[name][1] + 1e-5, name
    assert any(pc[n][1] - pc[n][0] < 0.95 * (mm[n][1] - mm[n][0]) for n in pc)


def test_streaming_gives_the_same_minmax_ranges(prepared, images, minmax, tmp_path):
    recipe = QuantRecipe(calibration="minmax")
    seen: list[int] = []
    one_at_a_time = run_calibration(prepared, images, recipe, tmp_path / "a", on_batch=seen.append)
    assert seen == [BATCH] * 6 and one_at_a_time.batches == 6
    one_big = run_calibration(prepared, images, recipe, tmp_path / "b", size=N_IMAGES)
    assert one_big.batches == 1 and one_big.images == N_IMAGES
    assert one_at_a_time.ranges() == one_big.ranges()
    assert one_big.ranges() == minmax.ranges()


def test_streaming_consumes_batches_lazily(prepared, images, tmp_path):
    """The calibrator pulls one batch at a time from the iterable (it never lists them all first)."""
    pulled: list[int] = []

    def gen():
        for i, batch in enumerate(batches_of(images, BATCH)):
            pulled.append(i)
            yield batch

    done: list[int] = []

    def on_batch(n: int) -> None:
        done.append(n)
        assert len(pulled) == len(done)  # batch k was processed before batch k+1 was asked for

    calibrate(prepared.path, "input", gen(), QuantRecipe(calibration="minmax"), tmp_path, on_batch=on_batch)
    assert len(done) == 6


def test_zero_batches(prepared, tmp_path):
    with pytest.raises(RqInputError, match="no images") as info:
        calibrate(prepared.path, "input", iter(()), QuantRecipe(calibration="minmax"), tmp_path)
    assert "\n" not in str(info.value)


def test_calibrator_options():
    assert calibrator_options(QuantRecipe(calibration="minmax")) == {
        "symmetric": False,
        "moving_average": False,
    }
    assert calibrator_options(QuantRecipe(calibration="entropy")) == {
        "num_bins": 2048,
        "num_quantized_bins": 128,
        "symmetric": False,
    }
    assert calibrator_options(QuantRecipe(calibration="percentile", percentile=99.9, num_bins=1024)) == {
        "num_bins": 1024,
        "percentile": 99.9,
        "symmetric": False,
    }
