"""Parsing untrusted JSON with bounds, so that no request body can crash a handler or the response.

:func:`loads` is ``json.loads`` plus four refusals, each a :class:`UnsafeJSON` whose message names
the field (as ``sampling_params.stop[2]``) and the limit: arrays and objects nested more than
:data:`MAX_DEPTH` levels (json's C parser recurses, so a body of 100,000 ``[`` would otherwise end
in a RecursionError), integers longer than :data:`MAX_INT_DIGITS` digits (Python refuses to convert
more than 4,300 digits with a ValueError, and nothing we take needs more than 20), the ``NaN`` and
``Infinity`` literals (not JSON), and strings, keys included, holding a lone UTF-16 surrogate (a
``\\ud800`` escape without its pair: no tokenizer or UTF-8 encoder accepts one). The parse hooks
return placeholders instead of raising, so that the check after parsing can name the field.
Imported by ``loraserve.http.errors``; knows nothing of HTTP.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 64  # nesting of arrays and objects; our bodies need 4
MAX_INT_DIGITS = 20  # 2**64 has 20 digits: seeds are the largest integers we take
_SHOWN_KEY = 40  # characters of a key shown in a field path
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


class UnsafeJSON(ValueError):
    """The body parsed as JSON but holds something refused; the message says what and where."""


class _Refused:
    """A literal the parse hooks refused, kept in the tree so the check can name its field."""

    def __init__(self, what: str, advice: str):
        self.what, self.advice = what, advice


def _parse_int(text: str) -> int | _Refused:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        return _Refused(f"an integer with {digits} digits", f"integers may have at most {MAX_INT_DIGITS} digits")
    return int(text)


def _parse_constant(name: str) -> _Refused:
    return _Refused(name, "NaN and Infinity are not JSON; send a finite number")


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type: null, boolean, integer, number, string, array or object."""
    for kind, name in (
        (type(None), "null"),
        (bool, "boolean"),
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        (list, "array"),
        (dict, "object"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def field_path(loc: tuple) -> str:
    """``("messages", 0, "content")`` as ``messages[0].content``; a key that is not a plain name (empty,
    spaces, quotes) is shown quoted in brackets, as ``[""]``; long keys are cut short."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = str(part)
        plain = _PLAIN_KEY.fullmatch(text) is not None
        text = text if len(text) <= _SHOWN_KEY else text[: _SHOWN_KEY - 3] + "..."
        if not plain:
            out += f"[{json.dumps(text)}]"
        else:
            out += f".{text}" if out else text
    return out


def _where(path: tuple) -> str:
    return field_path(path) or "the top level"


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate in ``text``, or None (json pairs valid surrogates itself)."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _check_text(text: str, path: tuple, key: bool) -> None:
    at = lone_surrogate(text)
    if at is None:
        return
    where = f"a key of {_where(path)}" if key else _where(path)
    raise UnsafeJSON(
        f"the request body contains a lone surrogate U+{ord(text[at]):04X} at {where} (character {at}); "
        "send valid Unicode (UTF-8)"
    )


def _check_leaf(value: Any, path: tuple) -> None:
    if isinstance(value, str):
        _check_text(value, path, key=False)
    elif isinstance(value, _Refused):
        raise UnsafeJSON(f"the request body has {value.what} at {_where(path)}; {value.advice}")


def check_tree(value: Any) -> None:
    """Raise UnsafeJSON for the first refused thing in a parsed tree; iterative, so any depth is safe."""
    stack = [(value, (), 1)]
    while stack:
        node, path, depth = stack.pop()
        if not isinstance(node, (dict, list)):
            _check_leaf(node, path)
            continue
        if depth > MAX_DEPTH:
            under = field_path(path[:3]) + ("..." if len(path) > 3 else "")
            raise UnsafeJSON(
                f"the request body nests arrays and objects more than {MAX_DEPTH} levels deep (under "
                f"{under}); at most {MAX_DEPTH} are allowed, flatten it"
            )
        pairs = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in pairs:
            if isinstance(key, str):
                _check_text(key, path, key=True)
            if isinstance(item, (dict, list)):
                stack.append((item, (*path, key), depth + 1))
            elif isinstance(item, str):
                if not item.isascii():  # the common case costs one call, no path tuple
                    _check_text(item, (*path, key), key=False)
            elif isinstance(item, _Refused):
                _check_leaf(item, (*path, key))


def loads(data: bytes | str) -> Any:
    """Parse ``data`` as JSON and check it (see the module docstring); json's own errors pass through.

    Bytes must be UTF-8 (a UnicodeDecodeError otherwise): ``json.loads`` alone would guess UTF-16 or
    UTF-32 from the first bytes, and a body is UTF-8 (RFC 8259)."""
    if isinstance(data, (bytes, bytearray)):
        data = data.decode("utf-8")
    try:
        value = json.loads(data, parse_int=_parse_int, parse_constant=_parse_constant)
    except RecursionError:  # json's C parser recurses once per level: far deeper than MAX_DEPTH
        raise UnsafeJSON(
            f"the request body nests arrays and objects more than {MAX_DEPTH} levels deep; at most "
            f"{MAX_DEPTH} are allowed, flatten it"
        ) from None
    check_tree(value)
    return value
