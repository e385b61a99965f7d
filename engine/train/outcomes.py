"""Outcome supervision for the value head: several sampled answers per question, and what they say.

The value head is asked, at every state of an answer, for the chance that the
answer ends right (the idea of outcome-supervised verifiers, Yu et al. 2023).
One sampled answer per question labels every state of a question with the same
verdict, so nothing tells a right answer from a wrong one to the *same*
question: the head learns which kinds of question the model gets right, not
which answers. Here each training question gets ``k`` sampled answers, each
checked by the task's verifier, and every prefix state gets the mean verdict
of the samples that went through it (``2 p - 1``): the answers that part ways
after a shared prefix are the contrast the head learns from.

The same samples measure the head on held-out questions: the within-question
AUC (a right answer's value above a wrong answer's to the same question) and
best-of-k by value against majority vote and greedy decoding.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from engine import tasks
from engine.models import MambaLMHeadModel
from engine.models.planner_net import PlannerNet


@dataclass
class Samples:
    """``k`` sampled answers for each of ``problems``; row ``i`` answers ``problems[question[i]]``."""

    problems: list[tasks.Problem]
    question: list[int]
    completions: list[str]
    tokens: list[list[int]]  # the answer bytes of each row (up to the newline or the limit)
    features: list[torch.Tensor]  # per row: (decision points, n_layer, d_inner); point j: after j answer bytes
    verdicts: list[bool]


def sample_answers(model: MambaLMHeadModel, net: PlannerNet, problems: list[tasks.Problem], k: int,
                   temperature: float, max_new: int, seed: int, chunk: int = 256) -> Samples:
    """``k`` answers per problem by sampling (the rows of a question are spread over the batches)."""
    from engine.train.value import rollout  # the one sampling loop

    order = [q for _ in range(k) for q in range(len(problems))]
    out = Samples(problems, [], [], [], [], [])
    for start in range(0, len(order), chunk):
        rows = order[start : start + chunk]
        r = rollout(model, net, [problems[q] for q in rows], temperature, max_new, seed + start)
        out.question += rows
        out.completions += r.completions
        out.tokens += r.answers
        out.features += r.features
        out.verdicts += r.verdicts
    return out


def prefix_targets(s: Samples) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row per distinct (question, answer prefix): its features, ``2 p - 1``, its sample count and question.

    ``p`` is the share of right answers among the samples whose answer starts with
    that prefix (the samples that passed through that state): the Monte Carlo
    estimate of the chance of ending right from there. The count weights the row
    as often as the samples visited it.
    """
    right: dict[tuple[int, bytes], int] = defaultdict(int)
    seen: dict[tuple[int, bytes], int] = defaultdict(int)
    first: dict[tuple[int, bytes], torch.Tensor] = {}
    for q, toks, f, ok in zip(s.question, s.tokens, s.features, s.verdicts):
        for j in range(f.shape[0]):
            key = (q, bytes(toks[:j]))
            seen[key] += 1
            right[key] += int(ok)
            first.setdefault(key, f[j])
    keys = list(first)
    feats = torch.stack([first[key] for key in keys])
    p = torch.tensor([right[key] / seen[key] for key in keys])
    counts = torch.tensor([float(seen[key]) for key in keys])
    questions = torch.tensor([key[0] for key in keys])
    return feats, 2 * p - 1, counts, questions


def final_features(s: Samples) -> torch.Tensor:
    """The state each answer ended in (after its last byte, where the newline was chosen): (rows, L, D)."""
    return torch.stack([f[-1] for f in s.features])


def within_question_auc(values: np.ndarray, verdicts: np.ndarray, question: np.ndarray) -> tuple[float, int]:
    """P(value of a right answer > value of a wrong answer to the same question), ties half; and the pair count."""
    wins, pairs = 0.0, 0
    for q in np.unique(question):
        sel = question == q
        good, bad = values[sel & verdicts], values[sel & ~verdicts]
        if len(good) and len(bad):
            diff = good[:, None] - bad[None, :]
            wins += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
            pairs += diff.size
    return (wins / pairs if pairs else float("nan")), pairs


def pooled_auc(values: np.ndarray, verdicts: np.ndarray) -> float:
    """AUC over all answers, whatever their question (task-kind knowledge counts here)."""
    good, bad = values[verdicts], values[~verdicts]
    if not len(good) or not len(bad):
        return float("nan")
    diff = good[:, None] - bad[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def selection_report(s: Samples, values: np.ndarray, greedy_right: list[bool]) -> dict:
    """Within-question AUC (all and per kind), pooled AUC, and best-of-k by value against vote and greedy."""
    q = np.array(s.question)
    ok = np.array(s.verdicts, dtype=bool)
    n = len(s.problems)
    by_value, by_vote, any_right = [], [], []
    for i in range(n):
        rows = np.nonzero(q == i)[0]
        by_value.append(bool(ok[rows[np.argmax(values[rows])]]))
        top = Counter(s.completions[r] for r in rows).most_common()
        best = top[0][1]
        # Ties between answers are broken by the first sample that gave one of them (not by the value).
        winner = next(s.completions[r] for r in rows if any(c == s.completions[r] and m == best for c, m in top))
        by_vote.append(tasks.verify(s.problems[i].question, winner))
        any_right.append(bool(ok[rows].any()))
    auc, pairs = within_question_auc(values, ok, q)
    kinds = np.array([s.problems[i].kind for i in s.question])
    per_kind = {}
    for kind in tasks.KINDS:
        sel = kinds == kind
        if sel.any():
            k_auc, k_pairs = within_question_auc(values[sel], ok[sel], q[sel])
            per_kind[kind] = {"within_question_auc": k_auc, "pairs": k_pairs}
    k = len(s.question) // max(n, 1)
    return {"questions": n, "samples_per_question": k, "sample_accuracy": float(ok.mean()),
            "within_question_auc": auc, "within_question_pairs": pairs, "by_kind": per_kind,
            "pooled_auc": pooled_auc(values, ok),
            f"best_of_{k}_by_value": int(sum(by_value)), f"majority_vote_of_{k}": int(sum(by_vote)),
            "greedy": int(sum(greedy_right)), f"any_right_of_{k}": int(sum(any_right))}
