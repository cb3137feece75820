"""Seeded synthetic workloads for the serving benchmarks: what to send, to which adapter, and when.

A workload is a list of :class:`RequestSpec` (random prompt token ids, an exact output length, an
adapter name or None for the base model), built by :func:`make_workload` as SGLang's
``bench_serving --dataset-name random`` builds its requests; :func:`poisson_arrival_times` gives the
send times of a Poisson process. Nothing here speaks HTTP, so the HTTP benchmark
(``bench_serving.py``) and benchmarks on the Python API share the same workloads.

Adapter choice per request (``--lora-request-distribution``, SGLang's names and semantics):

- ``uniform``: each request picks one of the adapters uniformly at random;
- ``distinct``: round robin in request order, so consecutive requests use different adapters;
- ``skewed``: adapter ``i`` (0-based, in the order given) is chosen with probability proportional
  to ``alpha ** -i``, so adapter ``i`` gets ``alpha`` times the requests of adapter ``i + 1``.
  SGLang calls this Zipf; strictly it is geometric (a rank-power Zipf would use ``(i + 1) ** -alpha``).
  We keep SGLang's formula and its default ``alpha = 1.5`` so results compare with SGLang's.

Randomness comes from independent streams of one seed (prompt lengths and tokens; adapters;
arrivals), so the prompts stay the same when only the adapter distribution or the rate changes.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DISTRIBUTIONS = ("uniform", "distinct", "skewed", "zipf")
DEFAULT_ZIPF_ALPHA = 1.5  # SGLang's --lora-zipf-alpha default
DEFAULT_ZIPF_EXPONENT = 1.0  # "zipf": adapter i's share proportional to (i + 1) ** -exponent
_PROMPTS, _ADAPTERS, _ARRIVALS = 0, 1, 2  # seed streams


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: prompt token ids, exact number of tokens to generate, adapter."""

    input_ids: list[int]
    output_len: int
    lora_name: str | None

    @property
    def input_len(self) -> int:
        return len(self.input_ids)

    def sampling_params(self) -> dict[str, Any]:
        """Greedy and ``ignore_eos``, so the server generates exactly ``output_len`` tokens."""
        return {"max_new_tokens": self.output_len, "ignore_eos": True, "temperature": 0}


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed])


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; give an integer >= 1")
    return int(value)


def special_token_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's special ids: ``all_special_ids`` and added tokens marked special."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or ())
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def allowed_token_ids(vocab_size: int, tokenizer: Any = None, low: int = 0) -> np.ndarray:
    """Ids prompts are drawn from: ``[low, vocab_size)``, without the tokenizer's special ids and
    ids past the tokenizer's length (the model's vocabulary may be padded beyond it)."""
    vocab_size = _positive_int("vocab_size", vocab_size)
    if isinstance(low, bool) or not isinstance(low, int) or not 0 <= low < vocab_size:
        raise ValueError(f"low={low!r} is invalid; give an integer in [0, vocab_size={vocab_size})")
    high = vocab_size if tokenizer is None else min(vocab_size, len(tokenizer))
    ids = np.arange(low, high, dtype=np.int64)
    if tokenizer is not None:
        ids = np.setdiff1d(ids, np.fromiter(special_token_ids(tokenizer), dtype=np.int64))
    if ids.size == 0:
        raise ValueError(f"no token ids left to draw from in [{low}, {high}) once special tokens are excluded")
    return ids


def sample_lengths(num: int, length: int, range_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """SGLang's random lengths: uniform integers in ``[max(int(length * range_ratio), 1), length]``
    (``range_ratio=1`` gives exactly ``length``)."""
    length = _positive_int("length", length)
    if not isinstance(range_ratio, (int, float)) or not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"range_ratio={range_ratio!r} is invalid; give a number in [0, 1] (1 = exact lengths)")
    lowest = max(int(length * range_ratio), 1)
    return rng.integers(lowest, length + 1, size=num)


def skewed_probabilities(num_adapters: int, zipf_alpha: float) -> np.ndarray:
    """Share of requests per adapter under ``skewed``: proportional to ``zipf_alpha ** -i``."""
    if not isinstance(zipf_alpha, (int, float)) or isinstance(zipf_alpha, bool) or not zipf_alpha > 1.0:
        raise ValueError(
            f"zipf_alpha={zipf_alpha!r} is invalid; give a number > 1 (1 would be the uniform distribution)"
        )
    weights = float(zipf_alpha) ** -np.arange(num_adapters, dtype=np.float64)
    return weights / weights.sum()


def zipf_probabilities(num_adapters: int, exponent: float) -> np.ndarray:
    """Share of requests per adapter under ``zipf`` (a power law, as S-LoRA's workloads): proportional
    to ``(i + 1) ** -exponent``, so a long tail of adapters is still asked for (``skewed``'s geometric
    shares leave all but the first few dozen adapters without requests)."""
    if not isinstance(exponent, (int, float)) or isinstance(exponent, bool) or not 0.0 < exponent <= 10.0:
        raise ValueError(f"zipf exponent {exponent!r} is invalid; give a number in (0, 10]")
    weights = np.arange(1, num_adapters + 1, dtype=np.float64) ** -float(exponent)
    return weights / weights.sum()


def sample_lora_names(
    num: int,
    lora_names: Sequence[str] | None,
    distribution: str,
    zipf_alpha: float = DEFAULT_ZIPF_ALPHA,
    seed: int = 0,
    zipf_exponent: float = DEFAULT_ZIPF_EXPONENT,
) -> list[str | None]:
    """One adapter name per request (all None, the base model, when ``lora_names`` is empty)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution={distribution!r} is invalid; choose one of {', '.join(DISTRIBUTIONS)}")
    names = list(lora_names or ())
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise ValueError(f"adapter name {bad[0]!r} is invalid; give non-empty strings")
    probs = None
    if distribution == "skewed":
        probs = skewed_probabilities(max(len(names), 1), zipf_alpha)
    elif distribution == "zipf":
        probs = zipf_probabilities(max(len(names), 1), zipf_exponent)
    if not names:
        return [None] * num
    if distribution == "distinct":
        return [names[i % len(names)] for i in range(num)]
    rng = _rng(seed, _ADAPTERS)
    picks = rng.choice(len(names), size=num, p=probs) if probs is not None else rng.integers(0, len(names), size=num)
    return [names[int(i)] for i in picks]


def make_workload(
    num_prompts: int,
    input_len: int,
    output_len: int,
    vocab_size: int,
    lora_names: Sequence[str] | None = None,
    distribution: str = "uniform",
    *,
    zipf_alpha: float = DEFAULT_ZIPF_ALPHA,
    zipf_exponent: float = DEFAULT_ZIPF_EXPONENT,
    seed: int = 1,
    range_ratio: float = 1.0,
    tokenizer: Any = None,
    low: int = 0,
) -> list[RequestSpec]:
    """``num_prompts`` requests with random prompts (ids from :func:`allowed_token_ids`), lengths from
    :func:`sample_lengths` (exact with ``range_ratio=1``), and adapters from :func:`sample_lora_names`."""
    num_prompts = _positive_int("num_prompts", num_prompts)
    input_len, output_len = _positive_int("input_len", input_len), _positive_int("output_len", output_len)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} is invalid; give an integer >= 0")
    loras = sample_lora_names(num_prompts, lora_names, distribution, zipf_alpha, seed, zipf_exponent)
    pool = allowed_token_ids(vocab_size, tokenizer, low)
    rng = _rng(seed, _PROMPTS)
    in_lens = sample_lengths(num_prompts, input_len, range_ratio, rng)
    out_lens = sample_lengths(num_prompts, output_len, range_ratio, rng)
    tokens = pool[rng.integers(0, pool.size, size=int(in_lens.sum()))].tolist()
    specs, start = [], 0
    for n_in, n_out, lora in zip(in_lens.tolist(), out_lens.tolist(), loras):
        specs.append(RequestSpec(tokens[start : start + n_in], n_out, lora))
        start += n_in
    return specs


def poisson_arrival_times(num_requests: int, request_rate: float, seed: int = 1) -> list[float]:
    """Send times in seconds from the start: the first at 0, then exponential gaps of mean
    ``1 / request_rate`` (a Poisson process, as SGLang's ``get_request``); all 0 when the rate is inf."""
    num_requests = _positive_int("num_requests", num_requests)
    if not isinstance(request_rate, (int, float)) or isinstance(request_rate, bool) or not request_rate > 0:
        raise ValueError(f"request_rate={request_rate!r} is invalid; give a number > 0 (inf sends all at once)")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    gaps = _rng(seed, _ARRIVALS).exponential(1.0 / request_rate, size=num_requests - 1)
    return [0.0] + np.cumsum(gaps).tolist()


def describe_workload(workload: Sequence[RequestSpec]) -> dict[str, Any]:
    """Totals of a workload, for the results file: requests, tokens, requests per adapter."""
    counts = Counter("<base>" if s.lora_name is None else s.lora_name for s in workload)
    return {
        "num_requests": len(workload),
        "total_input_tokens": sum(s.input_len for s in workload),
        "total_output_tokens": sum(s.output_len for s in workload),
        "requests_per_adapter": dict(counts.most_common()),
    }
