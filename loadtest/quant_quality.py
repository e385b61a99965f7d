"""What weight-only bf16 / int8 costs in quality on the default checkpoint.

Three figures per mode, beside float32 on the same inputs:

- held-out bits per byte, measured exactly as training measures it
  (``engine.train.backbone.bits_per_byte``: the same 10 batches of 32 windows
  of 128 bytes, each read from an empty state);
- held-out bits per byte through the decode step (64 windows of 128 bytes,
  teacher-forced through ``model.step`` from an empty state): the arithmetic
  a served decode runs, which for quantized weights differs from prefill's;
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
import math
import time
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint import load_model
from engine.train.backbone import bits_per_byte
from engine.train.data import load_split, sample_windows

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "default"


def greedy(model, prompts: torch.Tensor, new_tokens: int, batch: int = 16) -> torch.Tensor:
    """(N, new_tokens) greedy tokens: per ``batch`` prompts one prefill, then one batched step per token.

    Batches of 16 take the decode path the server's batches take (the fused step and its GEMVs run up to 32
    rows; a 64-row batch would measure torch's kernels instead).
    """
    chunks = []
    for rows in prompts.split(batch):
        logits, state = model.prefill(rows)
        out = []
        for _ in range(new_tokens):
            token = logits.argmax(-1)
            out.append(token)
            logits = model.step(token, state)
        chunks.append(torch.stack(out, 1))
    return torch.cat(chunks)


def decode_bits_per_byte(model, windows: torch.Tensor, batch: int = 16) -> float:
    """Bits per byte teacher-forced through ``model.step`` from an empty state: the arithmetic a served
    decode runs (the fused step and its GEMVs), where ``bits_per_byte`` runs the prefill path."""
    nll, count = 0.0, 0
    for rows in windows.split(batch):
        state = model.allocate_state(rows.shape[0])
        for t in range(rows.shape[1] - 1):
            logits = model.step(rows[:, t], state)
            nll += float(torch.nn.functional.cross_entropy(logits.float(), rows[:, t + 1], reduction="sum"))
            count += rows.shape[0]
    return nll / count / math.log(2)


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    same = a == b
    return {"tokens_identical": float(same.float().mean()), "prompts_all_identical": float(same.all(1).float().mean())}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    val = load_split(args.data, "val")
    prompts = torch.from_numpy(sample_windows(val, None, args.prompts, 64, 0.0, np.random.default_rng(7))).long()
    windows = torch.from_numpy(sample_windows(val, None, 64, 128, 0.0, np.random.default_rng(8))).long()
    results = {}
    with torch.inference_mode():
        reference = None
        for mode in ("none", "bf16", "int8"):
            model = load_model(args.checkpoint, quantize=mode).model
            bpb = bits_per_byte(model, val, 128, 10, 32)
            decode_bpb = decode_bits_per_byte(model, windows)
            tokens = greedy(model, prompts, args.new_tokens)
            reference = tokens if reference is None else reference
            results[mode] = {"held_out_bits_per_byte": bpb, "decode_bits_per_byte": decode_bpb,
                             **agreement(tokens, reference)}
            print(mode, results[mode], flush=True)
    return {"benchmark": "quant_quality", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "checkpoint": str(args.checkpoint), "prompts": args.prompts, "new_tokens": args.new_tokens,
            "bits_per_byte_eval": "engine.train.backbone.bits_per_byte(val, 128, 10 batches, 32 windows)",
            "decode_bits_per_byte_eval": "64 held-out windows of 128 bytes, teacher-forced through model.step in "
                                         "batches of 16 from an empty state",
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
