"""Stop conditions: :class:`StopChecker` finds stop strings in streamed text and :func:`finish_reason`
decides stop/length from the last token."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

from loraserve.sched.sampling_params import SamplingParams


@dataclass(frozen=True)
class StopCheck:
    """What :meth:`StopChecker.check` found.

    :ivar stopped: a stop string appeared.
    :ivar matched: that stop string (the earliest in the text), or ``None``.
    :ivar text: the output text to report: cut before the stop string unless ``no_stop_trim``.
    :ivar stream_len: ``text[:stream_len]`` is safe to stream now; the rest might still become the
        start of a stop string. Never decreases from one call to the next.
    """

    stopped: bool
    matched: str | None
    text: str
    stream_len: int


@dataclass
class StopChecker:
    """Finds stop strings in one request's growing output text.

    Call :meth:`check` with the whole decoded output after each step. Only the tail that could hold
    a new match is searched, so a request costs O(total text) overall. The text must grow by
    appending (feed confirmed text, holding back a trailing partial UTF-8 character); a text shorter
    than the last one is searched again from the start.
    """

    stop: Sequence[str]
    no_stop_trim: bool = False
    _scan_from: int = field(default=0, init=False, repr=False)
    _last_len: int = field(default=0, init=False, repr=False)

    @classmethod
    def from_params(cls, params: SamplingParams) -> StopChecker:
        return cls(stop=list(params.stop), no_stop_trim=params.no_stop_trim)

    def check(self, text: str) -> StopCheck:
        if not self.stop:
            return StopCheck(False, None, text, len(text))
        if len(text) < self._last_len:
            self._scan_from = 0
        self._last_len = len(text)
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            at = text.find(s, self._scan_from)
            if at >= 0 and (best is None or (at, len(s)) < best[:2]):
                best = (at, len(s), s)
        if best is not None:
            out = text if self.no_stop_trim else text[: best[0]]
            return StopCheck(True, best[2], out, len(out))
        longest = max(len(s) for s in self.stop)
        self._scan_from = max(0, len(text) - longest + 1)
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return StopCheck(False, None, text, len(text) - held)


def finish_reason(
    token_id: int, num_output_tokens: int, params: SamplingParams, eos_token_ids: Collection[int] | None = None
) -> Literal["stop", "length"] | None:
    """Why a request ends after emitting ``token_id``, or ``None`` if it goes on.

    ``num_output_tokens`` counts the output so far, ``token_id`` included. As SGLang's
    ``Req.check_finished``: reaching ``max_new_tokens`` is ``"length"`` (checked first); otherwise,
    a token in ``params.stop_token_ids``, or (unless ``ignore_eos``) in ``eos_token_ids``, is
    ``"stop"``: ids the user named explicitly stop even with ``ignore_eos``, as in vLLM. Stop
    strings are :class:`StopChecker`'s job.
    """
    if num_output_tokens >= params.max_new_tokens:
        return "length"
    if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in (eos_token_ids or ())):
        return "stop"
    return None
