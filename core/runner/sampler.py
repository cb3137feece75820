"""The batched next-token sampler.

:class:`Sampler` turns one decode step's raw logits ``[B, V]`` into ``B`` tokens with per-row
parameters, matching Hugging Face transformers' logits processors in their order: repetition
penalty (prompt and output tokens), OpenAI frequency and presence penalties (output tokens),
temperature, top-k, top-p, min-p. Each engine owns its sampler and its generators.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraserve.sched.sampling_params import SamplingParams, TokenHistory, device_of


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
        device = device_of(device)
        if device not in self._generators:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.seed)
            self._generators[device] = gen
        return self._generators[device]

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        histories: Sequence[TokenHistory | None] | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> SamplerOutput:
        """Choose one token per row of ``logits`` (``[B, V]``, raw model output; not modified).

        ``histories[i]`` is needed where ``params[i].needs_penalties``; ``generators[i]`` is the
        row's own generator (see :func:`make_generator`) or ``None``.
        """
        if all(p.is_greedy and not p.needs_penalties for p in params) and logits.dim() == 2:
            # the common case needs no processed copy of the [batch, vocab] logits
            if logits.shape[0] != len(params):
                raise ValueError(f"logits has {logits.shape[0]} rows but {len(params)} SamplingParams were given")
            return self._with_logprobs(logits, params, logits.argmax(dim=-1))
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
            rows = _on(scores.device, greedy)
            token_ids[rows] = scores[rows].argmax(dim=-1)
            rows = _on(scores.device, sampled)
            token_ids[rows] = self._draw(scores[rows], [gens[i] for i in sampled])
        return self._with_logprobs(logits, params, token_ids)

    def process_logits(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        histories: Sequence[TokenHistory | None] | None = None,
    ) -> torch.Tensor:
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
            rows = _on(scores.device, sampled)
            scores[rows] = _warp(scores[rows], [params[i] for i in sampled])
        return scores

    def _apply_penalties(
        self, scores: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[TokenHistory | None] | None
    ) -> None:
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
        idx = _on(dev, rows)
        sub = scores[idx]
        occurred = torch.stack([histories[i].occurred for i in rows])
        counts = torch.stack([histories[i].output_counts for i in rows]).to(torch.float32)

        def column(name: str) -> torch.Tensor:
            return _on(dev, [getattr(params[i], name) for i in rows], torch.float32)[:, None]

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
            rows = _on(probs.device, shared)
            q[rows] = torch.empty_like(q[rows]).exponential_(generator=self.generator(probs.device))
        for j, gen in enumerate(generators):
            if gen is not None:
                if device_of(gen.device) != probs.device:
                    raise ValueError(f"row generator is on {gen.device} but logits are on {probs.device}")
                q[j].exponential_(generator=gen)
        # q may be exactly 0; tokens with p == 0 then give 0/tiny == 0 and are still never chosen.
        return (probs / q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)

    @staticmethod
    def _with_logprobs(
        logits: torch.Tensor, params: Sequence[SamplingParams], token_ids: torch.Tensor
    ) -> SamplerOutput:
        top: list[list[tuple[int, float]] | None] = [None] * len(params)
        if not any(p.needs_logprobs for p in params):
            return SamplerOutput(token_ids, None, top)
        logprobs_all = torch.log_softmax(logits.to(torch.float32), dim=-1)
        chosen = logprobs_all.gather(1, token_ids[:, None]).squeeze(1)
        want = [i for i, p in enumerate(params) if p.top_logprobs_num > 0]
        if want:
            k = max(params[i].top_logprobs_num for i in want)
            rows = _on(logits.device, want)
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
        scores = scores / _on(dev, temps, torch.float32)[:, None]
    ks = [min(p.top_k, vocab) if p.top_k > 0 else 0 for p in params]
    if any(ks):
        kth = scores.topk(max(ks), dim=-1).values.gather(1, _on(dev, [max(k, 1) - 1 for k in ks])[:, None])
        kth = torch.where(_on(dev, ks)[:, None] > 0, kth, -math.inf)
        scores = scores.masked_fill(scores < kth, -math.inf)
    if any(p.top_p < 1.0 for p in params):
        # 1 - top_p in double precision, as transformers computes it; rows at 1.0 remove nothing.
        cut = _on(dev, [1 - p.top_p if p.top_p < 1.0 else -1.0 for p in params], torch.float32)
        sorted_scores, order = torch.sort(scores, descending=False)
        remove_sorted = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= cut[:, None]
        remove_sorted[:, -1] = False
        remove = remove_sorted.scatter(1, order, remove_sorted)
        scores = scores.masked_fill(remove, -math.inf)
    if any(p.min_p > 0 for p in params):
        min_p = _on(dev, [p.min_p for p in params], torch.float32)[:, None]
        probs = scores.softmax(dim=-1)
        scores = scores.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), -math.inf)
    return scores


def _on(device: torch.device, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """``values`` as a tensor on ``device`` by an asynchronous copy: a blocking one would wait for
    the steps still running on the device (the engine loop overlaps)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
