"""Greedy agreement after a resume from a state stored in bfloat16 (``--state-dtype bfloat16``) against float32.

For each prompt (windows of the repository's own docs, so real text for a trained model): prefill the history,
store the state both ways through the session record format (float32, and the SSM part in bfloat16), load each
back and decode ``--tokens`` greedy tokens from it. Reported per model: how many of the tokens equal the float32
resume's (all of them, and before the first difference), the largest logit difference at the first step, and
the bytes of each record. A trained model (the default checkpoint) is the figure that matters; a random
Mamba-2 of the 130M shape is reported too, as the worst case: its logits are nearly flat, so any rounding can
flip an argmax.

    python -m loadtest.state_precision --out loadtest/results/state_precision.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from engine.sessions import Session
from engine.sessions.record import decode_session, encode_session
from engine.state import STORED_SSM_DTYPES

ROOT = Path(__file__).resolve().parents[1]


def prompts(tokenizer, n: int, history: int) -> list[list[int]]:
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md")))
    ids = tokenizer.encode(text)
    step = max(1, (len(ids) - history) // n)
    return [ids[i * step : i * step + history] for i in range(n) if len(ids) >= i * step + history]


def greedy(model, state, logits, n: int) -> list[int]:
    out = []
    for _ in range(n):
        token = logits.argmax(-1)
        out.append(int(token))
        logits = model.step(token, state)
    return out


def measure(model, tokenizer, n_prompts: int, history: int, tokens: int) -> dict:
    shape = model.state_shape()
    rows = []
    sizes = {}
    with torch.inference_mode():
        for ids in prompts(tokenizer, n_prompts, history):
            logits, state = model.prefill(torch.tensor([ids[:-1]]))
            resumed = {}
            for name, dtype in STORED_SSM_DTYPES.items():
                blob = encode_session(Session(id="sess-" + "0" * 24, owner=None, state=state, pending=[ids[-1]],
                                              n_tokens=len(ids)), "bench", shape, dtype)
                sizes[name] = len(blob)
                back = decode_session(blob, shape, "bench").state
                first = model.step(torch.tensor([ids[-1]]), back)
                resumed[name] = (greedy(model, back, first, tokens), first)
            ref, test = resumed["float32"], resumed["bfloat16"]
            same = [a == b for a, b in zip(ref[0], test[0])]
            prefix = next((i for i, s in enumerate(same) if not s), len(same))
            rows.append({"equal": sum(same), "equal_prefix": prefix,
                         "first_logit_max_diff": float((ref[1] - test[1]).abs().max())})
    equal = [r["equal"] / tokens for r in rows]
    prefix = [r["equal_prefix"] for r in rows]
    diffs = [r["first_logit_max_diff"] for r in rows]
    return {"prompts": len(rows), "history_tokens": history, "decoded_tokens": tokens,
            "state_bytes": shape.nbytes_per_sequence, "record_bytes": sizes,
            "tokens_equal_fraction": {"median": statistics.median(equal), "min": min(equal), "max": max(equal),
                                      "mean": statistics.mean(equal)},
            "equal_prefix_tokens": {"median": statistics.median(prefix), "min": min(prefix), "max": max(prefix)},
            "all_equal_prompts": sum(r["equal"] == tokens for r in rows),
            "first_step_logit_max_diff": {"median": statistics.median(diffs), "max": max(diffs)}}


def random_mamba2_130m():
    from engine.config import MambaConfig
    from engine.models import MambaLMHeadModel
    from engine.text.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    cfg = MambaConfig(layer="Mamba2", d_model=768, n_layer=24, vocab_size=50288, d_state=128, headdim=64)
    return MambaLMHeadModel(cfg).eval(), ByteTokenizer()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "default")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--history", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--no-random-mamba2", dest="random_mamba2", action="store_false")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results" / "state_precision.json")
    args = parser.parse_args(argv)
    from engine.checkpoint import load_model

    loaded = load_model(args.checkpoint)
    report = {"benchmark": "state_precision", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "cpus": os.cpu_count(), "torch": torch.__version__, "models": {}}
    report["models"][f"checkpoint ({loaded.model.config.layer}, trained)"] = measure(
        loaded.model, loaded.tokenizer, args.prompts, args.history, args.tokens)
    if args.random_mamba2:
        model, tokenizer = random_mamba2_130m()
        report["models"]["Mamba2 130M shape (random weights)"] = measure(model, tokenizer, max(4, args.prompts // 4),
                                                                         args.history, args.tokens)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["models"], indent=2))


if __name__ == "__main__":
    main()
