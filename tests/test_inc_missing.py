"""Without neural-compressor (the main environment), `--backend inc` fails with one line saying what to install."""

from __future__ import annotations

import importlib.util

import pytest

from calibration.errors import RqInputError
from quantize.backends.inc import INC_INSTALL_HINT, require_inc

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("neural_compressor") is not None,
    reason="neural-compressor is installed here (tests/test_inc_backend.py covers this case)",
)


def test_require_inc_says_how_to_install():
    with pytest.raises(RqInputError) as info:
        require_inc()
    message = str(info.value)
    assert "pip install 'rq-quant[inc]'" in message and INC_INSTALL_HINT in message
    assert "\n" not in message


def test_module_imports_without_inc():
    import quantize.backends.inc as backend

    assert backend.IncOutcome.__dataclass_fields__["goal_met"]
