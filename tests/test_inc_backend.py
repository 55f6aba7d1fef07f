"""Stage 3, quantize with Intel Neural Compressor: config mapping, quantization, tuning, workspace hygiene.

Needs the `inc` extra (neural-compressor 3.7.1, numpy < 2): run with the INC virtual environment, e.g.
`.venv-inc/bin/python -m pytest tests/test_inc_backend.py`. Skipped where neural-compressor is missing.
"""

from __future__ import annotations

import random
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from calibration.progress import ProgressCallbacks

pytest.importorskip("neural_compressor")

from calibration.errors import RqInputError
from quantize.backends.inc import (
    INC_INSTALL_HINT,
    IncCalibrationLoader,
    fp32_candidates,
    is_quantized,
    quantize_with_inc,
    recipe_to_inc_config,
    require_inc,
)
from quantize.backends.ort import count_quantized
from quantize.graph.prepare import prepare_model
from quantize.recipe import QuantRecipe
from tests.helpers.tiny_models import random_inputs

pytestmark = pytest.mark.inc

CALIB = random_inputs(16, seed=21)
TEST = random_inputs(8, seed=22)  # not the calibration inputs
BATCH = 4
RECIPE = QuantRecipe(
    backend="inc",
    calibration="minmax",
    samples=len(CALIB),
    reduce_range=False,
    op_types=("Conv", "Gemm", "MatMul"),
    bias_correction=False,  # what the pipeline hands INC (see quantize_model)
)


def batches():
    for start in range(0, len(CALIB), BATCH):
        yield CALIB[start : start + BATCH]


def run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def tiny_prepared(tiny_model, tmp_path_factory):
    return prepare_model(tiny_model, tmp_path_factory.mktemp("tiny-prepared"))


def quantize(prepared, tmp_path, recipe=RECIPE, **kwargs):
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    out = tmp_path / "int8.onnx"
    outcome = quantize_with_inc(prepared.path, batches, recipe, out, workdir, batch_size=BATCH, **kwargs)
    return outcome, onnx.load(str(out))


# --- config mapping (no quantization run) -----------------------------------------------------------------


def test_config_maps_recipe():
    notes: list[str] = []
    recipe = RECIPE.with_changes(
        format="qoperator", per_channel=False, calibration="percentile", exclude_nodes=("a.b/c",)
    )
    conf = recipe_to_inc_config(recipe, tune=False, max_drop_pt=None, max_trials=5, timeout_s=0, notes=notes)
    assert conf.quant_format == "default"
    assert conf.calibration_sampling_size == [len(CALIB)]
    assert conf.reduce_range is False
    conv = conf.op_type_dict["Conv"]
    assert conv["weight"] == {"dtype": ["int8"], "granularity": ["per_tensor"]}
    assert conv["activation"] == {"dtype": ["uint8"], "algorithm": ["percentile"]}
    assert conf.op_type_dict["Relu"]["activation"]["dtype"] == ["fp32"]  # not in op_types: stays FP32
    assert conf.op_name_dict == {
        r"a\.b/c": {"weight": {"dtype": ["fp32"]}, "activation": {"dtype": ["fp32"]}}
    }
    assert any("Gemm" in n and "minmax" in n for n in notes)  # INC calibrates Gemm with minmax only


def test_config_tuning_criterion():
    conf = recipe_to_inc_config(RECIPE, tune=True, max_drop_pt=0.5, max_trials=7, timeout_s=30)
    assert conf.quant_format == "QDQ"
    assert conf.accuracy_criterion.criterion == "absolute"
    assert conf.accuracy_criterion.tolerable_loss == pytest.approx(0.005)
    assert conf.accuracy_criterion.higher_is_better is True
    assert conf.tuning_criterion.strategy == "basic"
    assert conf.tuning_criterion.max_trials == 7
    assert conf.tuning_criterion.timeout == 30


def test_placement_from_the_graph_maps_to_conv_gemm_matmul():
    notes: list[str] = []
    conf = recipe_to_inc_config(
        RECIPE.with_changes(op_types=None, bias_correction=True),
        tune=False,
        max_drop_pt=None,
        max_trials=1,
        timeout_s=0,
        notes=notes,
    )
    assert conf.op_type_dict["Relu"]["activation"]["dtype"] == ["fp32"]
    assert conf.op_type_dict["Conv"]["weight"]["dtype"] == ["int8"]
    assert conf.op_type_dict["Gemm"]["activation"]["dtype"] == ["uint8"]
    assert any("placement from the graph" in n for n in notes)
    assert any("not bias-corrected" in n for n in notes)  # on by default: INC runs without it, and says so


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"activation_type": "int8"}, "uint8"),
        ({"weight_type": "uint8"}, "int8"),
        ({"op_types": ("Conv", "BatchNormalization")}, "BatchNormalization"),
        ({"calibration": "percentile", "percentile": 99.9}, "99.999"),
        ({"calibration": "entropy", "num_bins": 512}, "128"),
        ({"op_types": ("Gemm",), "calibration": "entropy"}, "minmax"),
        ({"calibration": "mse"}, "mse"),
        ({"calibration": "mean-minmax"}, "mean-minmax"),
    ],
)
def test_config_refuses_what_inc_cannot_do(changes, words):
    with pytest.raises(RqInputError, match=words) as info:
        recipe_to_inc_config(
            RECIPE.with_changes(**changes), tune=False, max_drop_pt=None, max_trials=1, timeout_s=0
        )
    assert "\n" not in str(info.value)


def test_loader_fresh_pass_and_close():
    closed = []

    class Stream:
        def __iter__(self):
            yield from batches()

        def close(self):
            closed.append(True)

    loader = IncCalibrationLoader(Stream, BATCH)
    assert loader.batch_size == BATCH
    for _ in range(2):
        items = list(loader)
        assert len(items) == len(CALIB) // BATCH
        assert all(labels is None and images.dtype == np.float32 for images, labels in items)
    first = next(iter(loader))  # an abandoned pass still releases its stream
    del first
    assert loader.passes == 3
    assert len(closed) >= 2


# --- quantization -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_quantizes_tiny_cnn(tiny_prepared, tmp_path, fmt):
    np.random.seed(123)
    random.seed(123)
    recipe = RECIPE.with_changes(format=fmt)
    outcome, int8 = quantize(tiny_prepared, tmp_path, recipe)
    assert outcome.goal_met is None and outcome.trials == [] and outcome.fallback_nodes == []
    ops = count_quantized(onnx.load(str(tiny_prepared.path)), int8, recipe)
    assert ops.by_type["Conv"][0] > 0 and ops.by_type["Gemm"] == [1, 1]
    # Only the recipe's op types are quantized: Relu and GlobalAveragePool stay float.
    assert not any(n.op_type.startswith("QLinear") and n.op_type != "QLinearConv" for n in int8.graph.node)
    assert cosine(run(outcome.output, TEST), run(tiny_prepared.path, TEST)).min() > 0.9
    # INC seeds the global generators; rq gives them back untouched.
    assert np.random.random() == np.random.RandomState(123).random_sample()
    assert random.random() == random.Random(123).random()


def test_op_types_and_exclusions(tiny_prepared, tmp_path):
    recipe = RECIPE.with_changes(op_types=("Conv", "Gemm"), exclude_nodes=("fc",))
    outcome, int8 = quantize(tiny_prepared, tmp_path, recipe)
    ops = count_quantized(onnx.load(str(tiny_prepared.path)), int8, recipe)
    assert ops.by_type["Conv"][0] == ops.by_type["Conv"][1] and ops.by_type["Gemm"] == [0, 1]
    assert outcome.fallback_nodes == []  # an excluded node is not a fallback


def test_v2_opset7_through_prepare(v2_model, tmp_path):
    prepared = prepare_model(v2_model, tmp_path)
    outcome, int8 = quantize(prepared, tmp_path)
    ops = count_quantized(onnx.load(str(prepared.path)), int8, RECIPE)
    assert ops.quantized > 0
    out = run(outcome.output, TEST)
    assert out.shape == (len(TEST), 10) and np.isfinite(out).all()
    assert cosine(out, run(v2_model, TEST)).min() > 0.9


def test_cwd_stays_clean(tiny_prepared, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    outcome, _ = quantize(tiny_prepared, tmp_path)  # workdir and output outside the cwd
    assert list(cwd.iterdir()) == []
    assert (tmp_path / "work" / "inc-workspace").is_dir()
    assert outcome.output.is_file()


# --- tuning -----------------------------------------------------------------------------------------------


class FakeEval:
    """Top-1 by rule: 100 % for the FP32 model, `quantized` for any quantized one; may raise on a call."""

    def __init__(self, quantized=50.0, raise_on_call=None, rule=None):
        self.quantized = quantized
        self.raise_on_call = raise_on_call
        self.rule = rule
        self.calls = 0

    def __call__(self, path):
        self.calls += 1
        model = onnx.load(str(path))
        if self.calls == self.raise_on_call:
            raise RuntimeError("evaluation exploded")
        if not is_quantized(model):
            return 100.0
        return self.rule(model) if self.rule else self.quantized


def test_tuning_goal_not_met_writes_best(tiny_prepared, tmp_path):
    messages: list[str] = []
    outcome, _ = quantize(
        tiny_prepared,
        tmp_path,
        eval_func=FakeEval(),
        max_drop_pt=1.0,
        max_trials=3,
        progress=ProgressCallbacks(on_note=messages.append),
    )
    assert outcome.goal_met is False
    assert outcome.baseline_accuracy == 100.0
    assert outcome.best_accuracy == 50.0
    assert 1 <= len(outcome.trials) <= 3
    assert outcome.trials[0] == {
        "trial": 1,
        "accuracy": 50.0,
        "drop_pt": 50.0,
        "fp32_nodes": [],
        "error": None,
    }
    assert any("no configuration within 1 pt" in n and "trial 1" in n for n in outcome.notes)
    assert run(outcome.output, TEST).shape == (len(TEST), 10)
    assert is_quantized(onnx.load(str(outcome.output)))
    assert any(m.startswith("FP32 baseline") for m in messages)
    assert not (tmp_path / "work" / "inc-best.onnx").exists()


def test_tuning_trial_error_is_recorded_and_tuning_goes_on(tiny_prepared, tmp_path):
    messages: list[str] = []
    evaluator = FakeEval(raise_on_call=3)  # call 1 = FP32 baseline, call 3 = the second quantized trial
    outcome, _ = quantize(
        tiny_prepared,
        tmp_path,
        eval_func=evaluator,
        max_drop_pt=1.0,
        max_trials=4,
        progress=ProgressCallbacks(on_note=messages.append),
    )
    failed = [t for t in outcome.trials if t["error"] and "exploded" in t["error"]]
    assert len(failed) == 1 and failed[0]["accuracy"] is None
    assert any(m == f"trial {failed[0]['trial']} failed: RuntimeError: evaluation exploded" for m in messages)
    assert outcome.trials[-1]["trial"] > failed[0]["trial"]  # INC went on after the failure
    assert outcome.goal_met is False and outcome.output.is_file()


def test_tuning_falls_back_until_goal_met(tiny_prepared, tmp_path):
    # Quantizing the classifier head costs 10 points; everything else is free.
    def rule(model):
        return 99.6 if "fc" in fp32_candidates(model, ("Gemm",)) else 90.0

    outcome, int8 = quantize(
        tiny_prepared, tmp_path, eval_func=FakeEval(rule=rule), max_drop_pt=0.4, max_trials=10
    )
    assert outcome.goal_met is True
    assert outcome.best_accuracy == pytest.approx(99.6)
    assert outcome.fallback_nodes == ["fc"]
    assert outcome.notes == []
    ops = count_quantized(onnx.load(str(tiny_prepared.path)), int8, RECIPE)
    assert ops.by_type["Conv"][0] > 0 and ops.by_type["Gemm"][0] == 0


def test_tuning_baseline_failure_is_one_line(tiny_prepared, tmp_path):
    with pytest.raises(RqInputError, match="could not evaluate the FP32 model") as info:
        quantize(tiny_prepared, tmp_path, eval_func=FakeEval(raise_on_call=1), max_drop_pt=1.0, max_trials=2)
    assert "\n" not in str(info.value)


# --- missing INC ------------------------------------------------------------------------------------------


def test_require_inc_missing(monkeypatch):
    assert require_inc()  # the version
    monkeypatch.setitem(sys.modules, "neural_compressor", None)  # `import neural_compressor` now fails
    with pytest.raises(RqInputError) as info:
        require_inc()
    message = str(info.value)
    assert INC_INSTALL_HINT in message and "--backend inc" in message
    assert "numpy<2" in message and "\n" not in message
