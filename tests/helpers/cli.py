"""Running `rq` through typer's CliRunner and checking its output."""

from __future__ import annotations

from typer.testing import CliRunner

from quantize.cli import app
from quantize.exits import EXIT_BAD_INPUT

#: The environment of every CLI test: wide lines, a fixed CPU (AVX2, no VNNI), no colour, no debug tracebacks.
ENV = {"COLUMNS": "200", "RQ_CPU_FLAGS": "avx2", "RQ_DEBUG": None, "NO_COLOR": "1"}
#: Preprocessing options that feed the tiny 32×32 models from small generated images.
SMALL = ["--resize", "36", "--crop", "32"]


def invoke(*args, columns: int = 200):
    """`rq ARGS` in the current folder, under ENV, on a terminal `columns` wide."""
    return CliRunner().invoke(app, [str(a) for a in args], env={**ENV, "COLUMNS": str(columns)})


def all_output(result) -> str:
    """stdout and stderr together, whichever way this typer/click version captures them."""
    text = result.output or ""
    try:
        stderr = result.stderr or ""
    except ValueError:  # older click: stderr not captured separately
        stderr = ""
    return text if stderr in text else text + stderr


def assert_one_line_error(result, fragment: str) -> str:
    text = all_output(result)
    assert result.exit_code == EXIT_BAD_INPUT, text
    assert "Traceback" not in text
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), text
    lines = [line for line in text.splitlines() if "rq: error:" in line]
    assert len(lines) == 1, text
    # the whole message, fragment included, is on that one line (not wrapped onto the next)
    assert fragment in lines[0], text
    return lines[0]
