"""Click parameter types every command shares, and the type check of config file values against them.

A float option takes `FiniteFloat` (or `FRACTION`), never `float` or `click.FloatRange`: those accept
nan, which passes every range check (nan < 0 and nan > 1 are both false), and inf.
"""

from __future__ import annotations

import math
from typing import Any

import click

__all__ = ["FiniteFloat", "FINITE", "FRACTION", "SECONDS", "FileName", "FILE_NAME", "ModelRef", "MODEL_REF",
           "finite_float", "config_type_error"]


class FiniteFloat(click.FloatRange):
    """A float that is a real number (not nan, not +-inf), optionally within a range."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = click.types.FloatParamType.convert(self, value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        """The range shown in --help; none for an unbounded number (Click would show 'x<=None')."""
        return super()._describe_range() if self.min is not None or self.max is not None else ""


FINITE = FiniteFloat()
FRACTION = FiniteFloat(0, 1)  # a probability, confidence or share
SECONDS = FiniteFloat(min=0)  # a wait (inf would wait forever: cron's next run would pile up behind it)


class FileName(click.types.StringParamType):
    """Text that names a file or folder (--help still says TEXT): in a config file it is relative to the file."""


class ModelRef(FileName):
    """A model file, or a name that is no file ('imagenet', 'imagenet:NAME', train's 'none')."""


FILE_NAME = FileName()
MODEL_REF = ModelRef()


def finite_float(text: str) -> float:
    """float(text) for numbers inside text options (--split 0.8,0.1,0.1); ValueError for nan and inf."""
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text.strip()!r} is not a finite number")
    return number


_TOML_NAMES = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
               dict: "a table"}


def config_type_error(param: click.Parameter, raw: Any) -> str | None:
    """Why a config file value cannot fill this option (a TOML value of the wrong type), or None.

    Click would convert anything (str(['a', 'b']) is a folder name, True is the integer 1), so the
    TOML type is checked first; the option's own type then checks the value. A repeatable option
    takes an array of such values."""
    if getattr(param, "multiple", False):
        if not isinstance(raw, list):
            return f"expected an array, got {_toml_name(raw)}"
        return next((f"in the array: {wrong}" for item in raw if (wrong := _scalar_type_error(param, item))), None)
    return _scalar_type_error(param, raw)


def _toml_name(raw: Any) -> str:
    return next((name for t, name in _TOML_NAMES.items() if isinstance(raw, t)), type(raw).__name__)


def _scalar_type_error(param: click.Parameter, raw: Any) -> str | None:
    kind = param.type
    if isinstance(param, click.Option) and param.is_flag or isinstance(kind, click.types.BoolParamType):
        wanted, ok = "a boolean (true or false)", isinstance(raw, bool)
    elif isinstance(kind, click.types.IntParamType):
        wanted, ok = "an integer", isinstance(raw, int) and not isinstance(raw, bool)
    elif isinstance(kind, click.types.FloatParamType):
        wanted, ok = "a number", isinstance(raw, (int, float)) and not isinstance(raw, bool)
    else:  # strings, paths, choices
        wanted, ok = "a string", isinstance(raw, str)
    if ok:
        return None
    return f"expected {wanted}, got {_toml_name(raw)}"
