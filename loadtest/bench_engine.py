"""Engine benchmark: our Mamba (float32, bf16 and int8 weights) against transformers and llama.cpp, same weights.

Every side holds the same seeded random weights: transformers' ``MambaForCausalLM`` (``--arch mamba1``) or
``Mamba2ForCausalLM`` (``--arch mamba2``: d_state 128, head_dim 64, n_groups 1, a tied head) is built first
and saved; ours
loads that folder through the production loader (with ``--quantize`` modes applied); llama.cpp, where installed
(see ``loadtest/llama_peer.py``), runs the folder converted to GGUF f32 and quantized to Q8_0. Rounds are
interleaved: each round times every side once on every measure, so a shared machine's drifts hit all alike;
figures are medians with the range over rounds. Reported, in tokens/s:

- decode at batch 1, 8 and 32 (greedy, prompt of 8 tokens);
- prefill of 512 and 2048 tokens (last logits + recurrent state).

The machine's limits are measured in the same rounds (``loadtest/machine_limits.py``), and each figure is also
given as a fraction of its limit: decode b1 as weight bytes per token x tok/s over the memory read bandwidth;
batched decode and prefill as FLOPs per token x tok/s over the float32 matmul rate.

    python -m loadtest.bench_engine --shape 130m --quantize none,bf16,int8 --llama-bench PATH --llama-src SRC
    python -m loadtest.bench_engine --arch mamba2 --shape 130m --out loadtest/results/bench_engine_mamba2_130m.json
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
from loadtest import llama_peer, machine_limits

SHAPES = {"default": {"d_model": 256, "n_layer": 4, "vocab": 264},
          "130m": {"d_model": 768, "n_layer": 24, "vocab": 50280}}
BATCHES = (1, 8, 32)
PREFILLS = (512, 2048)
TARGETS = {"decode_b1": 3.0, "prefill_2048": 10.0}  # ours float32 over transformers


ARCHS = {"mamba1": {"d_state": 16, "expand": 2, "d_conv": 4},
         "mamba2": {"d_state": 128, "expand": 2, "d_conv": 4, "head_dim": 64, "n_groups": 1, "chunk_size": 256}}


def build_hf(shape: dict, folder: Path, arch: str = "mamba1"):
    import transformers

    torch.manual_seed(0)
    if arch == "mamba2":
        d_inner = 2 * shape["d_model"]
        cfg = transformers.Mamba2Config(vocab_size=shape["vocab"], hidden_size=shape["d_model"],
                                        num_hidden_layers=shape["n_layer"], state_size=128, expand=2, conv_kernel=4,
                                        head_dim=64, num_heads=d_inner // 64, n_groups=1, chunk_size=256,
                                        tie_word_embeddings=True)  # as state-spaces/mamba2-130m
        hf = transformers.Mamba2ForCausalLM(cfg).eval()
    else:
        cfg = transformers.MambaConfig(vocab_size=shape["vocab"], hidden_size=shape["d_model"],
                                       num_hidden_layers=shape["n_layer"], state_size=16, expand=2, conv_kernel=4)
        hf = transformers.MambaForCausalLM(cfg).eval()
    # No EOS: every side must generate exactly the greedy tokens, token 0 included.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(folder)
    return hf


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


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def torch_cases(sides: dict, args, vocab: int) -> dict[str, tuple[float, dict]]:
    """measure -> (tokens per call, {side: callable})."""
    g = torch.Generator().manual_seed(0)
    n = args.decode_tokens
    cases = {}
    for batch in BATCHES:
        prompt = torch.randint(0, vocab, (batch, 8), generator=g)
        calls = {name: (lambda m=m, p=prompt, gen=hf_generate if name == "hf" else ours_generate: gen(m, p, n))
                 for name, m in sides.items()}
        cases[f"decode_b{batch}"] = (batch * n, calls)
    for length in PREFILLS:
        ids = torch.randint(0, vocab, (1, length), generator=g)
        calls = {name: (lambda m=m, i=ids: m(i, use_cache=True, logits_to_keep=1)) if name == "hf"
                 else (lambda m=m, i=ids: m.prefill(i)) for name, m in sides.items()}
        cases[f"prefill_{length}"] = (length, calls)
    return cases


def write_byte_level_tokenizer(path: Path) -> None:
    """A byte-level BPE without merges (256 tokens): encodes any text for a random model of any vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))


def with_tokenizer(folder: Path, out: Path) -> Path:
    """``folder``'s files linked into ``out`` plus a tokenizer.json.

    The loader refuses a folder whose vocabulary is not byte-level without its tokenizer (the 130M shape), while
    llama.cpp's converter must see no tokenizer (it then writes its built-in vocabulary; ours has no merges):
    each side gets its own view of the same weights.
    """
    out.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        (out / f.name).symlink_to(f.resolve())
    write_byte_level_tokenizer(out / "tokenizer.json")
    return out


def load_sides(args, folder: Path, hf) -> dict:
    from engine.checkpoint import load_model

    sides = {f"ours_{mode}": load_model(folder, quantize=mode).model for mode in args.quantize}
    if hf is not None:
        sides["hf"] = hf
    return sides


def llama_round(tools, ggufs: dict, args) -> dict[str, dict[str, float]]:
    """One repetition of llama.cpp's tools on each GGUF, for the measures asked for."""
    prefills = [n for n in PREFILLS if f"prefill_{n}" in args.measures]
    batches = [b for b in BATCHES if b > 1 and f"decode_b{b}" in args.measures]
    rates = {}
    for kind, path in ggufs.items():
        r = llama_peer.run_bench(tools, path, args.threads, args.decode_tokens, prefills)
        r.update(llama_peer.run_batched(tools, path, args.threads, args.decode_tokens, batches))
        rates[f"llama_{kind}"] = r
    return rates


def summarise(samples: dict, limits: dict, cost: dict) -> dict:
    """Medians, ranges and fractions of the machine's limit per measure and side."""
    bandwidth = max(limits["memory_read_gbps"]) * 1e9
    flops = max(limits["matmul_gflops"]) * 1e9
    out: dict[str, dict] = {}
    for measure, per_side in samples.items():
        out[measure] = {}
        for side, rates in per_side.items():
            entry = {"tok_s": statistics.median(rates), "tok_s_range": [min(rates), max(rates)], "rounds": len(rates)}
            if side in cost:
                bytes_tok, flops_tok, prefill_flops_tok = cost[side]
                if measure.startswith("prefill"):
                    flops_tok = prefill_flops_tok  # logits at the last token only
                if measure == "decode_b1":
                    entry["limit_tok_s"] = bandwidth / bytes_tok
                    entry["limit"] = "memory read bandwidth / weight bytes per token"
                else:
                    entry["limit_tok_s"] = flops / flops_tok
                    entry["limit"] = "float32 matmul rate / FLOPs per token"
                entry["fraction_of_limit"] = entry["tok_s"] / entry["limit_tok_s"]
            out[measure][side] = entry
        for side in per_side:  # per-round ratios: the rounds interleave the sides, so round r met the same load
            for peer in ("hf", "llama_f32", "llama_q8_0", "ours_none"):
                if side.startswith("ours") and peer != side and peer in per_side:
                    ratios = [a / b for a, b in zip(per_side[side], per_side[peer])]
                    out[measure][side][f"vs_{peer}"] = {"median": statistics.median(ratios),
                                                        "range": [min(ratios), max(ratios)]}
    return out


def run(args: argparse.Namespace) -> dict:
    import transformers

    from engine.quant import describe, weight_bytes_per_token

    torch.set_num_threads(args.threads)
    if args.tune_allocator:
        keep_freed_memory()  # process-wide: helps every side alike
    shape = dict(SHAPES[args.shape])
    if args.arch == "mamba2":  # a multiple of 16, as mamba-ssm pads Mamba-2 vocabularies (and llama.cpp expects)
        shape["vocab"] = -(-shape["vocab"] // 16) * 16
    tools, why_no_llama = (llama_peer.find_tools(args.llama_bench, args.llama_src) if args.llama
                           else (None, "--no-llama"))
    samples: dict[str, dict[str, list[float]]] = {}
    limits: dict[str, list[float]] = {"memory_read_gbps": [], "matmul_gflops": []}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        folder = Path(tmp) / "hf"
        hf = build_hf(shape, folder, args.arch)
        sides = load_sides(args, with_tokenizer(folder, Path(tmp) / "ours"), hf if args.hf else None)
        cost = {name: (weight_bytes_per_token(m), machine_limits.flops_per_token(m),
                       machine_limits.flops_per_token(m, head=False)) for name, m in sides.items() if name != "hf"}
        ggufs = llama_peer.convert(tools, folder, Path(tmp)) if tools else {}
        gguf_bytes = {name: path.stat().st_size for name, path in ggufs.items()}
        for name, path in ggufs.items():  # tied head: the GGUF's bytes are what a decode step reads
            cost[f"llama_{name}"] = (path.stat().st_size, *(cost["ours_none"][1:] if "ours_none" in cost else (0.0, 0.0)))
        cases = {k: v for k, v in torch_cases(sides, args, shape["vocab"]).items() if k in args.measures}
        for _, calls in cases.values():  # warm-up
            for fn in calls.values():
                fn()
        for r in range(args.repeats):
            for key, values in machine_limits.measure(repeats=2).items():
                limits[key].extend(values)
            for measure, (tokens, calls) in cases.items():
                for side, fn in calls.items():
                    samples.setdefault(measure, {}).setdefault(side, []).append(tokens / timed(fn))
            for side, rates in (llama_round(tools, ggufs, args) if tools else {}).items():
                for measure, rate in rates.items():
                    if measure in args.measures:
                        samples.setdefault(measure, {}).setdefault(side, []).append(rate)
            print(f"round {r + 1}/{args.repeats} done", flush=True)
        checks = {}
        if args.hf and "ours_none" in sides:
            prompt = torch.randint(0, shape["vocab"], (2, 8), generator=torch.Generator().manual_seed(1))
            checks["greedy_tokens_equal_hf"] = torch.equal(ours_generate(sides["ours_none"], prompt, 32),
                                                           hf_generate(hf, prompt, 32))
        precision = {name: describe(m) for name, m in sides.items() if name != "hf"}
    results = summarise(samples, limits, cost)
    for key, target in TARGETS.items():
        if "hf" in results.get(key, {}) and "ours_none" in results[key]:
            ratio = results[key]["ours_none"]["tok_s"] / results[key]["hf"]["tok_s"]
            results[key]["ours_none"].update(ratio_vs_hf=ratio, target_ratio=target, meets_target=ratio >= target)
    return {
        "benchmark": "bench_engine",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": "cpu", "load_average": os.getloadavg()},
        "limits": {k: {"best": max(v), "range": [min(v), max(v)]} for k, v in limits.items()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "llama.cpp": tools.version() if tools else None},
        "llama_cpp": {"present": tools is not None, "why_absent": why_no_llama or None,
                      "gguf_bytes": gguf_bytes},
        "shape": args.shape, "arch": args.arch, "model": {**shape, **ARCHS[args.arch], "weights": "random, seed 0"},
        "precision": precision, "cost_per_token": {k: {"weight_bytes": b, "flops": f, "prefill_flops": pf}
                                                    for k, (b, f, pf) in cost.items()},
        "decode_tokens": args.decode_tokens, "repeats": args.repeats, "allocator_tuned": args.tune_allocator,
        "checks": checks, "results": results,
    }


def format_table(report: dict) -> str:
    sides = sorted({s for per in report["results"].values() for s in per})
    rows = ["| measure | " + " | ".join(sides) + " |", "|---|" + "---:|" * len(sides)]
    for measure, per in report["results"].items():
        cells = []
        for side in sides:
            e = per.get(side)
            if e is None:
                cells.append("")
                continue
            lo, hi = e["tok_s_range"]
            frac = f" ({e['fraction_of_limit']:.0%})" if "fraction_of_limit" in e else ""
            cells.append(f"{e['tok_s']:.0f} [{lo:.0f}-{hi:.0f}]{frac}")
        rows.append(f"| {measure} | " + " | ".join(cells) + " |")
    for side in (s for s in sides if s.startswith("ours")):
        for peer in ("hf", "llama_f32", "llama_q8_0", "ours_none"):
            parts = [f"{m} {per[side][f'vs_{peer}']['median']:.2f} [{per[side][f'vs_{peer}']['range'][0]:.2f}-"
                     f"{per[side][f'vs_{peer}']['range'][1]:.2f}]"
                     for m, per in report["results"].items() if f"vs_{peer}" in per.get(side, {})]
            if parts:
                rows.append(f"{side} / {peer} per round: " + ", ".join(parts))
    lim = report["limits"]
    rows.append(f"limits: memory read {lim['memory_read_gbps']['range'][0]:.1f}-{lim['memory_read_gbps']['best']:.1f}"
                f" GB/s, matmul {lim['matmul_gflops']['range'][0]:.0f}-{lim['matmul_gflops']['best']:.0f} GFLOP/s; "
                f"load average {report['machine']['load_average'][0]:.1f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/bench_engine.json"))
    parser.add_argument("--shape", choices=sorted(SHAPES), default="default")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="mamba1", help="the mixer of every layer")
    parser.add_argument("--quantize", default="none,bf16,int8",
                        help="comma-separated weight modes of ours: none (float32), bf16, int8")
    parser.add_argument("--measures", default=",".join([f"decode_b{b}" for b in BATCHES] +
                                                           [f"prefill_{n}" for n in PREFILLS]),
                        help="comma-separated subset of the measures")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="leave transformers out")
    parser.add_argument("--no-llama", dest="llama", action="store_false", help="leave llama.cpp out")
    parser.add_argument("--llama-bench", default=None, help="llama-bench binary (else $CRSM_LLAMA_BENCH or PATH)")
    parser.add_argument("--llama-src", default=None,
                        help="llama.cpp source folder with convert_hf_to_gguf.py (else $CRSM_LLAMA_SRC)")
    parser.add_argument("--no-tune-allocator", dest="tune_allocator", action="store_false",
                        help="leave glibc's malloc thresholds alone (the engine raises them)")
    args = parser.parse_args(argv)
    args.quantize = [m.strip() for m in args.quantize.split(",") if m.strip()]
    args.measures = [m.strip() for m in args.measures.split(",") if m.strip()]
    from engine.quant import check_mode

    for mode in args.quantize:
        try:
            check_mode(mode)
        except ValueError as exc:
            parser.error(str(exc))
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
