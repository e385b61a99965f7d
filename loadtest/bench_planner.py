"""Planner benchmark: the figures of the planner issue, side by side in one run.

1. Inter-token latency p50/p99 with thinking on against off, at 1 and 8
   concurrent streams: the in-process engine with a real planner pool
   (worker processes) and the server's thread split, default think settings
   (bounded lag: a sequence waits at apply_at for a late plan) and the same
   without waiting; off, on and on-without-wait alternate.
2. Leaf evaluations per second of the batched search (8 trees, 8 leaves per
   tree per round, all in one simulator call) against a one-node-at-a-time
   loop (one leaf per call, as CRSM's reasoning.py does), for both simulators.
3. Cost of one dynamics step against one backbone step, batched, for the
   checkpoint and for a mamba-130m-shaped model (random weights: cost only).
4. Fidelity of the dynamics on text (held-out bytes of this repository's
   README): cosine of the predicted against the true next SSM state, against
   the "next state = current state" baseline.

    python -m loadtest.bench_planner [--checkpoint DIR] --out loadtest/results/bench_planner.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from engine.checkpoint import load_model
from engine.config import MambaConfig
from engine.loop.scheduler import Engine
from engine.models import MambaLMHeadModel
from engine.models.planner_net import PlannerNet, load_planner
from engine.requests import GenerationRequest, TokenEvent
from engine.runtime import engine_threads, set_threads
from engine.sampling import SamplingParams
from engine.text.tokenizer import ByteTokenizer
from engine.thinking import ThinkParams
from planner.pool import PlannerPool
from planner.search import SearchConfig, search
from planner.simulators import BackboneSimulator, LatentSimulator
from planner.tree import Tree
from planner.worker import WorkerSpec

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "checkpoints" / "default"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# 1. Inter-token latency --------------------------------------------------------------
async def _streams(engine: Engine, n_streams: int, tokens: int, think: ThinkParams | None,
                   seed: int) -> tuple[list[float], list[float], list[float]]:
    """(inter-token gaps, times to first token, request times) of ``n_streams`` concurrent streams, seconds."""
    tok = ByteTokenizer()

    async def one(i: int) -> tuple[list[float], float, float]:
        start = time.monotonic()
        handle = engine.submit(GenerationRequest(tok.encode(f"Stream {i}: the function returns"),
                                                 SamplingParams(temperature=0.7, seed=seed + i), max_tokens=tokens,
                                                 ignore_eos=True, think=think))
        times = [e.time async for e in handle.events() if isinstance(e, TokenEvent)]
        return [b - a for a, b in zip(times, times[1:])], times[0] - start, times[-1] - start

    runs = await asyncio.gather(*[one(i) for i in range(n_streams)])
    return [g for gaps, _, _ in runs for g in gaps], [r[1] for r in runs], [r[2] for r in runs]


def _row(samples: dict[str, list[tuple[list[float], list[float], list[float]]]]) -> dict:
    """Per arm: pooled ITL p50/p99, the range of per-round ITL p50, mean TTFT and request time; ratios to off."""
    row: dict = {"target_p50_ratio": 1.15}
    for arm, rounds in samples.items():
        gaps = [g for r in rounds for g in r[0]]
        row[f"{arm}_p50_ms"] = 1e3 * percentile(gaps, 0.5)
        row[f"{arm}_p99_ms"] = 1e3 * percentile(gaps, 0.99)
        row[f"{arm}_p50_ms_per_round"] = [round(1e3 * percentile(r[0], 0.5), 3) for r in rounds]
        row[f"{arm}_ttft_ms"] = 1e3 * statistics.mean(t for r in rounds for t in r[1])
        row[f"{arm}_request_ms"] = 1e3 * statistics.mean(t for r in rounds for t in r[2])
        row["samples"] = len(gaps)
    for arm in samples:
        if arm != "off":
            row[f"{arm}_p50_ratio"] = row[f"{arm}_p50_ms"] / row["off_p50_ms"]
            row[f"{arm}_p99_ratio"] = row[f"{arm}_p99_ms"] / row["off_p99_ms"]
    return row


def bench_itl(checkpoint: Path, rounds: int, tokens: int, streams_list: tuple[int, ...] = (1, 8)) -> dict:
    """Off, on (defaults: bounded lag) and on without waiting, alternated round by round on one engine."""
    model = load_model(checkpoint).model
    tok = ByteTokenizer()
    out = {"uptime_before": os.getloadavg()}

    async def main():
        pool = PlannerPool(WorkerSpec(str(checkpoint)))
        engine = Engine(model, tok)
        engine.attach_planner(pool)
        await pool.start()
        engine.start()
        while not (engine.ready.is_set() and pool.ready):
            await asyncio.sleep(0.05)
        try:
            arms = {"off": None, "on": ThinkParams(), "on_no_wait": ThinkParams(wait=False, deliberation_lag=1),
                    "on_every_8": ThinkParams(plan_every=8),  # lag 0 always waits: never waiting needs lag >= 1
                    "off_last": None}  # the baseline again at the end of each round: the drift within a round
            for streams in streams_list:
                samples: dict[str, list] = {arm: [] for arm in arms}
                for r in range(rounds):
                    for arm, think in arms.items():
                        samples[arm].append(await _streams(engine, streams, tokens, think, seed=r))
                out[f"{streams}_streams"] = _row(samples)
            out["simulator"] = pool.info.get("simulator")
            out["think_defaults"] = ThinkParams().__dict__
        finally:
            engine.shutdown()
            await pool.stop()

    asyncio.run(main())
    out["uptime_after"] = os.getloadavg()
    return out


# 2. Batched vs one-at-a-time leaf evaluation ---------------------------------------------
def _trees(model, simulator, n: int, top_k: int) -> list[Tree]:
    tok = ByteTokenizer()
    trees = []
    for i in range(n):
        logits, state = model.prefill(torch.tensor([tok.encode(f"Example {i}: a generator is")]))
        states = simulator.root_states(state)
        trees.append(Tree(states, logits[0], float(simulator.value(states)), top_k))
    return trees


def bench_leaves(model, net, trees: int = 8, simulations: int = 64, repeats: int = 3) -> dict:
    out = {}
    for simulator in (BackboneSimulator(model, net), LatentSimulator(net)):
        rates = {"batched": [], "one_at_a_time": []}
        for _ in range(repeats):
            for mode, config in (("batched", SearchConfig(simulations=simulations, leaves_per_tree=8, max_batch=1024,
                                                          time_budget_s=60)),
                                 ("one_at_a_time", SearchConfig(simulations=simulations, leaves_per_tree=1,
                                                                max_batch=1, time_budget_s=60))):
                batch = _trees(model, simulator, trees, config.top_k)
                start = time.perf_counter()
                if mode == "batched":
                    stats = search(batch, simulator, config)
                else:  # one tree, one leaf, one call at a time
                    stats = [s for tree in batch for s in search([tree], simulator, config)]
                seconds = time.perf_counter() - start
                rates[mode].append(sum(s.simulations for s in stats) / seconds)
        b, o = statistics.median(rates["batched"]), statistics.median(rates["one_at_a_time"])
        out[simulator.name] = {"batched_leaves_per_s": b, "one_at_a_time_leaves_per_s": o, "ratio": b / o,
                               "target_ratio": 20.0}
    return out


# 3. Step costs ----------------------------------------------------------------------------
def _time(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench_step_cost(models: dict[str, MambaLMHeadModel], batches=(1, 64, 256)) -> dict:
    out = {}
    for name, model in models.items():
        net = PlannerNet.for_backbone(model)
        for b in batches:
            state = model.allocate_state(b)
            state.ssm.normal_()
            tokens = torch.zeros(b, dtype=torch.long)
            backbone = _time(lambda: model.step(tokens, state))
            dynamics = _time(lambda: net.dynamics(state.ssm, tokens))
            leaf = _time(lambda: net(state.ssm, tokens))
            out[f"{name}_b{b}"] = {"backbone_ms": 1e3 * backbone, "dynamics_ms": 1e3 * dynamics,
                                   "dynamics_and_heads_ms": 1e3 * leaf, "ratio": backbone / dynamics}
    return out


# 4. Fidelity --------------------------------------------------------------------------------
def bench_fidelity(model, net, text: bytes, steps: int = 512) -> dict:
    tok = ByteTokenizer()
    ids = tok.encode(text.decode("utf-8", "replace"))[: steps + 1]
    state = model.allocate_state(1)
    before, after = [], []
    for t in ids:
        before.append(state.ssm.clone())
        model.step(torch.tensor([t]), state)
        after.append(state.ssm.clone())
    h = torch.cat(before, dim=1)
    true_next = torch.cat(after, dim=1)
    pred = net.dynamics(h, torch.tensor(ids))

    def cosine(a, b):
        return torch.nn.functional.cosine_similarity(a.transpose(0, 1).flatten(1), b.transpose(0, 1).flatten(1)).mean()

    def rel_err(a, b):
        return ((a - b).transpose(0, 1).flatten(1).norm(dim=1) / b.transpose(0, 1).flatten(1).norm(dim=1)).mean()

    return {"steps": len(ids), "cosine_dynamics": float(cosine(pred, true_next)),
            "cosine_identity_baseline": float(cosine(h, true_next)),
            "relative_error_dynamics": float(rel_err(pred, true_next)),
            "relative_error_identity_baseline": float(rel_err(h, true_next))}


def run(args) -> dict:
    torch.manual_seed(0)
    loaded = load_model(args.checkpoint)
    model = loaded.model
    planner = load_planner(args.checkpoint, model)
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
              "checkpoint": str(args.checkpoint), "planner_trained": planner.trained}
    if args.itl_only:
        set_threads(engine_threads(planner_threads=1))
        report["itl"] = bench_itl(args.checkpoint, args.rounds, args.tokens, args.streams)
        return report
    set_threads(1)
    with torch.inference_mode():
        big = MambaLMHeadModel(MambaConfig(d_model=768, n_layer=24, vocab_size=50280)).eval()
        report["step_cost"] = bench_step_cost({"checkpoint": model, "mamba130m_shape": big})
        del big
        report["leaf_evaluations"] = bench_leaves(model, planner.net)
        report["fidelity"] = bench_fidelity(model, planner.net, (ROOT / "README.md").read_bytes()[-4096:])
    set_threads(engine_threads(planner_threads=1))
    report["itl"] = bench_itl(args.checkpoint, args.rounds, args.tokens, args.streams)
    return report


def format_table(report: dict) -> str:
    rows = ["| measure | off | on (default: bounded lag) | ratio | on, never waiting | ratio | target |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for key, r in report["itl"].items():
        if isinstance(r, dict) and "off_p50_ms" in r:
            for q, target in (("p50", "<= 1.15"), ("p99", "")):
                rows.append(f"| ITL {q}, {key.replace('_', ' ')} | {r[f'off_{q}_ms']:.2f} ms | {r[f'on_{q}_ms']:.2f} ms "
                            f"| {r[f'on_{q}_ratio']:.2f} | {r[f'on_no_wait_{q}_ms']:.2f} ms | "
                            f"{r[f'on_no_wait_{q}_ratio']:.2f} | {target} |")
    arms = ("off", "on", "on_no_wait", "on_every_8", "off_last")
    rows += ["", "| measure | off | on (defaults) | on, lag 1, never waiting | on, plan_every 8 | off, last in round |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, r in report["itl"].items():
        if isinstance(r, dict) and "off_ttft_ms" in r:
            rows.append(f"| ITL p50 per round, {key.replace('_', ' ')} | "
                        + " | ".join(str(r.get(f"{a}_p50_ms_per_round", "")) for a in arms) + " |")
            rows.append(f"| ITL p50, {key.replace('_', ' ')} | "
                        + " | ".join(f"{r[f'{a}_p50_ms']:.1f} ms" if f"{a}_p50_ms" in r else "" for a in arms) + " |")
            for m in ("ttft", "request"):
                rows.append(f"| {m} mean, {key.replace('_', ' ')} | "
                            + " | ".join(f"{r[f'{a}_{m}_ms']:.1f} ms" if f"{a}_{m}_ms" in r else "" for a in arms)
                            + " |")
    if "leaf_evaluations" not in report:
        return "\n".join(rows)
    rows += ["", "| simulator | batched leaves/s | one-at-a-time leaves/s | ratio | target |", "|---|---:|---:|---:|---:|"]
    for name, r in report["leaf_evaluations"].items():
        rows.append(f"| {name} | {r['batched_leaves_per_s']:.0f} | {r['one_at_a_time_leaves_per_s']:.0f} | "
                    f"{r['ratio']:.1f}x | >= 20x |")
    rows += ["", "| model, batch | backbone step | dynamics step | backbone / dynamics |", "|---|---:|---:|---:|"]
    for key, r in report["step_cost"].items():
        rows.append(f"| {key} | {r['backbone_ms']:.3f} ms | {r['dynamics_ms']:.3f} ms | {r['ratio']:.1f}x |")
    f = report["fidelity"]
    rows += ["", f"Dynamics fidelity over {f['steps']} bytes (planner weights trained: {report['planner_trained']}): "
                 f"cosine {f['cosine_dynamics']:.3f} vs {f['cosine_identity_baseline']:.3f} for next = current; "
                 f"relative error {f['relative_error_dynamics']:.3f} vs {f['relative_error_identity_baseline']:.3f}."]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/bench_planner.json"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--streams", type=lambda v: tuple(int(x) for x in v.split(",")), default=(1, 8),
                        help="concurrent streams of the ITL arms, comma-separated")
    parser.add_argument("--itl-only", action="store_true", help="only the inter-token latency arms")
    args = parser.parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))


if __name__ == "__main__":
    main()
