"""What weight-only bf16 / int8 costs in quality on the default checkpoint.

Two figures per mode, beside float32 on the same inputs:

- held-out bits per byte, measured exactly as training measures it
  (``engine.train.backbone.bits_per_byte``: the same 10 batches of 32 windows
  of 128 bytes, each read from an empty state);
- greedy agreement with float32: N held-out prompts (64 bytes each), 128
  greedy tokens from each model (prefill, then the decode step), the fraction
  of positions where both chose the same token (a free run: after a first
  difference the continuations usually part), and the fraction of prompts
  whose 128 tokens are all identical.

    python -m engine.train data --out data/pydoc   # the held-out text (python3.11-doc)
    python -m loadtest.quant_quality --data data/pydoc --out loadtest/results/quant_quality.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint import load_model
from engine.train.backbone import bits_per_byte
from engine.train.data import load_split, sample_windows

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "default"


def greedy(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """(N, new_tokens) greedy tokens: one prefill, then one batched step per token."""
    logits, state = model.prefill(prompts)
    out = []
    for _ in range(new_tokens):
        token = logits.argmax(-1)
        out.append(token)
        logits = model.step(token, state)
    return torch.stack(out, 1)


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    same = a == b
    return {"tokens_identical": float(same.float().mean()), "prompts_all_identical": float(same.all(1).float().mean())}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    val = load_split(args.data, "val")
    prompts = torch.from_numpy(sample_windows(val, None, args.prompts, 64, 0.0, np.random.default_rng(7))).long()
    results = {}
    with torch.inference_mode():
        reference = None
        for mode in ("none", "bf16", "int8"):
            model = load_model(args.checkpoint, quantize=mode).model
            bpb = bits_per_byte(model, val, 128, 10, 32)
            tokens = greedy(model, prompts, args.new_tokens)
            reference = tokens if reference is None else reference
            results[mode] = {"held_out_bits_per_byte": bpb, **agreement(tokens, reference)}
            print(mode, results[mode], flush=True)
    return {"benchmark": "quant_quality", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checkpoint": str(args.checkpoint), "prompts": args.prompts, "new_tokens": args.new_tokens,
            "bits_per_byte_eval": "engine.train.backbone.bits_per_byte(val, 128, 10 batches, 32 windows)",
            "results": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--data", type=Path, default=Path("data/pydoc"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/quant_quality.json"))
    args = parser.parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
