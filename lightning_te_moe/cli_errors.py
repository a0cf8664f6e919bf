"""One line from jsonargparse's error tree: the field, what was given, and what is allowed.

A typo under ``trainer.plugins`` makes jsonargparse try every type Lightning's ``Trainer`` accepts there and
report each failure (plus 70 lines of usage): about 110 lines with the one useful line in the middle. This
module keeps the deepest failure, names its field (``trainer.plugins.params_dtype``) and says what is allowed.
Anything it does not recognise is kept, so a message it cannot parse still reaches the user.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Optional

_KEY = re.compile(r'^Parser key "([^"]+)":$')
_CLASS = re.compile(r"^Problem with given class_path '([^']+)':$")
_GIVEN = re.compile(r"^Given value: (.*)$")
#: Lines that describe how jsonargparse searched (union members tried, accepted forms), not what is wrong.
_NOISE = re.compile("|".join((
    r"^Does not validate against any of the Union subtypes",
    r"^Subtypes: ",
    r"^Errors:$",
    r"^Given value type: ",
    r"^Subclass types expect one of:",
    r"^a class path \(str\)",
    r"^a dict (with|without) ",
    r"^Not a valid subclass of ",
    r"^Import path \S+ does not correspond to a subclass of ",
    r"^Expected a <class 'NoneType'>",
    r"^Expected a path but ",
    r"^Expected a dot import path string",
)))
_LITERAL = re.compile(r"^Expected a typing\.Literal\[(.*)\](?:\. Got value: (.*))?$")
_TYPE = re.compile(r"^Expected a <class '(\w+)'>(?:\. Got value: (.*))?$")
_OPTION = re.compile(r"^Option '([^']+)' is not accepted$")


@dataclass
class _Leaf:
    keys: list[str]
    cls: Optional[str]
    text: str
    indent: int
    given: Optional[str] = None
    depth: int = 0


def condense(message: str) -> str:
    """The most specific failures in a jsonargparse error message, as one line."""
    stack: list[tuple[int, str, str]] = []  # (indent, "key" | "class", value)
    leaves: list[_Leaf] = []
    for raw in message.splitlines():
        text = raw.strip()
        if not text:
            continue
        indent = len(raw) - len(raw.lstrip())
        if text.startswith("- "):
            text, indent = text[2:].strip(), indent + 2
        while stack and stack[-1][0] >= indent:
            stack.pop()
        given = _GIVEN.match(text)
        if given:
            for leaf in leaves:
                if leaf.given is None and leaf.indent > indent:
                    leaf.given = given.group(1)
            continue
        for kind, pattern in (("key", _KEY), ("class", _CLASS)):
            match = pattern.match(text)
            if match:
                stack.append((indent, kind, match.group(1)))
                break
        else:
            if not _NOISE.match(text):
                keys = [value for _, kind, value in stack if kind == "key"]
                classes = [value for _, kind, value in stack if kind == "class"]
                leaves.append(_Leaf(keys, classes[-1] if classes else None, text, indent, depth=len(stack)))
    if not leaves:
        return " ".join(line.strip() for line in message.splitlines() if line.strip())
    deepest = max(leaf.depth for leaf in leaves)
    return "; ".join(dict.fromkeys(_render(leaf) for leaf in leaves if leaf.depth == deepest))


def _render(leaf: _Leaf) -> str:
    where = ".".join(leaf.keys)
    if leaf.cls:
        where = f"{where} ({leaf.cls})" if where else leaf.cls
    return f"{where}: {_explain(leaf)}" if where else _explain(leaf)


def _explain(leaf: _Leaf) -> str:
    text = leaf.text
    literal, typed, option = _LITERAL.match(text), _TYPE.match(text), _OPTION.match(text)
    if literal:
        allowed = ", ".join(str(v) for v in ast.literal_eval(f"[{literal.group(1)}]"))
        got = literal.group(2) if literal.group(2) is not None else leaf.given
        return f"{got!r} is not allowed; allowed: {allowed}" if got is not None else f"allowed: {allowed}"
    if typed:
        got = typed.group(2) if typed.group(2) is not None else leaf.given
        return f"expected {_article(typed.group(1))} {typed.group(1)}" + (f", got {got!r}" if got is not None else "")
    if option and leaf.cls:
        options = _options_of(leaf.cls)
        if options:
            close = difflib.get_close_matches(option.group(1), options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"unknown option {option.group(1)!r}{hint}; its options are: {', '.join(options)}"
    return text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _options_of(class_path: str) -> list[str]:
    """The constructor arguments of ``class_path`` (empty when it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
