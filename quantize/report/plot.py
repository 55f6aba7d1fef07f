"""The accuracy-vs-speed plot of a report (a PNG for the HTML view), and the accessors the views share.

matplotlib is imported only when a plot is drawn: it takes a noticeable fraction of a second to import.
"""

from __future__ import annotations

import io
from pathlib import PurePath

from quantize.measure.stats import pareto_front
from quantize.report.schema import batch_key, is_number

# ---------------------------------------------------------------------------------------------------------
# Reading a report dict (the renderers tolerate any shape: a hand-edited report.json renders what it can)
# ---------------------------------------------------------------------------------------------------------


def model_name(data: dict) -> str:
    model = data.get("model") or {}
    path = model.get("path") if isinstance(model, dict) else None
    if not isinstance(path, str) or not path:
        return "unknown model"
    return PurePath(path).name or path


def variants_of(data: dict) -> list[dict]:
    return [v for v in data.get("variants") or [] if isinstance(v, dict)]


def bench_of(v: dict) -> dict[int, dict]:
    """A variant's bench figures keyed by int batch size (JSON keys are strings)."""
    out: dict[int, dict] = {}
    for key, figures in (v.get("bench") or {}).items():
        b = batch_key(key)
        if b is not None and isinstance(figures, dict):
            out[b] = figures
    return out


def top1_of(v: dict) -> float | None:
    acc = v.get("accuracy")
    if isinstance(acc, dict) and is_number(acc.get("top1")):
        return float(acc["top1"])
    return None


def runtimes_of(variants: list[dict]) -> list[str]:
    seen: list[str] = []
    for v in variants:
        rt = v.get("runtime")
        if isinstance(rt, str) and rt not in seen:
            seen.append(rt)
    return seen


def speed_key(variants: list[dict]) -> str:
    """The bench figure that puts every variant on one speed axis: with several runtimes (ONNX Runtime among
    them), the speedup against ONNX Runtime's FP32; else against FP32 in the variant's own runtime."""
    runtimes = runtimes_of(variants)
    return "ratio_to_ort_fp32" if len(runtimes) > 1 and "ort" in runtimes else "ratio_to_fp32"


def speedup(v: dict, figures: dict | None, key: str) -> float | None:
    """`v`'s speedup on the `key` axis from its figures at one batch (FP32 without a figure: 1 by definition)."""
    if figures is not None and is_number(figures.get(key)):
        return float(figures[key])
    if v.get("kind") == "fp32":
        return 1.0
    if figures is not None and is_number(figures.get("ratio_to_fp32")):
        return float(figures["ratio_to_fp32"])
    return None


def plot_points(data: dict) -> tuple[int, list[tuple[str, str, float, float, bool]]] | None:
    """(batch, [(name, kind, speedup, top-1, on_front)]) for the plot, or None when there is nothing to show.

    The batch is the largest one at which some INT8 variant has both accuracy and a speed ratio. FP32 sits
    at x = 1 by definition. Pareto flags come from the report when it has them (so the plot agrees with
    the table), else are computed here over the plotted points. With several runtimes, x is the speedup
    against ONNX Runtime's FP32 (``ratio_to_ort_fp32``) when measured, so the runtimes share one axis.
    """
    variants = variants_of(data)
    key = speed_key(variants)
    candidates = [
        b
        for v in variants
        if v.get("kind") == "int8" and top1_of(v) is not None
        for b, f in bench_of(v).items()
        if is_number(f.get("ratio_to_fp32"))
    ]
    if not candidates:
        return None
    batch = max(candidates)
    points: list[tuple[str, str, float, float, bool | None]] = []
    for v in variants:
        top1 = top1_of(v)
        if top1 is None:
            continue
        x = speedup(v, bench_of(v).get(batch), key)
        if x is None:
            continue
        flag = v.get("pareto")
        points.append(
            (str(v.get("name", "?")), str(v.get("kind")), x, top1, flag if isinstance(flag, bool) else None)
        )
    if all(p[4] is None for p in points):
        front = set(pareto_front([(p[2], p[3]) for p in points]))
        return batch, [(n, k, x, y, i in front) for i, (n, k, x, y, _f) in enumerate(points)]
    return batch, [(n, k, x, y, bool(f)) for n, k, x, y, f in points]


def _mpl_text(text: str) -> str:
    # A "$" in a variant name would switch matplotlib into mathtext (and may raise on parse errors).
    return text.replace("$", r"\$")


#: Vertical label offsets tried in turn (points from the marker): above, below, then further out.
_LABEL_OFFSETS = (6, -14, 16, -24, 26, -34, 36, -44)


def _place_label(label, dy: float, renderer):
    """Put `label` `dy` points above (below, if negative) its point; its box in display units."""
    label.xyann = (label.xyann[0], dy)
    label.set_verticalalignment("bottom" if dy > 0 else "top")
    return label.get_window_extent(renderer)


def _separate_labels(fig, labels) -> None:
    """Move each label that would cover an earlier one to the first free offset of `_LABEL_OFFSETS`.

    Variants measured in several runtimes often share a top-1 and lie close in speed, so their labels would
    print over each other. Positions are read after layout (`draw_without_rendering`), in display units.
    First choice: free and inside the axes; else free anywhere; else where it started.
    """
    if len(labels) < 2:
        return
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    axes = labels[0].axes.get_window_extent(renderer)
    placed = []
    for label in labels:
        fits = {}
        for dy in _LABEL_OFFSETS:
            box = _place_label(label, dy, renderer)
            if not any(box.overlaps(other) for other in placed):
                fits[dy] = axes.contains(box.x0, box.y0) and axes.contains(box.x1, box.y1)
        chosen = next((dy for dy, inside in fits.items() if inside), next(iter(fits), _LABEL_OFFSETS[0]))
        placed.append(_place_label(label, chosen, renderer))


def plot_accuracy_vs_speed(data: dict) -> bytes | None:
    """PNG of top-1 (%) against speedup over FP32 at the largest benchmarked batch, or None.

    Every variant with accuracy and a speed figure at that batch is a labelled point (FP32 at x = 1);
    Pareto-front points are highlighted and joined. None when no INT8 variant has both accuracy and
    benchmark figures. Uses ``matplotlib.figure.Figure`` with an explicit Agg canvas — never pyplot — so
    the global backend and pyplot's figure registry of the calling program are left untouched.
    """
    drawn = accuracy_vs_speed_figure(data)
    if drawn is None:
        return None
    buf = io.BytesIO()
    # No "Software" metadata: identical reports then give identical PNG bytes across matplotlib versions.
    drawn[0].savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def accuracy_vs_speed_figure(data: dict):
    """(matplotlib Figure, its point labels) of :func:`plot_accuracy_vs_speed`, or None."""
    found = plot_points(data)
    if found is None:
        return None
    batch, points = found
    # Imported here: matplotlib takes a noticeable fraction of a second to import, and only this needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(7.5, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.axvline(1.0, color="#9aa3ad", linestyle=":", linewidth=1, zorder=1)
    front = sorted((p for p in points if p[4]), key=lambda p: (p[2], -p[3]))
    if len(front) > 1:
        ax.plot([p[2] for p in front], [p[3] for p in front], color="#c0392b", linewidth=1.5, zorder=2)
    xs = [p[2] for p in points]
    x_mid = (min(xs) + max(xs)) / 2
    labels = []
    for name, kind, x, y, on_front in points:
        ax.scatter(
            [x],
            [y],
            s=70 if on_front else 45,
            marker="s" if kind == "fp32" else "o",
            color="#c0392b" if on_front else "#7f8c8d",
            edgecolors="black" if on_front else "none",
            linewidths=0.6,
            zorder=3,
        )
        # Labels point inwards: text is not counted by autoscaling, so an outward label at the
        # rightmost point would be cut off by the axes edge.
        right_half = len(points) > 1 and x > x_mid
        labels.append(
            ax.annotate(
                _mpl_text(name),
                (x, y),
                xytext=(-6 if right_half else 6, 6),
                textcoords="offset points",
                ha="right" if right_half else "left",
                fontsize=8,
                color="#1d2330",
            )
        )
    # Several runtimes: each is its own series, its variants joined in a colour of its own.
    runtimes = runtimes_of(variants_of(data))
    series_handles = []
    if len(runtimes) > 1:
        by_name = {p[0]: p for p in points}
        palette = ["#2471a3", "#27ae60", "#8e44ad", "#d35400"]
        for i, rt in enumerate(runtimes):
            members = [
                by_name[str(v.get("name"))]
                for v in variants_of(data)
                if v.get("runtime") == rt and str(v.get("name")) in by_name
            ]
            if not members:
                continue
            members.sort(key=lambda p: p[2])
            color = palette[i % len(palette)]
            ax.plot(
                [p[2] for p in members],
                [p[3] for p in members],
                color=color,
                linestyle="--",
                linewidth=1,
                zorder=2,
            )
            series_handles.append(Line2D([], [], color=color, linestyle="--", label=_mpl_text(rt)))
    # Proxy artists: one legend entry per meaning, not per point.
    versus = "ONNX Runtime FP32" if len(runtimes) > 1 and "ort" in runtimes else "FP32"
    # With several runtimes only ORT's FP32 sits at x = 1 (another runtime's FP32 is as fast as it is there).
    fp32_label = "FP32 (x = 1)" if versus == "FP32" else "FP32"
    handles = [
        *series_handles,
        Line2D([], [], color="#c0392b", marker="o", markeredgecolor="black", label="Pareto front"),
        Line2D([], [], color="#7f8c8d", marker="o", linestyle="none", label="dominated"),
        Line2D([], [], color="#555555", marker="s", linestyle="none", label=fp32_label),
    ]
    ax.set_xlabel(f"speedup vs {versus} at batch {batch} (×, FP32 median / variant median)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(_mpl_text(f"{model_name(data)}: accuracy vs speed"), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.2)
    ax.legend(handles=handles, loc="best", fontsize=8)
    _separate_labels(fig, labels)
    return fig, labels
