"""Hyperparameter checks shared by every transformation: fail early, name the argument."""

import math
from typing import Any


def _fail(name: str, value: Any, requirement: str) -> None:
    raise ValueError(f"{name} must be {requirement}, got {value!r}")


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(name: str, value: Any) -> None:
    if not (_is_real(value) and value > 0):
        _fail(name, value, "a finite number > 0")


def check_non_negative(name: str, value: Any) -> None:
    if not (_is_real(value) and value >= 0):
        _fail(name, value, "a finite number >= 0")


def check_in_range(name: str, value: Any, low: float, high: float, *, closed: str = "both") -> None:
    """Checks ``low <= value <= high`` (``closed`` in {"both", "left", "right", "neither"})."""
    if not _is_real(value):
        _fail(name, value, f"a finite number in {_interval(low, high, closed)}")
    ok_low = value >= low if closed in ("both", "left") else value > low
    ok_high = value <= high if closed in ("both", "right") else value < high
    if not (ok_low and ok_high):
        _fail(name, value, f"in {_interval(low, high, closed)}")


def check_positive_int(name: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        _fail(name, value, "an integer >= 1")


def check_non_negative_int(name: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        _fail(name, value, "an integer >= 0")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "a bool")


def check_ordered(low_name: str, low: float, high_name: str, high: float) -> None:
    if not low <= high:
        raise ValueError(f"{low_name} must be <= {high_name}, got {low_name}={low!r} > {high!r}")


def _interval(low: float, high: float, closed: str) -> str:
    left = "[" if closed in ("both", "left") else "("
    right = "]" if closed in ("both", "right") else ")"
    return f"{left}{low}, {high}{right}"
