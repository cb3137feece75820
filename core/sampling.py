"""Sampling: per-request parameters, the batched next-token sampler, and stop conditions.

:class:`SamplingParams` carries SGLang's request parameters (names and defaults) and validates them
with :class:`~loraserve.errors.UserError`; :meth:`SamplingParams.from_dict` is how an HTTP body
becomes one. :class:`Sampler` turns one decode step's raw logits ``[B, V]`` into ``B`` tokens with
per-row parameters, matching Hugging Face transformers' logits processors in their order:
repetition penalty (prompt and output tokens), OpenAI frequency and presence penalties (output
tokens), temperature, top-k, top-p, min-p. :class:`TokenHistory` is the per-request state the
penalties read, updated in O(1) per token. :class:`StopChecker` finds stop strings in streamed text
and :func:`finish_reason` decides stop/length from the last token. Nothing here keeps module-level
state: each engine owns its sampler and its generators.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

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
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
                "return_logprob")


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
    def from_dict(cls, data: Any) -> "SamplingParams":
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
                raise UserError(f"sampling parameter {name} must be true or false, got {type(value).__name__} {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise UserError(f"sampling parameter seed must be an integer or null, got "
                            f"{type(self.seed).__name__} {self.seed!r}")
        stop = self.stop
        if isinstance(stop, (list, tuple)) and len(stop) > MAX_STOP_STRINGS:  # before looking at each one
            raise UserError(f"sampling parameter stop has {len(stop)} strings; allowed: at most {MAX_STOP_STRINGS}, "
                            f"each at most {MAX_STOP_CHARS} characters")
        if not (stop is None or isinstance(stop, str)
                or (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop))):
            raise UserError(f"sampling parameter stop must be a string, a list of strings or null, got {stop!r}")
        ids = self.stop_token_ids
        if not (ids is None or (isinstance(ids, (list, tuple, set, frozenset))
                                and all(isinstance(t, int) and not isinstance(t, bool) for t in ids))):
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
            raise UserError(f"sampling parameter stop has a string of {longest} characters; allowed: at most "
                            f"{MAX_STOP_CHARS} characters each")
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


def _device_of(device: torch.device | str) -> torch.device:
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

    def __init__(self, prompt_ids: Sequence[int] | torch.Tensor, vocab_size: int,
                 device: torch.device | str = "cpu", output_ids: Sequence[int] | torch.Tensor = ()) -> None:
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

    def extend(self, token_ids: Sequence[int] | torch.Tensor) -> None:
        ids = self._in_vocab(token_ids)
        self.occurred[ids] = True
        self.output_counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))


@dataclass
class SamplerOutput:
    """One step's result.

    :ivar token_ids: ``int64 [B]``, the chosen tokens.
    :ivar logprobs: ``float32 [B]``, log-probability of each chosen token under the *raw* logits
        (``log_softmax`` of the model's output before penalties, temperature and filtering), as
        vLLM and SGLang report by default; ``None`` when no row asked for logprobs.
    :ivar top_logprobs: per row, ``None`` or the ``top_logprobs_num`` most likely
        ``(token_id, logprob)`` pairs under the raw logits, most likely first.
    """

    token_ids: torch.Tensor
    logprobs: torch.Tensor | None
    top_logprobs: list[list[tuple[int, float]] | None]


class Sampler:
    """Chooses the next token of every request in a decode batch; rows may differ in every parameter.

    Greedy rows take the argmax after penalties. Sampling rows draw from the processed softmax by
    an exponential race (``argmax(p / q)`` with ``q ~ Exp(1)``), each seeded row drawing ``q`` from
    its own generator, so its token depends only on its seed, its logits and its history — never on
    the other rows of the batch. Unseeded rows share the sampler's generator, seeded from
    ``seed`` (the server's ``--random-seed``) or from the OS when ``seed`` is None.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device | str) -> torch.Generator:
        """The sampler's generator for unseeded rows on ``device``, made on first use."""
        device = _device_of(device)
        if device not in self._generators:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.seed)
            self._generators[device] = gen
        return self._generators[device]

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               histories: Sequence[TokenHistory | None] | None = None,
               generators: Sequence[torch.Generator | None] | None = None) -> SamplerOutput:
        """Choose one token per row of ``logits`` (``[B, V]``, raw model output; not modified).

        ``histories[i]`` is needed where ``params[i].needs_penalties``; ``generators[i]`` is the
        row's own generator (see :func:`make_generator`) or ``None``.
        """
        scores = self.process_logits(logits, params, histories)
        batch, _ = scores.shape
        if generators is not None and len(generators) != batch:
            raise ValueError(f"got {len(generators)} generators for a batch of {batch} rows")
        gens = list(generators) if generators is not None else [None] * batch
        greedy = [i for i, p in enumerate(params) if p.is_greedy]
        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        if not sampled:
            token_ids = scores.argmax(dim=-1)
        elif not greedy:
            token_ids = self._draw(scores, gens)
        else:
            token_ids = torch.empty(batch, dtype=torch.long, device=scores.device)
            rows = torch.tensor(greedy, device=scores.device)
            token_ids[rows] = scores[rows].argmax(dim=-1)
            rows = torch.tensor(sampled, device=scores.device)
            token_ids[rows] = self._draw(scores[rows], [gens[i] for i in sampled])
        return self._with_logprobs(logits, params, token_ids)

    def process_logits(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                       histories: Sequence[TokenHistory | None] | None = None) -> torch.Tensor:
        """The scores rows are chosen from, ``float32 [B, V]``: penalties on every row, then, on
        sampling rows only, temperature, top-k, top-p and min-p (filtered tokens are ``-inf``)."""
        if logits.dim() != 2 or not logits.is_floating_point():
            raise ValueError(f"logits must be a floating-point [B, V] tensor, got {tuple(logits.shape)} {logits.dtype}")
        if logits.shape[0] != len(params):
            raise ValueError(f"logits has {logits.shape[0]} rows but {len(params)} SamplingParams were given")
        if histories is not None and len(histories) != len(params):
            raise ValueError(f"got {len(histories)} histories for a batch of {len(params)} rows")
        scores = logits.to(torch.float32, copy=True)
        self._apply_penalties(scores, params, histories)
        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        if len(sampled) == len(params) and sampled:
            scores = _warp(scores, list(params))
        elif sampled:
            rows = torch.tensor(sampled, device=scores.device)
            scores[rows] = _warp(scores[rows], [params[i] for i in sampled])
        return scores

    def _apply_penalties(self, scores: torch.Tensor, params: Sequence[SamplingParams],
                         histories: Sequence[TokenHistory | None] | None) -> None:
        rows = [i for i, p in enumerate(params) if p.needs_penalties]
        if not rows:
            return
        vocab = scores.shape[1]
        for i in rows:
            h = histories[i] if histories is not None else None
            if h is None:
                raise ValueError(f"row {i} has penalties but no TokenHistory was given for it")
            if h.vocab_size != vocab:
                raise ValueError(f"row {i}: TokenHistory has vocab size {h.vocab_size} but logits have {vocab}")
        dev = scores.device
        idx = torch.tensor(rows, device=dev)
        sub = scores[idx]
        occurred = torch.stack([histories[i].occurred for i in rows])
        counts = torch.stack([histories[i].output_counts for i in rows]).to(torch.float32)

        def column(name: str) -> torch.Tensor:
            return torch.tensor([getattr(params[i], name) for i in rows], dtype=torch.float32, device=dev)[:, None]

        rep = column("repetition_penalty")
        # transformers' RepetitionPenaltyLogitsProcessor: shrink seen tokens toward zero.
        sub = torch.where(occurred, torch.where(sub < 0, sub * rep, sub / rep), sub)
        sub = sub - (column("frequency_penalty") * counts + column("presence_penalty") * (counts > 0))
        scores[idx] = sub

    def _draw(self, scores: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1)
        q = torch.empty_like(probs)
        shared = [j for j, g in enumerate(generators) if g is None]
        if len(shared) == len(generators):
            q.exponential_(generator=self.generator(probs.device))
        elif shared:
            rows = torch.tensor(shared, device=probs.device)
            q[rows] = torch.empty_like(q[rows]).exponential_(generator=self.generator(probs.device))
        for j, gen in enumerate(generators):
            if gen is not None:
                if _device_of(gen.device) != probs.device:
                    raise ValueError(f"row generator is on {gen.device} but logits are on {probs.device}")
                q[j].exponential_(generator=gen)
        # q may be exactly 0; tokens with p == 0 then give 0/tiny == 0 and are still never chosen.
        return (probs / q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)

    @staticmethod
    def _with_logprobs(logits: torch.Tensor, params: Sequence[SamplingParams],
                       token_ids: torch.Tensor) -> SamplerOutput:
        top: list[list[tuple[int, float]] | None] = [None] * len(params)
        if not any(p.needs_logprobs for p in params):
            return SamplerOutput(token_ids, None, top)
        logprobs_all = torch.log_softmax(logits.to(torch.float32), dim=-1)
        chosen = logprobs_all.gather(1, token_ids[:, None]).squeeze(1)
        want = [i for i, p in enumerate(params) if p.top_logprobs_num > 0]
        if want:
            k = max(params[i].top_logprobs_num for i in want)
            rows = torch.tensor(want, device=logits.device)
            values, ids = logprobs_all[rows].topk(k, dim=-1)
            values, ids = values.tolist(), ids.tolist()
            for j, i in enumerate(want):
                n = params[i].top_logprobs_num
                top[i] = list(zip(ids[j][:n], values[j][:n]))
        return SamplerOutput(token_ids, chosen, top)


def _warp(scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on sampling rows, each exactly as transformers' warper."""
    dev, vocab = scores.device, scores.shape[1]
    temps = [p.temperature for p in params]
    if any(t != 1.0 for t in temps):
        scores = scores / torch.tensor(temps, dtype=torch.float32, device=dev)[:, None]
    ks = [min(p.top_k, vocab) if p.top_k > 0 else 0 for p in params]
    if any(ks):
        kth = scores.topk(max(ks), dim=-1).values.gather(1, torch.tensor([max(k, 1) - 1 for k in ks], device=dev)[:, None])
        kth = torch.where(torch.tensor(ks, device=dev)[:, None] > 0, kth, torch.tensor(-math.inf, device=dev))
        scores = scores.masked_fill(scores < kth, -math.inf)
    if any(p.top_p < 1.0 for p in params):
        # 1 - top_p in double precision, as transformers computes it; rows at 1.0 remove nothing.
        cut = torch.tensor([1 - p.top_p if p.top_p < 1.0 else -1.0 for p in params], dtype=torch.float32, device=dev)
        sorted_scores, order = torch.sort(scores, descending=False)
        remove_sorted = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= cut[:, None]
        remove_sorted[:, -1] = False
        remove = remove_sorted.scatter(1, order, remove_sorted)
        scores = scores.masked_fill(remove, -math.inf)
    if any(p.min_p > 0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev)[:, None]
        probs = scores.softmax(dim=-1)
        scores = scores.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), -math.inf)
    return scores


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
    def from_params(cls, params: SamplingParams) -> "StopChecker":
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
            out = text if self.no_stop_trim else text[:best[0]]
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


def finish_reason(token_id: int, num_output_tokens: int, params: SamplingParams,
                  eos_token_ids: Collection[int] | None = None) -> Literal["stop", "length"] | None:
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
