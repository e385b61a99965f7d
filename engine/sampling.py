"""Batched token sampling with per-row parameters.

One call handles a whole decode batch: each row has its own temperature,
top-k, top-p, repetition penalty and random generator, so the rows of
different requests never influence each other. A row with a seed draws
only from its own generator, which makes its output independent of what
else is in the batch: same seed, same tokens.

Sampling uses the exponential-race form (``argmax(p / E)`` with
``E ~ Exp(1)``), which is an exact draw from ``p`` and lets each row use its
own generator without a per-row ``multinomial`` call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence
    seed: int | None = None
    logprobs: int | None = None  # how many top alternatives to report; None: only the chosen one

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("logprobs must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        """A private generator for a seeded request (None: use the shared one)."""
        if self.seed is None:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed)
        return gen


@dataclass
class SampleOutput:
    token_ids: Tensor  # (B,) long
    logprobs: Tensor  # (B,) log p(chosen) under the model's distribution
    top_ids: Tensor | None  # (B, n) or None when no row asked for alternatives
    top_logprobs: Tensor | None  # (B, n)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """CTRL-style penalty on tokens already seen: positive logits divided, negative multiplied.

    logits (B, V); seen (B, V) bool; penalty (B,) with 1 meaning off.
    """
    p = penalty.unsqueeze(-1)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def _truncate(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Mask everything outside each row's top-k and nucleus (top-p) with -inf."""
    V = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    drop = rank.unsqueeze(0) >= k.unsqueeze(-1)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass strictly above each token
    drop |= before > top_p.unsqueeze(-1)  # the first token always stays (before == 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(
    logits: Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
    seen: Tensor | None = None,
) -> SampleOutput:
    """Pick one token per row of ``logits`` (B, V).

    ``generators[i]`` is row i's private generator (from
    :meth:`SamplingParams.make_generator`) or None. ``seen`` (B, V) bool marks
    tokens already in each row's sequence, for the repetition penalty.
    Logprobs are those of the model's own distribution (before penalty,
    temperature and truncation), as OpenAI-compatible servers report them.
    """
    B, V = logits.shape
    if len(params) != B:
        raise ValueError(f"{len(params)} sampling params for {B} rows")
    logits = logits.float()
    device = logits.device
    logprobs_all = torch.log_softmax(logits, dim=-1)

    work = logits
    if seen is not None and any(p.repetition_penalty != 1.0 for p in params):
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device)
        work = apply_repetition_penalty(work, seen, penalty)

    chosen = torch.argmax(work, dim=-1)
    if not all(p.greedy for p in params):  # the all-greedy batch stops here: one argmax
        greedy = torch.tensor([p.greedy for p in params], device=device)
        temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
        work = work / temperature.unsqueeze(-1)
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            top_k = torch.tensor([p.top_k for p in params], device=device)
            top_p = torch.tensor([p.top_p for p in params], device=device)
            work = _truncate(work, top_k, top_p)
        probs = torch.softmax(work, dim=-1)
        own = [i for i in range(B) if generators is not None and generators[i] is not None]
        if len(own) == B:
            noise = torch.empty_like(probs)
        else:
            noise = torch.empty_like(probs).exponential_()  # rows without a private generator share the default
        for i in own:
            assert generators is not None  # own is empty without them
            noise[i].exponential_(generator=generators[i])
        sampled = torch.argmax(probs / noise, dim=-1)
        chosen = torch.where(greedy, chosen, sampled)

    chosen_logprobs = logprobs_all.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    n = max((p.logprobs or 0) for p in params)
    top_ids = top_lp = None
    if n > 0:
        top_lp, top_ids = torch.topk(logprobs_all, k=min(n, V), dim=-1)
    return SampleOutput(chosen, chosen_logprobs, top_ids, top_lp)
