"""Typed configs: frozen pydantic dataclasses whose validation errors become rq's one-line errors.

The preprocessing spec (here), the quantization recipe, the model manifest's entries and the report schema
(in ``quantize``) declare their fields as types; pydantic checks them, and :func:`first_error` turns the
first failure into the field's path, the offending value and whether the value had the wrong *type* (a
string where a number belongs) or a wrong *value* of the right type (a number out of range, a name not in
the list), so that each config words its messages the way its users read them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from calibration.errors import RqInputError

T = TypeVar("T")

# Errors about the value of an input that has the right type; any other error is a wrong type.
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}
_SHAPE_ERRORS = {"too_short", "too_long", "string_too_short", "string_pattern_mismatch", "value_error"}
VALUE_ERRORS = frozenset({"literal_error", *_RANGE_ERRORS, *_SHAPE_ERRORS})
UNKNOWN_FIELD_ERRORS = frozenset({"unexpected_keyword_argument", "extra_forbidden"})


def config_dataclass(explain: Callable[[ValidationError], str]) -> Callable[[type[T]], type[T]]:
    """Class decorator: a frozen pydantic dataclass whose invalid input raises ``RqInputError(explain(exc))``.

    Frozen (hashable, usable as a cache key), unknown fields rejected, and the dataclass API kept:
    ``dataclasses.fields``, ``dataclasses.replace`` (which validates again) and ``asdict`` work as on a
    plain dataclass. ``__post_init__`` runs after the field checks, for the checks that involve several
    fields; it raises ``RqInputError`` itself.
    """

    def decorate(cls: type[T]) -> type[T]:
        cls = _pydantic_dataclass(cls, frozen=True, config=ConfigDict(extra="forbid"))
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                raise RqInputError(explain(exc)) from None

        cls.__init__ = __init__  # type: ignore[method-assign]
        return cls

    return decorate


def path_text(loc: tuple) -> str:
    """``("variants", 0, "drop")`` → ``variants[0].drop``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def first_error(exc: ValidationError) -> tuple[tuple, str, Any, bool]:
    """(location, pydantic error type, offending input, True when the input has the right type)."""
    error = exc.errors(include_url=False)[0]
    loc = tuple(error["loc"])
    # A union's branch name (e.g. "tuple[str, ...]") is not a field: drop what is not a name or an index.
    loc = tuple(p for p in loc if isinstance(p, int) or p.isidentifier())
    return loc, error["type"], error.get("input"), error["type"] in VALUE_ERRORS


def type_name(value: Any) -> str:
    """A JSON-ish name for the type of ``value``: "a string", "a list", "null"…"""
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (dict, "an object"), (list | tuple, "a list"), (str, "a string")):
        if isinstance(value, kind):
            return name
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__
