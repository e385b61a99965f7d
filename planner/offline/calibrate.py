"""Calibrating the planner's confidence: a logistic of the search's own evidence, fitted on held-out problems.

A decision delta lands at full strength when the gate passes, so the gate
must mean something: a stated confidence of p should be right about p of the
time. For each plan made while answering held-out problems, every searched
node's best child gives one example with two features (the best child's
visit share, its value advantage over the node) and a label: "right" when
the chosen token continues the node's text on a path to the verified answer
(the answer's next byte at that node, or the end of the answer once it is
complete). The fit is plain logistic regression (Newton's method, a small L2
penalty), stored as ``calibration`` in the checkpoint's ``planner.json``
(and the manifest updated), which the planner workers read at start.

    python -m planner.offline.calibrate --checkpoint checkpoints/default --problems 200

Reported: the held-out problems' count, the examples, the log loss before
(the uncalibrated formula) and after, and the reliability table (stated vs
observed per confidence bin) on a second half of the examples.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import torch

from engine.thinking import PlanDropped, StateDelta
from planner.calibration import KEY, PLANNER_JSON
from planner.tree import Calibration
from planner.verifiers import judge

SEED = 2027  # problems drawn apart from make eval's (seed + 11)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 50) -> np.ndarray:
    """Weights ``[bias, w_1, ...]`` of ``P(y=1) = sigmoid(w . [1, x])`` by Newton's method with an L2 penalty."""
    a = np.hstack([np.ones((len(x), 1)), x])
    w = np.zeros(a.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ w, -50, 50)))
        grad = a.T @ (p - y) + l2 * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + l2 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return w


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 5) -> list[dict]:
    """Stated against observed, per confidence bin."""
    out = []
    for lo in np.linspace(0, 1, bins, endpoint=False):
        sel = (p >= lo) & (p < lo + 1.0 / bins)
        if sel.any():
            out.append({"stated": [round(float(lo), 2), round(float(lo + 1.0 / bins), 2)], "n": int(sel.sum()),
                        "mean_stated": round(float(p[sel].mean()), 3), "observed": round(float(y[sel].mean()), 3)})
    return out


class RecordingLink:
    """An inline planner link (the search runs at once, in the engine thread) that keeps every delta."""

    def __init__(self, planner):
        self.planner = planner
        self.deliver = None
        self.deltas: dict[tuple[Hashable, int], StateDelta | PlanDropped] = {}

    def connect(self, deliver) -> None:
        self.deliver = deliver

    def submit(self, job) -> None:
        delta = self.planner.run([job])[0]
        self.deltas[(job.request_id, job.planned_at)] = delta
        self.deliver(delta)

    def discard(self, request_id) -> None:
        self.planner.forget(request_id)

    judge = staticmethod(judge)


def examples(checkpoint: str, count: int, verifier: str | None, seed: int = SEED,
             simulations: int = 48) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(features, labels, uncalibrated confidences) of every delta landed while answering ``count`` problems.

    The gate is open (``min_confidence=0``) so every node the sessions reach
    lands; label 1 when the search's choice there is the next byte of the
    verified answer (or its ending newline) and the answer so far is right.
    """
    from engine import tasks
    from engine.checkpoint import load_model
    from engine.loop.scheduler import Engine
    from engine.models.planner_net import load_planner
    from engine.requests import GenerationRequest, TokenEvent
    from engine.sampling import SamplingParams
    from engine.text.tokenizer import ByteTokenizer
    from engine.thinking import ThinkParams, ThoughtEvent
    from planner.planner import Planner
    from planner.simulators import BackboneSimulator

    model = load_model(checkpoint).model.float().eval()
    net = load_planner(checkpoint, model).net
    link = RecordingLink(Planner(BackboneSimulator(model, net), model=model))
    tok = ByteTokenizer()
    params = ThinkParams(min_confidence=0.0, time_budget_ms=60_000.0, simulations=simulations, verifier=verifier)
    problems = tasks.problems(count, "heldout", seed=seed)
    engine = Engine(model, tok, max_running=16, max_waiting=count + 1)
    engine.attach_planner(link)
    engine.start()

    async def run():
        handles = [engine.submit(GenerationRequest(tok.encode(p.prompt), SamplingParams(temperature=0.0),
                                                   max_tokens=16, stop=["\n"], think=params)) for p in problems]
        runs = []
        for handle in handles:
            runs.append([e async for e in handle.events()])
        return runs, handles

    try:
        runs, handles = asyncio.run(run())
    finally:
        engine.shutdown()
    feats, labels, raw = [], [], []
    for problem, handle, events in zip(problems, handles, runs):
        target = list((problem.answer + "\n").encode())
        generated = [e.token_id for e in events if isinstance(e, TokenEvent)]
        tokens = tok.encode(problem.prompt)[-1:] + generated  # the decision tokens (engine.thinking)
        for ev in (e for e in events if isinstance(e, ThoughtEvent) and e.outcome == "applied"):
            delta = link.deltas[(handle.id, ev.planned_at)]
            assert isinstance(delta, StateDelta) and ev.applied_at is not None  # an applied thought landed a delta
            row = delta.branches[tuple(tokens[ev.planned_at : ev.applied_at + 1])]
            s = ev.applied_at
            right = generated[:s] == target[:s] and s < len(target) and delta.choices[row] == target[s]
            feats.append(delta.evidence[row])
            labels.append(float(right))
            raw.append(ev.confidence)
    return np.array(feats, dtype=float).reshape(-1, 2), np.array(labels), raw


def calibrate(checkpoint: str, count: int, verifiers: list[str | None], seed: int = SEED) -> dict:
    """Fit on half the problems' examples, report on the other half, then refit on all (what is stored)."""
    parts = [examples(checkpoint, count, v, seed) for v in verifiers]
    x = np.vstack([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    raw = np.array([c for p in parts for c in p[2]])
    if len(y) < 20 or y.min() == y.max():
        raise SystemExit(f"too few or one-sided examples to calibrate ({len(y)}, {int(y.sum())} right)")
    rng = np.random.default_rng(seed)
    fit_rows = rng.random(len(y)) < 0.5
    w = fit_logistic(x[fit_rows], y[fit_rows])
    test = ~fit_rows
    p_test = 1.0 / (1.0 + np.exp(-(w[0] + x[test] @ w[1:])))
    w_all = fit_logistic(x, y)
    record = {"problems": count, "seed": seed, "verifiers": [v or "none" for v in verifiers], "examples": len(y),
              "right": int(y.sum()), "test_examples": int(test.sum()),
              "test_log_loss_uncalibrated": round(log_loss(raw[test], y[test]), 4),
              "test_log_loss_calibrated": round(log_loss(p_test, y[test]), 4),
              "test_reliability": reliability(p_test, y[test])}
    return Calibration(float(w_all[0]), float(w_all[1]), float(w_all[2]), record).as_dict()


def store(checkpoint: str | Path, calibration: dict) -> None:
    """Write ``calibration`` into the checkpoint's ``planner.json`` and its size and hash into the manifest."""
    from engine.checkpoint import MANIFEST, sha256_file

    folder = Path(checkpoint)
    path = folder / PLANNER_JSON
    body = json.loads(path.read_text(encoding="utf-8"))
    body[KEY] = calibration
    path.write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["files"][PLANNER_JSON] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m planner.offline.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/default")
    parser.add_argument("--problems", type=int, default=200, help="held-out problems per arm")
    parser.add_argument("--verifiers", default="none,task", help="arms: comma-separated verifier names, none = off")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dry-run", action="store_true", help="print the fit, leave the checkpoint as it is")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    arms = [None if v == "none" else v for v in args.verifiers.split(",")]
    calibration = calibrate(args.checkpoint, args.problems, arms, args.seed)
    print(json.dumps(calibration, indent=2))
    if not args.dry_run:
        store(args.checkpoint, calibration)
        print(f"stored in {Path(args.checkpoint) / PLANNER_JSON}")


if __name__ == "__main__":
    main()
