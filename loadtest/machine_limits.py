"""The machine's own limits, measured in the benchmark's run so its figures can be read as fractions of them.

- memory read bandwidth: ``sum`` over a float32 tensor much larger than the
  last-level cache (what batch-1 decode does with its weights);
- matmul rate: a large float32 ``mm`` at the benchmark's thread count (what
  batched decode and prefill are bound by).

A limit is the best of the repetitions (the machine can do at least that);
the range is kept beside it.
"""

from __future__ import annotations

import time

import torch


def _best_rate(fn, amount: float, repeats: int) -> list[float]:
    fn()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        rates.append(amount / (time.perf_counter() - t0))
    return rates


def memory_read_gbps(megabytes: int = 512, repeats: int = 5) -> list[float]:
    """GB/s of ``tensor.sum()`` over ``megabytes`` of float32 (one read of every byte)."""
    data = torch.ones(megabytes * (1 << 20) // 4)
    return [r / 1e9 for r in _best_rate(lambda: data.sum(), data.numel() * 4, repeats)]


def matmul_gflops(n: int = 2048, repeats: int = 5) -> list[float]:
    """GFLOP/s of an (n, n) x (n, n) float32 matmul (2 n^3 flops)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return [r / 1e9 for r in _best_rate(lambda: torch.mm(a, b), 2.0 * n**3, repeats)]


def measure(repeats: int = 3) -> dict[str, list[float]]:
    with torch.inference_mode():
        return {"memory_read_gbps": memory_read_gbps(repeats=repeats), "matmul_gflops": matmul_gflops(repeats=repeats)}


def flops_per_token(model, head: bool = True) -> float:
    """Forward FLOPs per token: 2 per linear weight, plus the scan's ~9 per (d_inner x d_state) element per layer
    (Mamba-1's scan; Mamba-2's decode step does about as much per element, its chunked prefill more in matmuls).

    ``head=False`` leaves the LM head out: a prefill computes logits at its last token only.
    """
    cfg = model.config
    linear = 0
    for layer in model.backbone.layers:
        m = layer.mixer
        for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):  # a Mamba-2 mixer has in_proj and out_proj
            if (lin := getattr(m, name, None)) is not None:
                linear += lin.in_features * lin.out_features
    if head:
        linear += cfg.d_model * cfg.vocab_size
    return 2.0 * linear + 9.0 * cfg.n_layer * cfg.d_inner * cfg.d_state
