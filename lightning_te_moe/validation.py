"""Checks of user arguments at construction: one error naming the argument, what was given and what is allowed.

A wrong value found here costs nothing; found at setup or in the first step it costs a model load and a
traceback through Lightning (``params_dtype="int8"`` used to fail deep in setup, ``"float64"`` in the first step).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Iterable, Literal, Optional, Union

from .policy.recipes import RECIPE_NAMES


def _quoted(values: Iterable[Any]) -> str:
    return ", ".join(repr(v) for v in values)


def check_bool(owner: str, name: str, value: Any) -> bool:
    """``value`` itself when it is a bool (a string like ``"false"`` would be true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}({name}={value!r}): {name} must be True or False, got {type(value).__name__}")
    return value


def check_choice(owner: str, name: str, value: Any, allowed: tuple[str, ...], why: str = "") -> str:
    """``value`` when it is one of ``allowed`` (strings)."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{owner}({name}={value!r}): {name} must be one of {_quoted(allowed)}{why}")
    return value


def check_positive_int(owner: str, name: str, value: Any, unit: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}({name}={value!r}): {name} must be a positive whole number of {unit}")
    return value


def check_recipe_names(owner: str, name: str, value: Any) -> tuple[str, ...]:
    """A list or tuple of recipe names (None: empty). A bare string is refused: ``deny="fp8_delayed"`` would
    otherwise read as the names 'f', 'p', '8', ..."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{owner}({name}={value!r}): {name} must be a list of recipe names, e.g."
                        f" {name}=['fp8_delayed']; recipe names are: {', '.join(RECIPE_NAMES)}")
    unknown = [v for v in value if v not in RECIPE_NAMES]
    if unknown:
        raise ValueError(f"{owner}({name}={list(value)!r}): unknown recipe name(s) {_quoted(unknown)};"
                         f" recipe names are: {', '.join(RECIPE_NAMES)}")
    return tuple(value)


def check_dataclass_fields(instance: Any) -> None:
    """Every field of a dataclass instance has its annotated type (int, float, bool, a Literal, Optional of one).

    Dataclasses do not check types; without this ``GuardConfig(window="100")`` fails later in a comparison.
    """
    owner = type(instance).__name__
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        value, hint = getattr(instance, field.name), hints[field.name]
        if not _is_instance(value, hint):
            raise TypeError(f"{owner}.{field.name} must be {_describe(hint)}, got {value!r}")


def _is_instance(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return value in args
    if origin is Union:
        return any(_is_instance(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return f"one of {_quoted(args)}"
    if origin is Union:
        return " or ".join(_describe(arg) for arg in args)
    return "None" if hint is type(None) else f"{'an' if hint is int else 'a'} {hint.__name__}"


def dataclass_from(owner: str, name: str, value: Any, cls: type) -> Optional[Any]:
    """``value`` as an instance of the dataclass ``cls``: an instance, None, or a mapping of its fields."""
    if value is None or isinstance(value, cls):
        return value
    fields = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(value, typing.Mapping):
        raise TypeError(f"{owner}({name}={value!r}): {name} must be a {cls.__name__} or a dict of its fields"
                        f" ({', '.join(fields)})")
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise ValueError(f"{owner}({name}=...): unknown {cls.__name__} field(s) {_quoted(unknown)}; its fields are:"
                         f" {', '.join(fields)}")
    return cls(**value)
