"""The run report: assembled from the stages' results (data), validated by one pydantic model (schema), drawn
as blocks (blocks, sections) rendered to Markdown and HTML (render) with an accuracy-vs-speed plot (plot).

The names below are the package's public API (``from quantize.report import write_report``). The assembly
functions live in quantize.report.data, not imported here: they pull in onnx and onnxruntime.
"""

from quantize.report.blocks import NO_VNNI_NOTE, PLOT_MISSING
from quantize.report.plot import plot_accuracy_vs_speed
from quantize.report.render import render_html, render_markdown
from quantize.report.schema import (
    HTML_NAME,
    JSON_NAME,
    MD_NAME,
    SCHEMA,
    Report,
    read_report,
    render_report,
    validate_report,
    write_report,
)

__all__ = [
    "HTML_NAME",
    "JSON_NAME",
    "MD_NAME",
    "NO_VNNI_NOTE",
    "PLOT_MISSING",
    "SCHEMA",
    "Report",
    "plot_accuracy_vs_speed",
    "read_report",
    "render_html",
    "render_markdown",
    "render_report",
    "validate_report",
    "write_report",
]
