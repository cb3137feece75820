"""Sampling parameters: one request's SGLang-named parameters, its generator and its token history.

:class:`SamplingParams` carries SGLang's request parameters (names and defaults) and validates them
with :class:`~loraserve.errors.UserError`; :meth:`SamplingParams.from_dict` is how an HTTP body
becomes one. :func:`make_generator` gives a seeded request its own generator, and
:class:`TokenHistory` is the per-request state the penalties read, updated in O(1) per token.
Nothing here keeps module-level state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from loraserve.errors import UserError
from loraserve.safe_json import field_path

# Below this temperature a request decodes greedily, as in SGLang; dividing logits by a
# near-zero temperature would overflow float32 without changing the argmax.
SAMPLING_EPS = 1e-6
# OpenAI's limit on ``top_logprobs``; the vocabulary size bounds it further when known.
MAX_TOP_LOGPROBS = 20
# Stop strings are searched in the output text after every token, so their number and length are
# bounded: far above OpenAI's 4 stop sequences, far below what would slow a step.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1000
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
_INT_FIELDS = ("max_new_tokens", "top_k", "n", "top_logprobs_num")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "return_logprob")


def _invalid(name: str, value: Any, allowed: str) -> UserError:
    return UserError(f"sampling parameter {name}={value!r} is invalid; allowed: {allowed}")


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling parameters, validated on construction (SGLang names and defaults).

    After construction ``stop`` is always a list of strings and ``stop_token_ids`` a list of ints
    (empty when not given). ``temperature`` below ``SAMPLING_EPS`` (0 included) or ``top_k == 1``
    means greedy. ``top_k`` of -1 or 0 disables top-k. ``n`` is kept for the engine, which fans a
    request out into ``n`` sequences; the sampler itself sees one sequence per row.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0

    def __post_init__(self) -> None:
        self._check_types()
        for name in _FLOAT_FIELDS:
            object.__setattr__(self, name, float(getattr(self, name)))
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", list(self.stop_token_ids or []))
        self.validate()

    @classmethod
    def from_dict(cls, data: Any) -> SamplingParams:
        """Build from a JSON object, as an HTTP request sends it.

        Unknown keys are refused with the list of allowed ones. ``null`` for a parameter whose
        default is not ``null`` means "use the default", as SGLang's ``/generate`` accepts.
        """
        if not isinstance(data, Mapping):
            raise UserError(f"sampling parameters must be a JSON object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(field_path((str(k),)) for k in data if k not in known)
        if unknown:
            raise UserError(f"unknown sampling parameter(s) {', '.join(unknown)}; allowed: {', '.join(known)}")
        values = {k: v for k, v in data.items() if v is not None or known[k].default is None}
        return cls(**values)

    def _check_types(self) -> None:
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"sampling parameter {name} must be a number, got {type(value).__name__} {value!r}")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"sampling parameter {name} must be an integer, got {type(value).__name__} {value!r}")
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise UserError(
                    f"sampling parameter {name} must be true or false, got {type(value).__name__} {value!r}"
                )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise UserError(
                f"sampling parameter seed must be an integer or null, got {type(self.seed).__name__} {self.seed!r}"
            )
        stop = self.stop
        if isinstance(stop, (list, tuple)) and len(stop) > MAX_STOP_STRINGS:  # before looking at each one
            raise UserError(
                f"sampling parameter stop has {len(stop)} strings; allowed: at most {MAX_STOP_STRINGS}, "
                f"each at most {MAX_STOP_CHARS} characters"
            )
        if not (
            stop is None
            or isinstance(stop, str)
            or (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop))
        ):
            raise UserError(f"sampling parameter stop must be a string, a list of strings or null, got {stop!r}")
        ids = self.stop_token_ids
        if not (
            ids is None
            or (
                isinstance(ids, (list, tuple, set, frozenset))
                and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
            )
        ):
            raise UserError(f"sampling parameter stop_token_ids must be a list of integers or null, got {ids!r}")

    def validate(self, vocab_size: int | None = None) -> None:
        """Check every range; with ``vocab_size``, also the token ids and ``top_logprobs_num``."""
        for name in _FLOAT_FIELDS:
            if not math.isfinite(getattr(self, name)):
                raise _invalid(name, getattr(self, name), "a finite number")
        if self.max_new_tokens < 0:
            raise _invalid("max_new_tokens", self.max_new_tokens, "an integer >= 0")
        if self.temperature < 0:
            raise _invalid("temperature", self.temperature, ">= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise _invalid("top_p", self.top_p, "0 < top_p <= 1 (1 disables top-p)")
        if self.top_k < -1:
            raise _invalid("top_k", self.top_k, "-1 or 0 (disabled) or an integer >= 1")
        if not 0 <= self.min_p <= 1:
            raise _invalid("min_p", self.min_p, "0 <= min_p <= 1 (0 disables min-p)")
        if self.repetition_penalty <= 0:
            raise _invalid("repetition_penalty", self.repetition_penalty, "> 0 (1 means no penalty)")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise _invalid(name, getattr(self, name), "-2 <= value <= 2 (0 means no penalty)")
        if self.n < 1:
            raise _invalid("n", self.n, "an integer >= 1")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise _invalid("seed", self.seed, "null or an integer in [0, 2**64)")
        most = MAX_TOP_LOGPROBS if vocab_size is None else min(MAX_TOP_LOGPROBS, vocab_size)
        if not 0 <= self.top_logprobs_num <= most:
            raise _invalid("top_logprobs_num", self.top_logprobs_num, f"0 <= top_logprobs_num <= {most}")
        if any(s == "" for s in self.stop):
            raise _invalid("stop", self.stop, "non-empty strings")
        longest = max(map(len, self.stop), default=0)
        if longest > MAX_STOP_CHARS:
            raise UserError(
                f"sampling parameter stop has a string of {longest} characters; allowed: at most "
                f"{MAX_STOP_CHARS} characters each"
            )
        upper = "" if vocab_size is None else f" and < vocab size {vocab_size}"
        for t in self.stop_token_ids:
            if t < 0 or (vocab_size is not None and t >= vocab_size):
                raise _invalid("stop_token_ids", self.stop_token_ids, f"token ids >= 0{upper}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def needs_logprobs(self) -> bool:
        return self.return_logprob or self.top_logprobs_num > 0


def device_of(device: torch.device | str) -> torch.device:
    """``device`` with its index filled in: a generator made on "cuda" reports "cuda", tensors "cuda:0"."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The per-request generator for ``seed`` on ``device``, or ``None`` for an unseeded request.

    The engine makes it once when the request arrives and passes it to every :meth:`Sampler.sample`.
    """
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


class TokenHistory:
    """Which tokens one request has seen, as dense ``[V]`` tensors the penalties read directly.

    ``occurred`` (bool) marks prompt and output tokens (repetition penalty); ``output_counts``
    (int32) counts output tokens (frequency and presence penalties). The engine builds one only for
    a request whose parameters have penalties, and calls :meth:`append` with each sampled token:
    O(1) per token, and a step costs O(V) per penalised row, independent of the sequence length.
    Ids >= ``vocab_size`` (an embedding larger than the logits) are ignored, as transformers does.
    """

    def __init__(
        self,
        prompt_ids: Sequence[int] | torch.Tensor,
        vocab_size: int,
        device: torch.device | str = "cpu",
        output_ids: Sequence[int] | torch.Tensor = (),
    ) -> None:
        self.vocab_size = vocab_size
        self.occurred = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self.output_counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
        self.occurred[self._in_vocab(prompt_ids)] = True
        self.extend(output_ids)

    def _in_vocab(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.occurred.device).reshape(-1)
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError(f"token ids must be >= 0, got {int(ids.min())}")
        return ids[ids < self.vocab_size]

    def append(self, token_id: int) -> None:
        if 0 <= token_id < self.vocab_size:
            self.occurred[token_id] = True
            self.output_counts[token_id] += 1

    def add_device(self, token_id: torch.Tensor) -> None:
        """Count a sampled token given as a one-element int64 tensor on the history's device, with
        no host synchronisation (the sampler's tokens are always inside the vocabulary)."""
        self.occurred[token_id] = True
        self.output_counts.index_add_(0, token_id, torch.ones_like(token_id, dtype=torch.int32))

    def extend(self, token_ids: Sequence[int] | torch.Tensor) -> None:
        ids = self._in_vocab(token_ids)
        self.occurred[ids] = True
        self.output_counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
