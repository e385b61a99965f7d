"""The planner-in-the-loop evaluation: held-out bits per byte and task accuracy, planner off and on.

``python -m planner.offline.evaluate --config configs/default.json`` (``make eval``)
reads the ``eval`` section of the training config, evaluates
``<out_dir>/checkpoint`` and writes ``<out_dir>/eval.json``. Same prompts and
seeds in every arm. It runs the engine with a planner, so it lives here, not
in :mod:`engine.train` (which imports engine only).

- **Bits per byte** on fixed held-out text windows, read token by token with
  the engine's decode step and its step contract (:mod:`engine.thinking`: the
  prefix's last byte is held back, step ``i`` feeds decision token ``i``).
  With the planner on, every ``plan_every`` steps a search runs from each
  window's state (all windows' trees in one batched
  :meth:`planner.planner.Planner.run`), and its delta lands ``deliberation_lag``
  steps later through :func:`engine.loop.injection.land`, the engine's own rule.
  Both arms read the same bytes through the same loop, so the only difference
  is what the injections did. Per-window differences give a bootstrap
  confidence interval. Only the arms in ``text_arms`` read text (a verifier
  has no answer to check there).
- **Task accuracy** on held-out generated problems, greedy, through the real
  :class:`engine.loop.scheduler.Engine` (continuous batching, bounded lag). The
  planner runs in the engine thread (:class:`InlinePlanner`), so a delta
  always lands at exactly its lag and a run is reproducible; the server runs
  the same search in worker processes. Each think setting of ``arms`` is
  compared with planner off on the same problems: Wilson intervals per arm,
  a paired bootstrap interval on the difference, and per kind the answers
  it fixed (wrong off, right on) and broke (right off, wrong on). An arm's
  ``verifier`` may be ``"{kind}"``: each problem gets its own task's
  verifier (:mod:`planner.verifiers`) as the search's reward.

Deliberation settings are :class:`engine.thinking.ThinkParams`; the search's
wall-time budget is raised so that a run is bounded by simulations only
(a loaded machine does not change the result).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine import tasks
from engine.checkpoint import load_model
from engine.loop.injection import land
from engine.loop.scheduler import Engine
from engine.models import MambaLMHeadModel
from engine.models.planner_net import load_planner
from engine.requests import FinishEvent, GenerationRequest, TokenEvent
from engine.sampling import SamplingParams
from engine.text.tokenizer import ByteTokenizer
from engine.thinking import PlanDropped, PlanJob, StateDelta, ThinkParams
from engine.train.common import StageConfig
from engine.train.data import load_split, sample_windows
from planner.calibration import load_calibration
from planner.planner import Planner
from planner.simulators import Simulator, choose_simulator, make_simulator
from planner.tree import Calibration
from planner.verifiers import judge

DEFAULT_ARMS = {
    "server_defaults": {},  # what a request with "think": {} gets: the learned value only
    "defaults_with_verifier": {"verifier": "{kind}"},  # the same, with each problem's task verifier as the reward
}
TASK_VERIFIER = "{kind}"  # an arm's verifier placeholder: the problem's own task kind


@dataclass
class EvalConfig(StageConfig):
    section = "eval"

    out_dir: str = "runs/default"  # evaluates <out_dir>/checkpoint, writes <out_dir>/eval.json
    data_dir: str = "data/pydoc"
    checkpoint: str = ""
    problems: int = 500
    max_answer_tokens: int = 16
    text_windows: int = 32
    text_prefix: int = 64
    text_bytes: int = 256
    simulator: str = "auto"  # as the server's --planner-simulator
    arms: dict = field(default_factory=lambda: dict(DEFAULT_ARMS))
    text_arms: list = field(default_factory=lambda: ["server_defaults"])  # arms that also read held-out text
    sections: list = field(default_factory=lambda: ["text", "tasks"])  # a part alone (runs can be split by arm)
    problem_range: list = field(default_factory=list)  # [start, stop): a slice of the problems (a split run)
    bootstrap: int = 2000
    seed: int = 0
    threads: int = 0

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else Path(self.out_dir) / "checkpoint"


def think_params(overrides: dict[str, Any]) -> ThinkParams:
    """The arm's settings; the search is bounded by simulations, not by this machine's speed."""
    return ThinkParams(**{"time_budget_ms": 60_000.0, **overrides})


class InlinePlanner:
    """A :class:`engine.thinking.PlannerLink` that searches at once, in the engine thread."""

    def __init__(self, planner: Planner):
        self.planner = planner
        self.deliver: Callable[[StateDelta | PlanDropped], None] | None = None

    def connect(self, deliver: Callable[[StateDelta | PlanDropped], None]) -> None:
        self.deliver = deliver

    def submit(self, job: PlanJob) -> None:
        assert self.deliver is not None, "connected by Engine.attach_planner before any job"
        self.deliver(self.planner.run([job])[0])

    def discard(self, request_id: Hashable) -> None:
        self.planner.forget(request_id)

    judge = staticmethod(judge)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def paired_bootstrap(diffs: np.ndarray, samples: int, seed: int) -> tuple[float, float]:
    """95% interval of the mean of paired differences."""
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(samples, len(diffs)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


# Held-out text -------------------------------------------------------------------
@torch.inference_mode()
def text_bits(model: MambaLMHeadModel, ids: torch.Tensor, prefix: int, planner: Planner | None,
              params: ThinkParams) -> tuple[np.ndarray, dict[str, int]]:
    """Bits per byte of each window's bytes after ``prefix``, and the injections' outcomes.

    As the engine does for a thinking sequence, the prefix's last byte is held back: step ``i`` feeds
    decision token ``i`` (that byte, then the text), a plan made at step ``i`` reads the state before it,
    and a delta lands just before the step it is due at. The planner-off arm reads through the same loop.
    """
    vocab = model.config.vocab_size
    logits, state = model.prefill(ids[:, : prefix - 1])
    tokens = ids[:, prefix - 1 :]  # decision tokens: the held byte, then the scored text
    rows, steps = tokens.shape
    nll = torch.zeros(rows, dtype=torch.float64)
    pending: list[StateDelta] = []
    outcomes: dict[str, int] = {}
    for i in range(steps):
        if planner is not None:
            if i % params.plan_every == 0:
                jobs = [PlanJob(r, i, state.select([r]), logits[r, :vocab].float().clone(), tokens[r, : i + 1].tolist(),
                                params, ids[r, :prefix].tolist(), 1) for r in range(rows)]
                pending += [d for d in planner.run(jobs) if isinstance(d, StateDelta)]
            for delta in sorted((d for d in pending if d.apply_at <= i), key=lambda d: d.planned_at):
                r = delta.request_id
                assert isinstance(r, int)  # the jobs above are keyed by their row
                landing = land(state.ssm[:, r], delta, tokens[r, delta.planned_at : i + 1].tolist(),
                               i - delta.planned_at, params)
                outcomes[landing.result] = outcomes.get(landing.result, 0) + 1
            pending = [d for d in pending if d.apply_at > i]
        logits = model.step(tokens[:, i], state)
        if i + 1 < steps:
            nll += F.cross_entropy(logits[:, :vocab].float(), tokens[:, i + 1], reduction="none").double()
    return (nll / (steps - 1) / math.log(2)).numpy(), outcomes


# Tasks ------------------------------------------------------------------------------
def problem_params(arm: ThinkParams | None, problem: tasks.Problem) -> ThinkParams | None:
    """The arm's settings for one problem: a ``"{kind}"`` verifier becomes the problem's own task verifier."""
    if arm is None or arm.verifier != TASK_VERIFIER:
        return arm
    return replace(arm, verifier=problem.kind)


def answer(engine: Engine, problems: list[tasks.Problem], think: ThinkParams | None, max_tokens: int,
           seed: int) -> tuple[list[str], dict[str, int]]:
    """Greedy answers of every problem through the engine, all submitted at once; and think outcomes."""
    tok = ByteTokenizer()

    async def run() -> tuple[list[str], dict[str, int]]:
        handles = [engine.submit(GenerationRequest(tok.encode(p.prompt), SamplingParams(temperature=0.0, seed=seed),
                                                   max_tokens=max_tokens, stop=["\n"],
                                                   think=problem_params(think, p)))
                   for p in problems]
        texts: list[str] = []
        outcomes: dict[str, int] = {}
        for handle in handles:
            parts = []
            async for event in handle.events():
                if isinstance(event, TokenEvent):
                    parts.append(event.text)
                elif isinstance(event, FinishEvent):
                    parts.append(event.text)
                    if event.error:
                        raise RuntimeError(f"generation failed: {event.error}")
                    if event.usage.think is not None:
                        for k, v in event.usage.think.as_dict().items():
                            if isinstance(v, (int, float)) and not isinstance(v, bool):
                                outcomes[k] = outcomes.get(k, 0) + int(v)
            texts.append("".join(parts))
        return texts, outcomes

    return asyncio.run(run())


def compare(problems: list[tasks.Problem], off: list[bool], on: list[bool], samples: int,
            seed: int) -> dict[str, Any]:
    """Accuracy on, the paired bootstrap interval of on - off, and per kind the answers fixed and broken."""
    a, b = np.array(off, dtype=float), np.array(on, dtype=float)
    n = len(a)
    lo, hi = paired_bootstrap(b - a, samples, seed)
    kinds = np.array([p.kind for p in problems])
    per_kind = {kind: {"fixed": int(((b == 1) & (a == 0) & (kinds == kind)).sum()),
                       "broken": int(((a == 1) & (b == 0) & (kinds == kind)).sum())}
                for kind in tasks.KINDS if (kinds == kind).any()}
    return {"accuracy_on": float(b.mean()), "accuracy_on_ci95": wilson(int(b.sum()), n),
            "difference_points": 100 * float((b - a).mean()), "difference_points_ci95": (100 * lo, 100 * hi),
            "fixed": int(((b == 1) & (a == 0)).sum()), "broken": int(((a == 1) & (b == 0)).sum()),
            "fixed_broken_by_kind": per_kind}


@dataclass
class Setup:
    model: MambaLMHeadModel
    simulator: Simulator
    kind: str  # the simulator's
    timing: dict[str, float]  # the "auto" choice's
    calibration: Calibration | None  # the checkpoint's, as the server's workers load it

    def planner(self) -> Planner:
        """A fresh planner, built as the server's workers build theirs."""
        return Planner(self.simulator, model=self.model, calibration=self.calibration, tokenizer=ByteTokenizer())


def load_setup(cfg: EvalConfig) -> Setup:
    """The checkpoint's model (float32), the simulator the search expands with, and the stored calibration."""
    loaded = load_model(cfg.checkpoint_dir)
    model = loaded.model.float().eval()
    planner_net = load_planner(cfg.checkpoint_dir, model)
    with torch.inference_mode():
        kind, timing = choose_simulator(cfg.simulator, model, planner_net.net, planner_net.trained)
    return Setup(model, make_simulator(kind, model, planner_net.net), kind, timing,
                 load_calibration(cfg.checkpoint_dir))


def heldout_text(cfg: EvalConfig, setup: Setup, arms: dict[str, ThinkParams]) -> dict[str, Any]:
    """Bits per byte on the held-out windows, planner off, then each of ``text_arms`` against off."""
    val = load_split(Path(cfg.data_dir), "val")
    ids = torch.from_numpy(sample_windows(val, None, cfg.text_windows, cfg.text_prefix + cfg.text_bytes, 0.0,
                                          np.random.default_rng(cfg.seed + 2024)))
    bits_off, _ = text_bits(setup.model, ids, cfg.text_prefix, None, ThinkParams())
    text: dict[str, Any] = {"windows": cfg.text_windows, "bytes_per_window": cfg.text_bytes,
                            "bits_per_byte_off": float(bits_off.mean())}
    for name in cfg.text_arms:
        bits_on, outcomes = text_bits(setup.model, ids, cfg.text_prefix, setup.planner(), arms[name])
        rel = bits_on / bits_off - 1
        lo, hi = paired_bootstrap(rel, cfg.bootstrap, cfg.seed)
        text[name] = {"bits_per_byte_on": float(bits_on.mean()),
                      "relative_change_percent": 100 * float(bits_on.mean() / bits_off.mean() - 1),
                      "relative_change_percent_ci95": (100 * lo, 100 * hi), "injections": outcomes}
    return text


def heldout_tasks(cfg: EvalConfig, setup: Setup,
                  arms: dict[str, ThinkParams]) -> tuple[dict[str, Any], list[tasks.Problem], list[str]]:
    """Accuracy on held-out problems through the engine, planner off, then each arm against off.

    Also the problems and the planner-off answers (the report shows a few).
    """
    problems = tasks.problems(cfg.problems, "heldout", seed=cfg.seed + 11)
    if cfg.problem_range:
        problems = problems[cfg.problem_range[0] : cfg.problem_range[1]]
    link = InlinePlanner(setup.planner())
    engine = Engine(setup.model, ByteTokenizer(), max_running=32, max_waiting=len(problems) + 1)
    engine.attach_planner(link)
    engine.start()
    try:
        answers_off, _ = answer(engine, problems, None, cfg.max_answer_tokens, cfg.seed)
        right_off = [tasks.verify(p.question, a) for p, a in zip(problems, answers_off)]
        task: dict[str, Any] = {"problems": len(problems), "accuracy_off": float(np.mean(right_off)),
                                "accuracy_off_ci95": wilson(sum(right_off), len(problems)),
                                "by_kind_off": by_kind(problems, right_off), "right_off": right_off}
        for name, params in arms.items():
            t0 = time.time()
            link.planner = setup.planner()
            answers_on, outcomes = answer(engine, problems, params, cfg.max_answer_tokens, cfg.seed)
            right_on = [tasks.verify(p.question, a) for p, a in zip(problems, answers_on)]
            task[name] = {**compare(problems, right_off, right_on, cfg.bootstrap, cfg.seed),
                          "by_kind_on": by_kind(problems, right_on), "think": outcomes,
                          "answers_changed": sum(x != y for x, y in zip(answers_off, answers_on)), "right_on": right_on,
                          "wall_seconds": time.time() - t0}
    finally:
        engine.shutdown()
    return task, problems, answers_off


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """The whole report: held-out text, then held-out problems, every arm against planner off."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    setup = load_setup(cfg)
    arms = {name: think_params(over) for name, over in cfg.arms.items()}
    report: dict[str, Any] = {"checkpoint": str(cfg.checkpoint_dir), "simulator": setup.kind, **setup.timing,
                              "calibrated": setup.calibration is not None,
                              "arms": {name: asdict(p) for name, p in arms.items()}}
    if "text" in cfg.sections:
        report["heldout_text"] = heldout_text(cfg, setup, arms)
    if "tasks" in cfg.sections:
        task, problems, answers_off = heldout_tasks(cfg, setup, arms)
        report["heldout_tasks"] = task
        report["samples"] = [{"question": p.question, "answer_off": a} for p, a in zip(problems[:8], answers_off)]
    return {**report, "wall_seconds": time.time() - t0}


def by_kind(problems: list[tasks.Problem], right: list[bool]) -> dict[str, float]:
    out = {}
    for kind in tasks.KINDS:
        marks = [r for p, r in zip(problems, right) if p.kind == kind]
        if marks:
            out[kind] = float(np.mean(marks))
    return out


def run(cfg: EvalConfig) -> Path:
    report = evaluate(cfg)
    path = Path(cfg.out_dir) / "eval.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m planner.offline.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True,
                        help="pipeline JSON (reads its eval section) or a flat file of EvalConfig's fields")
    args = parser.parse_args(argv)
    print(f"wrote {run(EvalConfig.from_file(args.config))}")


if __name__ == "__main__":
    main()
