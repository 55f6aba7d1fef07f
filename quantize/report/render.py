"""A report's views: ``report.md`` (GitHub-flavoured Markdown) and ``report.html`` (one self-contained page:
inline CSS, the plot embedded as a base64 PNG, so it can be mailed or attached to a CI run as one file).
Both walk the same blocks (quantize.report.blocks) and can be regenerated at any time from report.json.
"""

from __future__ import annotations

import base64
import html
import re
from typing import Any

from quantize.report.blocks import PLOT_MISSING, document, title
from quantize.report.plot import plot_accuracy_vs_speed, plot_points

# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------


def _md(text: str) -> str:
    """Prose text for Markdown: one line, and no raw HTML (a ``<script>`` in a name must stay text)."""
    return " ".join(str(text).split()).replace("<", "&lt;")


def _md_cell(text: str) -> str:
    return _md(text).replace("|", "\\|") or " "


def _md_fence(text: str) -> str:
    # The fence must be longer than any backtick run inside, or a recipe string could close it early.
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def render_markdown(data: dict) -> str:
    """The report as GitHub-flavoured Markdown (the plot itself lives only in the HTML)."""
    out = [f"# {_md(title(data))}", ""]
    for block in document(data):
        kind = block[0]
        if kind == "h2":
            out += [f"## {_md(block[1])}", ""]
        elif kind == "p":
            out += [_md(block[1]), ""]
        elif kind == "verdict":
            out += [f"**{_md(block[2])}**", ""]
        elif kind == "list":
            out += [f"- {_md(item)}" for item in block[1]] + [""]
        elif kind == "table":
            headers, rows = block[1], block[2]
            out.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
            out.append("|" + "|".join("---" for _ in headers) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            out.append("")
        elif kind == "code":
            fence = _md_fence(block[1])
            out += [f"{fence}json", block[1], fence, ""]
        elif kind == "plot":
            text = "The plot is embedded in report.html." if plot_points(data) else PLOT_MISSING
            out += [_md(text), ""]
    return "\n".join(out).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2330;
       background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem 2rem 3rem; background: #fff; }
h1 { font-size: 1.5rem; margin: 0.5rem 0 1rem; }
h2 { font-size: 1.15rem; margin: 2rem 0 0.6rem; border-bottom: 1px solid #dde1e7; padding-bottom: 0.2rem; }
p, li { line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5rem 0; font-variant-numeric: tabular-nums; font-size: 0.92rem; }
th, td { border: 1px solid #dde1e7; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #eef1f5; }
tr:nth-child(even) td { background: #fafbfc; }
td { overflow-wrap: anywhere; }
pre { background: #f2f4f7; padding: 0.7rem; overflow-x: auto; font-size: 0.85rem; }
.verdict { font-weight: 700; font-size: 1.1rem; padding: 0.6rem 0.9rem; border-radius: 4px; }
.verdict.passed { background: #e3f4e8; color: #155d2b; border: 1px solid #9fd3ae; }
.verdict.failed { background: #fbe6e6; color: #8a1c1c; border: 1px solid #e7a5a5; }
.verdict.none { background: #eef1f5; color: #3b4453; border: 1px solid #d0d6df; }
img.plot { max-width: 100%; height: auto; border: 1px solid #dde1e7; }
.missing { color: #6b7280; font-style: italic; }
"""


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def render_html(data: dict) -> str:
    """The report as one self-contained HTML page: inline CSS, the plot as a base64 PNG data URI."""
    heading = title(data)
    body = [f"<h1>{_h(heading)}</h1>"]
    for block in document(data):
        kind = block[0]
        if kind == "h2":
            body.append(f"<h2>{_h(block[1])}</h2>")
        elif kind == "p":
            body.append(f"<p>{_h(block[1])}</p>")
        elif kind == "verdict":
            body.append(f'<p class="verdict {_h(block[1])}">{_h(block[2])}</p>')
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_h(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_h(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{_h(c)}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "code":
            body.append(f"<pre><code>{_h(block[1])}</code></pre>")
        elif kind == "plot":
            png = plot_accuracy_vs_speed(data)
            if png is None:
                body.append(f'<p class="missing">{_h(PLOT_MISSING)}</p>')
            else:
                b64 = base64.b64encode(png).decode("ascii")
                body.append(
                    f'<img class="plot" alt="top-1 accuracy versus speedup over FP32" '
                    f'src="data:image/png;base64,{b64}">'
                )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_h(heading)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )
