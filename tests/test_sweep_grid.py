"""The sweep grids' content: the default grid varies placement, bias correction and the range estimator, and
only ever names recipes the installed QuantRecipe accepts."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest

from calibration.errors import RqInputError
from quantize.recipe import QuantRecipe
from quantize.sweep import GRIDS, LEGACY_OP_TYPES, grid_recipes, supported_axes, unsupported_values
from tests.helpers.cpu import x86_cpu

CPU = x86_cpu("avx512_vnni")
NEW_METHODS = ("minmax", "entropy", "percentile", "mean-minmax", "mse")


@dataclass(frozen=True)
class PlacementRecipe(QuantRecipe):
    """A recipe with the fields of issue 7's contract (op_types None = graph placement, bias_correction, the
    two new range estimators), validated like the real one for those fields only."""

    op_types: tuple[str, ...] | None = None
    bias_correction: bool = False

    def __post_init__(self) -> None:
        if self.calibration not in NEW_METHODS:
            raise RqInputError(f"calibration must be one of {NEW_METHODS}")
        if self.op_types is not None and not self.op_types:
            raise RqInputError("op_types must name at least one operator type")
        if not isinstance(self.bias_correction, bool):
            raise RqInputError("bias_correction must be true or false")

    def label(self) -> str:
        return (
            super().label()
            + ("-ops" if self.op_types is not None else "")
            + ("-bc" if self.bias_correction else "")
        )


def test_default_grid_names_the_dimensions_that_matter():
    axes = GRIDS["default"]
    assert axes["op_types"] == (None, LEGACY_OP_TYPES)
    assert axes["bias_correction"] == (True, False)
    assert axes["calibration"] == ("percentile", "mean-minmax", "mse")
    assert (
        "reduce_range" not in axes and "per_channel" not in axes
    )  # the old default grid's axes moved to "weights"
    assert GRIDS["weights"] == {"per_channel": (True, False), "reduce_range": (False, True)}


def test_default_grid_on_a_recipe_with_the_contract_fields_is_the_full_product():
    base = PlacementRecipe(reduce_range=False)
    recipes = grid_recipes("default", base, CPU)
    assert len(recipes) == 2 * 2 * 3
    combos = {(r.op_types, r.bias_correction, r.calibration) for r in recipes}
    assert combos == set(
        itertools.product((None, LEGACY_OP_TYPES), (True, False), ("percentile", "mean-minmax", "mse"))
    )
    assert len({r.label() for r in recipes}) == 12  # distinct names in the report
    assert all(r.per_channel and r.reduce_range is False for r in recipes)


def test_grid_keeps_only_values_the_installed_recipe_accepts():
    """Before placement/bias correction/new estimators exist, the grid must not build invalid recipes."""
    base = QuantRecipe()
    axes = supported_axes("default", base)
    for key, values in axes.items():
        assert set(values) <= set(GRIDS["default"][key])
        for value in values:
            base.with_changes(**{key: value})  # each accepted value builds a valid recipe
    recipes = grid_recipes("default", base, CPU)
    expected = 1
    for values in axes.values():
        expected *= len(values)
    assert len(recipes) == expected
    field_names = {f for f in QuantRecipe.__dataclass_fields__}
    if {"bias_correction", "op_types"} <= field_names and "mse" in supported_axes("ranges", base).get(
        "calibration", ()
    ):
        assert len(recipes) == 12


def test_full_grid_adds_the_weight_axes():
    base = PlacementRecipe(reduce_range=False)
    recipes = grid_recipes("full", base, CPU)
    assert len(recipes) == 2 * 2 * 2 * 2 * 5
    assert {(r.per_channel, r.reduce_range) for r in recipes} == set(
        itertools.product((True, False), repeat=2)
    )


def test_unknown_grid_is_an_input_error():
    with pytest.raises(RqInputError, match="unknown grid 'nope'"):
        grid_recipes("nope", QuantRecipe(), CPU)


def test_pareto_fronts_on_top1_and_on_agreement():
    from quantize.report.data import mark_pareto

    def v(name, kind, top1, speed, agreement=None):
        drop = None if agreement is None else {"agreement_pct": agreement}
        return {
            "name": name,
            "kind": kind,
            "accuracy": {"top1": top1},
            "bench": {"8": {"ratio_to_fp32": speed}},
            "drop": drop,
            "pareto": None,
        }

    variants = [
        v("FP32", "fp32", 80.0, 1.0),
        v("a", "int8", 80.1, 2.0, agreement=96.0),  # best top-1 of the INT8 ones (lucky flips)
        v("b", "int8", 79.9, 2.0, agreement=98.5),  # same speed, more faithful
        v("c", "int8", 79.0, 2.5, agreement=95.0),
    ]
    mark_pareto(variants)
    assert [x["pareto"] for x in variants] == [False, True, False, True]
    assert [x["pareto_agreement"] for x in variants] == [True, False, True, True]


def test_unsupported_values_are_named():
    assert unsupported_values("default", PlacementRecipe(reduce_range=False)) == ""
    text = unsupported_values("ranges", PlacementRecipe(calibration="minmax"))
    assert text == ""
    if "mse" not in supported_axes("ranges", QuantRecipe()).get("calibration", ()):
        assert "mse" in unsupported_values("default", QuantRecipe())


def test_pareto_front_with_several_runtimes_uses_one_speed_axis():
    """Each runtime's same-runtime ratio has its own FP32 baseline: the front compares the speedups against
    ONNX Runtime's FP32, as the plot draws them (an OpenVINO INT8 at equal top-1 but faster wins)."""
    from quantize.report.data import mark_pareto

    def v(name, kind, runtime, top1, own, vs_ort):
        figures = {"ratio_to_fp32": own, "ratio_to_ort_fp32": vs_ort, "runtime": runtime}
        return {
            "name": name,
            "kind": kind,
            "runtime": runtime,
            "accuracy": {"top1": top1},
            "bench": {"1": figures},
            "drop": None,
            "pareto": None,
        }

    variants = [
        v("FP32", "fp32", "ort", 81.25, 1.0, 1.0),
        v("INT8", "int8", "ort", 81.25, 3.29, 3.29),
        v("FP32 · openvino", "fp32", "openvino", 81.25, 1.0, 1.12),
        v("INT8 · openvino", "int8", "openvino", 81.25, 3.27, 3.67),
    ]
    mark_pareto(variants)
    assert [x["pareto"] for x in variants] == [False, False, False, True]


def test_sweep_help_names_every_grid(cli):
    from quantize.sweep import GRIDS

    text = " ".join(cli("sweep", "--help").stdout.split())
    assert all(name in text for name in GRIDS), text
    assert "ranges, weights" in text
