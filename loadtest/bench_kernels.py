"""Eager PyTorch against the fused CPU kernels (engine/ops/cpu_fused.py), side by side in one process.

Per shape (the default d_model 256 x 4 layers and the 130M shape d_model 768
x 24 layers, random seeded weights, fp32): decode tokens/s at batch 1, 8 and
32, prefill tokens/s at 512 and 2048 tokens. Rounds interleave the two paths
(order alternating per round) and every figure is reported as median and
range over the rounds. Also: the cold start (building the library into an
empty cache, then loading it), the machine's measured matmul rate (the limit
prefill and batched decode are compared against), transformers on the
default shape (the `make bench` baseline) and the machine's load.

    python -m loadtest.bench_kernels --out loadtest/results/bench_kernels.json
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

from engine.config import MambaConfig
from engine.models.mamba_lm import MambaLMHeadModel
from engine.ops import cpu_fused
from engine.runtime import keep_freed_memory

SHAPES = {"default": {"d_model": 256, "n_layer": 4, "vocab_size": 264}, "130m": {"d_model": 768, "n_layer": 24,
                                                                                 "vocab_size": 50280}}
LLAMA_CPP_F32_B1 = (1697, 2368)  # tok/s on the default shape, measured earlier on this machine (issue 16)


def use(mode: str) -> None:
    os.environ[cpu_fused.ENV_SWITCH] = mode
    cpu_fused.reset()


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def decode_time(model: MambaLMHeadModel, batch: int, steps: int) -> float:
    state = model.allocate_state(batch)
    tok = torch.randint(0, model.config.vocab_size, (batch,), generator=torch.Generator().manual_seed(batch))
    model.step(tok, state)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = model.step(tok, state).argmax(-1)
    return time.perf_counter() - t0


def prefill_time(model: MambaLMHeadModel, length: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    t0 = time.perf_counter()
    model.prefill(ids)
    return time.perf_counter() - t0


def matmul_gflops(m: int, k: int, n: int, repeats: int = 5) -> float:
    """Best fp32 GEMM rate torch reaches here on an (m, k) x (k, n) product: the matmul limit."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def matmul_flops_per_token(cfg: MambaConfig, lm_head: bool = True) -> int:
    """Projection FLOPs per token; prefill computes logits for the last token only (``lm_head=False``)."""
    d, di, p = cfg.d_model, cfg.d_inner, cfg.dt_rank_value + 2 * cfg.d_state
    per_layer = d * 2 * di + di * p + cfg.dt_rank_value * di + di * d
    return 2 * (cfg.n_layer * per_layer + (d * cfg.vocab_size if lm_head else 0))


def bench_shape(name: str, args: argparse.Namespace) -> dict:
    cfg = MambaConfig(**SHAPES[name])
    model = MambaLMHeadModel(cfg)
    model.init_weights(seed=0)
    model.eval()
    steps = args.decode_steps if name == "default" else max(4, args.decode_steps // 4)
    cases = [(f"decode_b{b}", b) for b in (1, 8, 32)] + [(f"prefill_{n}", n) for n in (512, 2048)]
    cases = [c for c in cases if not args.cases or c[0] in args.cases]
    times: dict[str, dict[str, list[float]]] = {c: {"eager": [], "fused": []} for c, _ in cases}
    for r in range(args.rounds + 1):  # round 0 warms up and is dropped
        for case, size in cases:
            for mode in (("eager", "fused") if r % 2 else ("fused", "eager")):
                use(mode)
                t = decode_time(model, size, steps) if case.startswith("decode") else prefill_time(model, size)
                if r:
                    times[case][mode].append(t)
    flops_tok = matmul_flops_per_token(cfg)
    gemm = matmul_gflops(2048, cfg.d_model, 2 * cfg.d_inner)
    out = {"config": SHAPES[name], "decode_steps": steps, "matmul_flops_per_token": flops_tok,
           "matmul_limit_gflops": gemm, "cases": {}}
    for case, size in cases:
        tokens = size * steps if case.startswith("decode") else size
        row = {m: spread([tokens / t for t in times[case][m]]) for m in ("eager", "fused")}
        row["speedup"] = spread([e / f for e, f in zip(times[case]["eager"], times[case]["fused"])])
        flops = flops_tok if case.startswith("decode") else matmul_flops_per_token(cfg, lm_head=False)
        row["fused_fraction_of_matmul_limit"] = row["fused"]["median"] * flops / (gemm * 1e9)
        out["cases"][case] = row
    return out


def cold_start() -> dict:
    """Build into an empty cache (what a fresh container pays once), then a cached load."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[cpu_fused.ENV_CACHE] = tmp
        try:
            use("fused")
            built = cpu_fused.status()
            cpu_fused.reset()
            cached = cpu_fused.status()
        finally:
            del os.environ[cpu_fused.ENV_CACHE]
            cpu_fused.reset()
    return {"build_seconds": built.build_seconds, "path": built.path, "reason": built.reason,
            "cached_load_seconds": cached.load_seconds}


def hf_default(args: argparse.Namespace, ours: dict) -> dict:
    """transformers (make bench's baseline) on the default shape: prefill 2048 and decode b1."""
    import transformers

    cfg = SHAPES["default"]
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["d_model"], num_hidden_layers=cfg["n_layer"], state_size=16,
        expand=2, conv_kernel=4)).eval()
    ids = torch.randint(0, cfg["vocab_size"], (1, 2048), generator=torch.Generator().manual_seed(0))
    prefill = []
    for _ in range(args.hf_repeats):
        t0 = time.perf_counter()
        hf(ids, use_cache=True, logits_to_keep=1)
        prefill.append(2048 / (time.perf_counter() - t0))
    hf_tok_s = statistics.median(prefill)
    fused = ours["cases"]["prefill_2048"]["fused"]["median"]
    return {"prefill_2048_tok_s": spread(prefill), "fused_over_hf_prefill_2048": fused / hf_tok_s,
            "note": "HF timed after the interleaved rounds (not interleaved): its prefill takes tens of seconds"}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    load_before = os.getloadavg()
    report = {"benchmark": "bench_kernels", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                          "loadavg_before": load_before},
              "versions": {"torch": torch.__version__}, "rounds": args.rounds, "cold_start": cold_start(),
              "shapes": {}}
    with torch.inference_mode():
        for name in args.shapes:
            report["shapes"][name] = bench_shape(name, args)
        if "prefill_2048" in report["shapes"].get("default", {}).get("cases", {}) and args.hf_repeats:
            report["transformers_default"] = hf_default(args, report["shapes"]["default"])
    default = report["shapes"].get("default")
    if default and "decode_b1" in default["cases"]:
        b1 = default["cases"]["decode_b1"]["fused"]["median"]
        report["targets"] = {"default_decode_b1_vs_llama_cpp_f32": {"fused_tok_s": b1, "llama_cpp": LLAMA_CPP_F32_B1,
                                                                    "meets": b1 >= LLAMA_CPP_F32_B1[0]}}
    report["machine"]["loadavg_after"] = os.getloadavg()
    return report


def format_table(report: dict) -> str:
    rows = ["| shape | case | eager tok/s | fused tok/s | speedup (range) | fused / matmul limit |",
            "|---|---|---:|---:|---:|---:|"]
    for name, shape in report["shapes"].items():
        for case, r in shape["cases"].items():
            s = r["speedup"]
            rows.append(f"| {name} | {case} | {r['eager']['median']:.0f} | {r['fused']['median']:.0f} | "
                        f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f}) | "
                        f"{100 * r['fused_fraction_of_matmul_limit']:.0f}% |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/bench_kernels.json"))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--cases", nargs="*", default=[], help="subset, e.g. decode_b1 prefill_2048 (default: all)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--hf-repeats", type=int, default=2, help="0 skips transformers")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(json.dumps({k: report[k] for k in ("cold_start", "machine")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
