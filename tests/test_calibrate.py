"""Stage 2, calibrate: ranges computed by streaming batches through ORT's calibrators."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from calibration.errors import RqInputError
from calibration.progress import ProgressCallbacks
from quantize.calibrate import CalibrationRanges, calibrate, calibrator_options
from quantize.graph.prepare import prepare_model
from quantize.recipe import QuantRecipe
from tests.helpers.tiny_models import random_inputs

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
    one_at_a_time = run_calibration(
        prepared, images, recipe, tmp_path / "a", progress=ProgressCallbacks(on_advance=seen.append)
    )
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

    calibrate(
        prepared.path,
        "input",
        gen(),
        QuantRecipe(calibration="minmax"),
        tmp_path,
        progress=ProgressCallbacks(on_advance=on_batch),
    )
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


def _one_conv(path: Path) -> Path:
    """input [N,1,2,2] → 1×1 Conv (weight 1, bias 0) → Relu → Flatten: every tensor is the input, then ≥ 0."""
    inits = [
        onnx.numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w"),
        onnx.numpy_helper.from_array(np.zeros(1, np.float32), "b"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w", "b"], ["conv_out"], name="conv"),
            helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"),
            helper.make_node("Flatten", ["relu_out"], ["logits"], name="flatten"),
        ],
        "one_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), str(path))
    return path


def test_mean_minmax_is_the_mean_of_per_batch_extremes(tmp_path):
    model = _one_conv(tmp_path / "one.onnx")
    batches = [
        np.array([[[[-1.0, 0.0], [0.5, 1.0]]]], np.float32),  # min −1, max 1
        np.array([[[[-3.0, 0.0], [2.0, 3.0]]]], np.float32),  # min −3, max 3
        np.array([[[[0.0, 0.0], [1.0, 5.0]]]], np.float32),  # min 0, max 5
    ]
    mean = calibrate(model, "input", iter(batches), QuantRecipe(calibration="mean-minmax"), tmp_path).ranges()
    assert mean["input"] == pytest.approx((-4 / 3, 3.0))
    assert mean["relu_out"] == pytest.approx((0.0, 3.0))
    plain = calibrate(model, "input", iter(batches), QuantRecipe(calibration="minmax"), tmp_path).ranges()
    assert plain["input"] == pytest.approx((-3.0, 5.0))


def test_mse_range_clips_a_lone_outlier_and_keeps_a_plain_range():
    from quantize.calibrate import mse_range

    rng = np.random.default_rng(0)
    values = rng.uniform(0, 1, 1_000_000)
    hist, edges = np.histogram(np.append(values, 10.0), 2048, range=(-10, 10))
    low, high = mse_range(hist, edges, 0.0, 10.0)
    # Error of [0, h]: (10 − h)² for the outlier + 1e6·(h/255)²/12 for rounding the rest, minimal at
    # h = 10 / (1 + 1e6/(255²·12)) ≈ 4.38: the grid point 4.4 (s = 0.44), not the full 10.
    assert low == 0.0 and high == pytest.approx(4.4)
    # A lone outlier among few values costs more clipped than the rounding it saves: it is kept.
    hist, edges = np.histogram(np.append(values[:1000], 10.0), 2048, range=(-10, 10))
    assert mse_range(hist, edges, 0.0, 10.0) == pytest.approx((0.0, 10.0))


def test_mse_calibration_streams_and_stays_inside_the_observed_range(tmp_path):
    model = _one_conv(tmp_path / "one.onnx")
    rng = np.random.default_rng(1)
    batches = [rng.normal(0, 1, (4, 1, 2, 2)).astype(np.float32) for _ in range(5)]
    ranges = calibrate(model, "input", iter(batches), QuantRecipe(calibration="mse"), tmp_path).ranges()
    low, high = ranges["input"]
    observed = np.concatenate([b.ravel() for b in batches])
    assert observed.min() <= low < 0 < high <= observed.max()
    assert high >= np.percentile(observed, 90) and low <= np.percentile(observed, 10)
