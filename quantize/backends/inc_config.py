"""Intel Neural Compressor: an rq recipe as INC's `PostTrainingQuantConfig`, and INC's import check.

What the recipe maps to, and what INC cannot do (checked against INC's ONNX Runtime capability file
`neural_compressor/adaptor/onnxrt.yaml`, section 1.13.0, which applies to onnxruntime >= 1.13):

- format: qdq → quant_format "QDQ"; qoperator → "default" (QLinear ops).
- activation/weight types: INC's CPU capability offers uint8 (asymmetric) activations and int8 (symmetric)
  weights only; any other combination is refused with a one-line error.
- per_channel → weight granularity (Conv, Gemm and MatMul support both).
- calibration: minmax → "minmax", entropy → "kl", percentile → "percentile". INC calibrates Gemm inputs
  with minmax only (noted). INC's calibrators take no parameters: percentile is fixed at 99.999 and the
  histogram at 2048 bins (percentile) / 128 bins (kl), so other values are refused. KL and percentile keep
  every calibration activation in memory until the end of calibration (ResNet-50, 100 images: about
  5 GB peak; minmax keeps only ranges, 1.4 GB).
- op_types: every other op type INC could quantize is pinned to FP32; exclude_nodes → op_name_dict FP32.
- reduce_range → INC's reduce_range (None: INC decides from the CPU's VNNI support).
"""

from __future__ import annotations

import os
import re
from typing import Any

from calibration.errors import RqInputError
from quantize.exits import one_line
from quantize.recipe import LEGACY_OP_TYPES, QuantRecipe

INC_INSTALL_HINT = "pip install 'rq-quant[inc]'"
#: rq calibration method → INC's activation calibration algorithm.
INC_METHODS = {"minmax": "minmax", "entropy": "kl", "percentile": "percentile"}
#: INC's calibrators are built without arguments (`CALIBRATOR[method]()`), so these are fixed.
INC_FIXED_PERCENTILE = 99.999
INC_FIXED_BINS = {"entropy": 128, "percentile": 2048}


def require_inc() -> str:
    """Import neural-compressor or fail with one line that says how to get it; returns its version."""
    try:
        import neural_compressor
    except ImportError:
        raise RqInputError(
            f"--backend inc needs Intel Neural Compressor: {INC_INSTALL_HINT} (neural-compressor 3.7.1 "
            "needs numpy<2 and onnx<1.19, so a separate virtual environment is advisable)"
        ) from None
    except Exception as exc:  # a broken install: numpy 2 ABI errors, missing transitive modules, ...
        reason = one_line(exc)
        raise RqInputError(
            f"--backend inc needs a working Intel Neural Compressor: importing it failed ({reason}); "
            f"{INC_INSTALL_HINT} in a separate virtual environment (it needs numpy<2 and onnx<1.19)"
        ) from None
    return str(getattr(neural_compressor, "__version__", "unknown"))


def inc_capabilities(recipe_format: str) -> dict[str, dict]:
    """INC's static INT8 capability per op type for this onnxruntime and format (`qdq`/`qoperator`).

    Read from the same capability file, with the same version selection, as INC's own ONNX Runtime adaptor.
    """
    require_inc()
    import neural_compressor.adaptor.onnxrt as inc_onnxrt

    query = inc_onnxrt.ONNXRTQuery(
        static=True,
        format="qdq" if recipe_format == "qdq" else "qlinearops",
        local_config_file=os.path.join(os.path.dirname(inc_onnxrt.__file__), "onnxrt.yaml"),
    )
    return dict(query.get_quantization_capability().get("int8", {}))


_FP32 = {"weight": {"dtype": ["fp32"]}, "activation": {"dtype": ["fp32"]}}


def inc_op_types(recipe: QuantRecipe) -> tuple[str, ...]:
    """The op types INC quantizes for `recipe` (placement from the graph maps to Conv/Gemm/MatMul)."""
    return LEGACY_OP_TYPES if recipe.op_types is None else recipe.op_types


def recipe_to_inc_config(
    recipe: QuantRecipe,
    *,
    tune: bool,
    max_drop_pt: float | None,
    max_trials: int,
    timeout_s: int,
    notes: list[str] | None = None,
):
    """Translate an rq recipe into INC's `PostTrainingQuantConfig`; refuse what INC cannot honour.

    `notes` (if given) receives what INC does differently from the ORT backend for this recipe.
    """
    require_inc()
    from neural_compressor.config import AccuracyCriterion, PostTrainingQuantConfig, TuningCriterion

    notes = notes if notes is not None else []
    if recipe.bias_correction:
        # On by default in the recipe: INC runs without it rather than refusing every default run.
        notes.append("bias correction is an ort-backend step: INC's model is not bias-corrected")
        recipe = recipe.with_changes(bias_correction=False)
    if recipe.calibration not in INC_METHODS:
        raise RqInputError(
            f"INC cannot calibrate with {recipe.calibration}; it offers: {', '.join(INC_METHODS)} (or use --backend ort)"
        )
    if recipe.op_types is None:
        notes.append(
            "placement from the graph is an ort-backend feature: INC quantizes "
            f"{', '.join(LEGACY_OP_TYPES)} (name others with --op-types)"
        )
        recipe = recipe.with_changes(op_types=LEGACY_OP_TYPES)
    caps = inc_capabilities(recipe.format)
    fmt_name = "QDQ" if recipe.format == "qdq" else "QOperator"

    unsupported = [t for t in recipe.op_types if t not in caps]
    if unsupported:
        raise RqInputError(
            f"INC cannot quantize {', '.join(unsupported)} in {fmt_name} format; op types it can quantize: "
            f"{', '.join(sorted(caps))}"
        )
    for role, wanted in (("activation", recipe.activation_type), ("weight", recipe.weight_type)):
        for op_type in recipe.op_types:
            offered = caps[op_type][role]["dtype"]
            if wanted not in offered:
                raise RqInputError(
                    f"INC quantizes {op_type} {role}s as {'/'.join(offered)} only, not {wanted} "
                    f"(use --{'activation' if role == 'activation' else 'weight'}-type "
                    f"{offered[0]} or --backend ort)"
                )

    algorithm = INC_METHODS[recipe.calibration]
    algorithms = {t: caps[t]["activation"]["algorithm"] for t in recipe.op_types}
    if not any(algorithm in offered for offered in algorithms.values()):
        supported = sorted({m for m, a in INC_METHODS.items() for o in algorithms.values() if a in o})
        raise RqInputError(
            f"INC cannot calibrate {', '.join(recipe.op_types)} with {recipe.calibration}; "
            f"supported: {', '.join(supported)}"
        )
    minmax_only = [t for t, offered in algorithms.items() if algorithm not in offered]
    if minmax_only:
        notes.append(
            f"INC calibrates {', '.join(minmax_only)} inputs with minmax only "
            f"(the other op types use {recipe.calibration})"
        )
    if recipe.calibration == "percentile" and recipe.percentile != INC_FIXED_PERCENTILE:
        raise RqInputError(
            f"INC's percentile calibration is fixed at {INC_FIXED_PERCENTILE:g}, not {recipe.percentile:g} "
            "(use --backend ort for other percentiles)"
        )
    if recipe.calibration in INC_FIXED_BINS:
        fixed = INC_FIXED_BINS[recipe.calibration]
        if recipe.num_bins is not None and recipe.num_bins != fixed:
            raise RqInputError(
                f"INC's {algorithm} calibration uses {fixed} histogram bins, not {recipe.num_bins} "
                "(use --backend ort to choose the bins)"
            )
        if recipe.num_bins is None and recipe.bins != fixed:
            notes.append(
                f"INC's {algorithm} calibration uses {fixed} histogram bins (rq's default: {recipe.bins})"
            )

    granularity = "per_channel" if recipe.per_channel else "per_tensor"
    op_type_dict: dict[str, dict] = {}
    for op_type in caps:
        if op_type not in recipe.op_types:
            op_type_dict[op_type] = _FP32
            continue
        weight: dict[str, list] = {"dtype": [recipe.weight_type]}
        if granularity in caps[op_type]["weight"]["granularity"]:
            weight["granularity"] = [granularity]
        else:
            notes.append(f"INC quantizes {op_type} weights {caps[op_type]['weight']['granularity'][0]} only")
        activation: dict[str, list] = {"dtype": [recipe.activation_type]}
        if algorithm in caps[op_type]["activation"]["algorithm"]:
            activation["algorithm"] = [algorithm]
        op_type_dict[op_type] = {"weight": weight, "activation": activation}
    # op_name_dict keys are regular expressions matched against whole node names.
    op_name_dict = {re.escape(name): _FP32 for name in recipe.exclude_nodes} or None
    if recipe.reduce_range is None:
        notes.append("reduce_range left to INC (7-bit weights when the CPU lacks VNNI)")

    kwargs: dict[str, Any] = {}
    if tune:
        if max_drop_pt is None or max_drop_pt < 0:
            raise ValueError("tuning needs max_drop_pt ≥ 0")
        # INC's absolute criterion is in the units of what eval_func returns: the evaluator hands INC
        # accuracy as a fraction (see _TrialEvaluator), so the tolerable loss is a fraction too. The epsilon
        # keeps a drop of exactly max_drop_pt within the goal despite float rounding.
        kwargs["accuracy_criterion"] = AccuracyCriterion(
            higher_is_better=True, criterion="absolute", tolerable_loss=max_drop_pt / 100.0 + 1e-9
        )
        kwargs["tuning_criterion"] = TuningCriterion(
            strategy="basic", max_trials=max_trials, timeout=timeout_s
        )
    return PostTrainingQuantConfig(
        device="cpu",
        backend="default",
        domain="cv",
        approach="static",
        quant_format="QDQ" if recipe.format == "qdq" else "default",
        calibration_sampling_size=[recipe.samples],
        op_type_dict=op_type_dict,
        op_name_dict=op_name_dict,
        reduce_range=recipe.reduce_range,
        # quant_level 1 = the strategy named in tuning_criterion ("basic"); "auto" would add INC's
        # conservative pass and smooth-quant sweeps. Without an eval_func INC does one default pass either way.
        quant_level=1,
        recipes={
            # rq's prepare already ran ORT's basic optimizer; INC must not turn Gemm into MatMul + Add
            # (the recipe's op types are about Gemm) nor pick an optimization level by guessing the domain.
            "graph_optimization_level": "ENABLE_BASIC",
            "gemm_to_matmul": False,
        },
        **kwargs,
    )


__all__ = [
    "INC_FIXED_BINS",
    "INC_FIXED_PERCENTILE",
    "INC_INSTALL_HINT",
    "INC_METHODS",
    "inc_capabilities",
    "inc_op_types",
    "recipe_to_inc_config",
    "require_inc",
]
