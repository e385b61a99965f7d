"""Engine benchmark: our pure-PyTorch Mamba against transformers' MambaForCausalLM.

Both models hold the same random weights (ours is loaded from the HF folder
through the production loader) and run in the same process, one after the
other, so the figures are ratios taken side by side. Reported:

- decode tokens/s at batch 1 and 32 (greedy, prompt of 8 tokens);
- prefill tokens/s at 512 and 2048 tokens (last logits + recurrent state).

    python -m loadtest.bench_engine --out loadtest/results/bench_engine.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engine.runtime import keep_freed_memory

TARGETS = {"decode_b1": 3.0, "prefill_2048": 10.0}


def timed_pair(ours, baseline, repeats: int) -> tuple[float, float]:
    """Median wall times of two callables, run alternately after a warm-up each.

    Alternating keeps slow drifts of a shared machine from favouring either side.
    """
    ours()
    baseline()
    t_ours, t_base = [], []
    for _ in range(repeats):
        for fn, times in ((ours, t_ours), (baseline, t_base)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(t_ours), statistics.median(t_base)


def build_models(d_model: int, n_layer: int, vocab: int, folder: Path):
    import transformers

    from engine.checkpoint import load_model

    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layer, state_size=16,
                                   expand=2, conv_kernel=4)
    hf = transformers.MambaForCausalLM(cfg).eval()
    # No EOS: both sides must generate exactly the greedy tokens, token 0 included.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(folder)
    ours = load_model(folder).model
    return hf, ours


def ours_generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The engine's decode loop: prefill once, then one batched step per token."""
    logits, state = model.prefill(prompt)
    tok = logits.argmax(-1)
    out = [tok]
    for _ in range(new_tokens - 1):
        tok = model.step(tok, state).argmax(-1)
        out.append(tok)
    return torch.stack(out, 1)


def hf_generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    seq = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False)
    return seq[:, prompt.shape[1] :]


def run(args: argparse.Namespace) -> dict:
    import transformers

    torch.set_num_threads(args.threads)
    if args.tune_allocator:
        keep_freed_memory()  # process-wide: helps both sides alike
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        hf, ours = build_models(args.d_model, args.n_layer, args.vocab, Path(tmp))
        g = torch.Generator().manual_seed(0)
        for batch in (1, 32):
            prompt = torch.randint(0, args.vocab, (batch, 8), generator=g)
            n = args.decode_tokens
            t_ours, t_hf = timed_pair(lambda: ours_generate(ours, prompt, n), lambda: hf_generate(hf, prompt, n),
                                      args.repeats)
            same = torch.equal(ours_generate(ours, prompt, n), hf_generate(hf, prompt, n))
            results[f"decode_b{batch}"] = {
                "batch": batch, "new_tokens": n, "ours_tok_s": batch * n / t_ours, "hf_tok_s": batch * n / t_hf,
                "ratio": t_hf / t_ours, "greedy_tokens_equal": same,
            }
        for length in (512, 2048):
            ids = torch.randint(0, args.vocab, (1, length), generator=g)
            t_ours, t_hf = timed_pair(lambda: ours.prefill(ids), lambda: hf(ids, use_cache=True, logits_to_keep=1),
                                      args.repeats)
            diff = (ours.prefill(ids)[0] - hf(ids, use_cache=True, logits_to_keep=1).logits[:, -1]).abs().max().item()
            results[f"prefill_{length}"] = {
                "tokens": length, "ours_tok_s": length / t_ours, "hf_tok_s": length / t_hf, "ratio": t_hf / t_ours,
                "max_abs_logit_diff": diff,
            }
    for key, target in TARGETS.items():
        results[key]["target_ratio"] = target
        results[key]["meets_target"] = results[key]["ratio"] >= target
    return {
        "benchmark": "bench_engine",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": "cpu"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": {"d_model": args.d_model, "n_layer": args.n_layer, "vocab_size": args.vocab, "d_state": 16,
                  "expand": 2, "d_conv": 4, "dtype": "float32"},
        "baseline": "transformers MambaForCausalLM (CPU path without mamba-ssm kernels), same weights, same process",
        "repeats": args.repeats,
        "allocator_tuned": args.tune_allocator,
        "results": results,
    }


def format_table(report: dict) -> str:
    rows = ["| measure | ours tok/s | transformers tok/s | ratio | target |", "|---|---:|---:|---:|---:|"]
    for key, r in report["results"].items():
        target = f">= {r['target_ratio']:.0f}x" if "target_ratio" in r else ""
        rows.append(f"| {key} | {r['ours_tok_s']:.0f} | {r['hf_tok_s']:.0f} | {r['ratio']:.2f}x | {target} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/bench_engine.json"))
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=264)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-tune-allocator", dest="tune_allocator", action="store_false",
                        help="leave glibc's malloc thresholds alone (the engine raises them)")
    args = parser.parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
