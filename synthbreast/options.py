"""Checks of numeric options shared by the commands' validators: each refusal is one line
naming the option as the user typed it and the values it takes."""

from __future__ import annotations

import math
from typing import Any

from synthbreast.errors import UserError


def option_name(field: str) -> str:
    """A config field as its option: class_label -> --class, gp_weight -> --gp-weight."""
    return "--class" if field == "class_label" else f"--{field.replace('_', '-')}"


def refuse(config: Any, field: str, allowed: str) -> None:
    raise UserError(f"{option_name(field)} {getattr(config, field)!r}: {allowed}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)
