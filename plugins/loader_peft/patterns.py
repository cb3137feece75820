"""Bounded regular expressions from an adapter config: a length limit and a time budget for matching.

PEFT reads some fields of ``adapter_config.json`` as regexes: ``target_modules`` and
``exclude_modules`` given as a string, the keys of ``rank_pattern`` and ``alpha_pattern``, and the
entries of ``layers_pattern``. Whoever may load an adapter chooses them, and Python's ``re`` cannot
be interrupted: ``(?:.|.){0,20}Z`` took 25 s to match a model's module names. So each pattern longer
than :data:`MAX_PATTERN_CHARS` is refused, and every match of one config against module names runs
in the ``regex`` package with ``timeout=`` out of one :class:`PatternBudget` of
:data:`MATCH_BUDGET_S` seconds; a pattern that runs out of it is refused, naming it. Validity is
still judged by ``re``, which PEFT compiles with, and ``regex`` (in its default, ``re``-compatible
mode) matches those patterns the same way.
"""

from __future__ import annotations

import re
import time

import regex

from loraserve.contract import AdapterError

MAX_PATTERN_CHARS = 512
MATCH_BUDGET_S = 1.0


def check_pattern(path: str, field: str, pattern: str) -> None:
    """Refuse a regex of ``field`` that is too long or that ``re`` (as PEFT) cannot compile."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterError(
            f"{path}: {field} regex {pattern[:60]!r}... is {len(pattern)} characters long, more than "
            f"the {MAX_PATTERN_CHARS} allowed; shorten it, or give the module names as a list"
        )
    try:
        re.compile(pattern)
    except re.error as exc:
        raise AdapterError(f"{path}: {field} = {pattern!r} is not a valid regex ({exc})") from None


class PatternBudget:
    """The time one adapter config's regexes may spend matching module names, spent call by call."""

    def __init__(self, path: str, seconds: float = MATCH_BUDGET_S):
        self.path, self.seconds, self.left = path, seconds, seconds

    def fullmatch(self, pattern: str, text: str, field: str) -> bool:
        """Whether ``pattern`` matches all of ``text`` (``re.fullmatch``)."""
        return self._run(regex.fullmatch, pattern, pattern, text, field) is not None

    def match(self, pattern: str, text: str, field: str, shown: str | None = None) -> regex.Match | None:
        """``re.match(pattern, text)``; ``shown`` is the config's own pattern inside ``pattern``."""
        return self._run(regex.match, pattern, shown or pattern, text, field)

    def _run(self, fn, pattern: str, shown: str, text: str, field: str):
        if self.left <= 0:
            raise self._refusal(shown, field)
        started = time.perf_counter()
        try:
            return fn(pattern, text, timeout=self.left)
        except TimeoutError:
            raise self._refusal(shown, field) from None
        finally:
            self.left -= time.perf_counter() - started

    def _refusal(self, shown: str, field: str) -> AdapterError:
        return AdapterError(
            f"{self.path}: {field} regex {shown!r} takes more than {self.seconds:g} s to match the "
            "base model's module names (it backtracks catastrophically); simplify it, or give the "
            "module names as a list"
        )
