"""QuantRecipe: defaults, validation, JSON round trip, digest and label."""

from __future__ import annotations

import json

import pytest

from calibration.errors import RqInputError
from quantize.recipe import DEFAULT_BINS, LEGACY_OP_TYPES, RECIPE_VERSION, QuantRecipe


def test_defaults():
    r = QuantRecipe()
    assert r.backend == "ort"
    assert r.format == "qdq"
    assert (r.activation_type, r.weight_type) == ("uint8", "int8")
    assert r.per_channel is True
    assert r.reduce_range is None  # decided from the CPU later
    assert r.calibration == "percentile" and r.percentile == 99.999
    assert r.bins == DEFAULT_BINS["percentile"] == 2048
    assert (r.samples, r.seed, r.batch_size) == (100, 0, 8)
    assert r.op_types is None  # placement decided from the graph (quantize.graph.placement)
    assert r.bias_correction is True
    assert r.exclude_nodes == ()
    assert r.version == RECIPE_VERSION == 2


def test_version_1_recipe_is_converted():
    """A version-1 file meant Conv/Gemm/MatMul when it named no op types, and had no bias correction."""
    old = QuantRecipe.from_dict({"version": 1, "calibration": "minmax"})
    assert old.version == 2 and old.op_types == LEGACY_OP_TYPES and old.bias_correction is False
    named = QuantRecipe.from_dict({"version": 1, "op_types": ["Conv"]})
    assert named.op_types == ("Conv",)


def test_op_type_ort_cannot_quantize_is_named():
    with pytest.raises(RqInputError, match=r"cannot quantize op type\(s\) BatchNormalization, Foo"):
        QuantRecipe(op_types=("Conv", "BatchNormalization", "Foo"))


def test_bins_per_method():
    assert QuantRecipe(calibration="minmax").bins is None
    assert QuantRecipe(calibration="mean-minmax").bins is None
    assert QuantRecipe(calibration="mse").bins == 2048
    assert QuantRecipe(calibration="entropy").bins == 2048  # not ORT's 128, which degenerates to MinMax
    assert QuantRecipe(calibration="entropy", num_bins=512).bins == 512


@pytest.mark.parametrize(
    "recipe",
    [
        QuantRecipe(),
        QuantRecipe(
            format="qoperator",
            activation_type="int8",
            per_channel=False,
            reduce_range=True,
            calibration="entropy",
            num_bins=1024,
            samples=7,
            seed=3,
            batch_size=2,
            op_types=["Conv", "MatMul"],  # a list is normalised to a tuple
            exclude_nodes=["fc"],
        ),
        QuantRecipe(reduce_range=False, calibration="minmax"),
    ],
)
def test_json_round_trip(recipe):
    text = recipe.to_json()
    assert json.loads(text) == recipe.to_dict()
    back = QuantRecipe.from_json(text)
    assert back == recipe
    assert back.digest() == recipe.digest()
    assert (back.op_types is None or isinstance(back.op_types, tuple)) and isinstance(
        back.exclude_nodes, tuple
    )
    assert QuantRecipe.from_dict(recipe.to_dict()) == recipe
    hash(back)  # frozen and tuple-valued: usable as a cache key


def test_from_dict_unknown_key():
    with pytest.raises(RqInputError, match=r"unknown recipe field.*colour"):
        QuantRecipe.from_dict({"format": "qdq", "colour": "blue"})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("{not json", "not valid JSON"), ("[1, 2]", "must be an object")],
)
def test_from_json_bad_text(text, fragment):
    with pytest.raises(RqInputError, match=fragment) as info:
        QuantRecipe.from_json(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"backend": "tensorrt"}, "backend"),
        ({"format": "qlinear"}, "format"),
        ({"activation_type": "int4"}, "activation type"),
        ({"weight_type": "float16"}, "weight type"),
        # onnxruntime's quantize_static refuses this pair (after the whole calibration): refuse it up front
        ({"activation_type": "int8", "weight_type": "uint8"}, "int8 activations with uint8 weights"),
        ({"calibration": "kl"}, "calibration"),
        ({"percentile": 0.0}, "percentile"),
        ({"percentile": 100.5}, "percentile"),
        ({"percentile": float("nan")}, "percentile"),
        ({"num_bins": 64}, "num_bins"),
        ({"samples": 0}, "samples"),
        ({"batch_size": 0}, "batch size"),
        ({"op_types": ()}, "op_types"),
        ({"version": 3}, "version"),
        ({"num_bins": 512, "calibration": "mean-minmax"}, "bins"),
        ({"bias_correction": "yes"}, "bias_correction"),
        # Wrong types, as a hand-written recipe JSON may hold them: one-line RqInputError, never a TypeError
        # (an internal error) and never a silently mangled recipe.
        ({"samples": "100"}, "samples"),
        ({"samples": True}, "samples"),
        ({"samples": 1.5}, "samples"),
        ({"batch_size": None}, "batch_size"),
        ({"percentile": "99"}, "percentile"),
        ({"per_channel": "yes"}, "per_channel"),
        ({"reduce_range": "false"}, "reduce_range"),
        ({"op_types": "Conv"}, "op_types"),  # would become ('C', 'o', 'n', 'v')
        ({"op_types": [1]}, "op_types"),
        ({"exclude_nodes": "conv1"}, "exclude_nodes"),
        ({"format": None}, "format"),
    ],
)
def test_invalid_values(changes, fragment):
    with pytest.raises(RqInputError, match=fragment) as info:
        QuantRecipe(**changes)
    assert "\n" not in str(info.value)
    # The same through JSON, where such values come from.
    if all(isinstance(v, str | int | float | list | tuple | type(None)) for v in changes.values()):
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()}
        with pytest.raises(RqInputError):
            QuantRecipe.from_json(json.dumps(data))


def test_with_changes_validates():
    with pytest.raises(RqInputError):
        QuantRecipe().with_changes(calibration="kl")
    assert QuantRecipe().with_changes(per_channel=False).per_channel is False


def test_integer_percentile_is_the_same_recipe():
    assert QuantRecipe(percentile=99) == QuantRecipe(percentile=99.0)
    assert QuantRecipe(percentile=99).digest() == QuantRecipe(percentile=99.0).digest()


def test_digest_stable_and_sensitive():
    base = QuantRecipe()
    assert base.digest() == QuantRecipe().digest()
    assert len(base.digest()) == 12 and int(base.digest(), 16) >= 0
    assert QuantRecipe(op_types=["Conv", "Gemm", "MatMul"]).digest() != base.digest()  # an override
    variants = [
        base.with_changes(op_types=("Conv", "Gemm", "MatMul")),
        base.with_changes(bias_correction=not base.bias_correction),
        base.with_changes(calibration="mse"),
        base.with_changes(calibration="mean-minmax"),
        base.with_changes(format="qoperator"),
        base.with_changes(per_channel=False),
        base.with_changes(reduce_range=True),
        base.with_changes(reduce_range=False),
        base.with_changes(calibration="minmax"),
        base.with_changes(percentile=99.99),
        base.with_changes(seed=1),
        base.with_changes(samples=50),
        base.with_changes(exclude_nodes=("fc",)),
    ]
    digests = {v.digest() for v in variants}
    assert len(digests) == len(variants)
    assert base.digest() not in digests


def test_label():
    assert QuantRecipe().label() == "qdq-pc-p99.999"
    assert QuantRecipe(reduce_range=True, calibration="minmax").label() == "qdq-pc-rr-minmax"
    assert QuantRecipe(format="qoperator", per_channel=False, calibration="entropy").label() == (
        "qoperator-pt-entropy"
    )
    assert QuantRecipe(activation_type="int8").label() == "qdq-pc-p99.999-ii"
    assert QuantRecipe(backend="inc", calibration="minmax").label() == "inc-qdq-pc-minmax"
    assert QuantRecipe(reduce_range=False).label() == QuantRecipe().label()
    # Departures from the defaults show: an op-types override, bias correction off.
    assert QuantRecipe(op_types=("Conv",), bias_correction=False).label() == "qdq-pc-p99.999-ops-nobc"


# The digests rq computed before the recipe became a pydantic dataclass (main d48a258): sweep caches and
# result names built with them must still match.
@pytest.mark.parametrize(
    ("changes", "digest"),
    [
        ({}, "5be447a22927"),
        ({"calibration": "minmax", "reduce_range": False}, "086292e57817"),
        (
            {
                "op_types": ("Conv", "MatMul"),
                "exclude_nodes": ("fc",),
                "percentile": 99,
                "backend": "inc",
                "num_bins": 512,
                "calibration": "entropy",
            },
            "c2c0190c3e16",
        ),
    ],
)
def test_digest_unchanged_from_earlier_rq(changes, digest):
    assert QuantRecipe(**changes).digest() == digest


def test_old_recipe_files_still_load(tmp_path):
    """A version-1 file and a version-2 file as earlier rq versions wrote them (`rq.recipe`, report.json)."""
    v1 = tmp_path / "v1.json"
    v1.write_text(
        '{"activation_type": "uint8", "backend": "ort", "batch_size": 8, "calibration": "minmax", '
        '"exclude_nodes": [], "format": "qdq", "num_bins": null, "per_channel": true, "percentile": 99.999, '
        '"reduce_range": false, "samples": 100, "seed": 0, "version": 1, "weight_type": "int8"}',
        encoding="utf-8",
    )
    old = QuantRecipe.from_file(v1)
    assert old == QuantRecipe(
        calibration="minmax", reduce_range=False, op_types=LEGACY_OP_TYPES, bias_correction=False
    )
    v2 = tmp_path / "v2.json"
    # utf-8-sig: what a Windows editor saves (a byte-order mark first)
    v2.write_text(
        "\ufeff" + QuantRecipe(op_types=("Conv",), exclude_nodes=("fc",)).to_json(), encoding="utf-8"
    )
    again = QuantRecipe.from_file(v2)
    assert again == QuantRecipe(op_types=("Conv",), exclude_nodes=("fc",))
    assert again.to_json() == QuantRecipe.from_json(again.to_json()).to_json()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (None, "recipe file not found"),
        ("{oops", "not valid JSON"),
        ('{"samples": "many"}', "recipe samples must be a whole number, not 'many'"),
        ('{"exclude_nodes": ["fc", ""]}', "recipe exclude_nodes must hold non-empty names"),
        ('{"colour": "blue"}', "unknown recipe field(s): colour"),
        ('{"version": 3}', "recipe version 3 is not supported"),
    ],
)
def test_from_file_errors_are_one_line_naming_file_and_field(tmp_path, text, fragment):
    path = tmp_path / "recipe.json"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(RqInputError) as info:
        QuantRecipe.from_file(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message


def test_dataclass_api_is_kept():
    """sweep reads `dataclasses.fields`; `dataclasses.replace` validates like `with_changes`."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(QuantRecipe)]
    assert names[:2] == ["backend", "format"] and names[-1] == "version"
    assert dataclasses.replace(QuantRecipe(), seed=4) == QuantRecipe(seed=4)
    with pytest.raises(RqInputError, match="samples must be ≥ 1, not 0"):
        dataclasses.replace(QuantRecipe(), samples=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantRecipe().seed = 1  # type: ignore[misc]
    assert {QuantRecipe(): 1}[QuantRecipe.from_json(QuantRecipe().to_json())] == 1
