"""Logit parity with a transformers model: a full forward, then a prefill and 31 cached steps against ``generate``."""

from __future__ import annotations

import torch


def off_the_init(model) -> None:
    """Move a transformers Mamba's (or Mamba-2's) A_log, dt bias and D off their initial values, so that every
    parameter matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "A_log" in name or "dt_proj.bias" in name or "dt_bias" in name or name.endswith(".D"):
                p.add_(0.5 * torch.randn_like(p))


def max_logit_differences(hf, model, ids: torch.Tensor, prompt: int = 16, steps: int = 32) -> tuple[float, float]:
    """(max |ours - theirs| over a full forward of ``ids``, the same over ``steps`` decode logits after a prefill of
    ``ids[:, :prompt]``: one prefill and ``steps - 1`` cached steps, fed the tokens ``generate`` chose)."""
    with torch.no_grad():
        full, _ = model(ids)
        forward = (full - hf(ids).logits).abs().max().item()
        gen = hf.generate(ids[:, :prompt], max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
        logits, state = model.prefill(ids[:, :prompt])
        ours = [logits]
        for t in range(steps - 1):
            logits = model.step(gen.sequences[:, prompt + t], state)
            ours.append(logits)
    return forward, (torch.stack(ours, 1) - torch.stack(gen.logits, 1)).abs().max().item()
