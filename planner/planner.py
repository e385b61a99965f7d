"""From plan jobs to state deltas: a search tree kept per request, searched in batches.

:class:`Planner` is what a worker runs (in its own process, see
:mod:`planner.pool`), and what tests and offline evaluation call directly.
For a batch of :class:`~engine.thinking.PlanJob` it

1. re-roots each request's tree on the tokens generated since its last plan
   (tree reuse), or starts a fresh tree from the job's state and root logits;
2. forces the pending token (already sampled by the engine) as the first
   move, and searches below it, all trees' leaves batched together;
3. returns the tree below that token as branches: for each searched node,
   the search's choice there (its most visited child), the change of the
   state the node's token is fed into that makes that choice win the step
   (:mod:`planner.decision`, all branches of all jobs in one batched call;
   or the old best-child state difference with ``delta="child"``), and the
   search's confidence there (calibrated, :mod:`planner.offline.calibrate`), plus the
   main line for display (see :mod:`engine.thinking`).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from engine.models import MambaLMHeadModel
from engine.state import MambaState
from engine.text.tokenizer import ByteTokenizer, Tokenizer
from engine.thinking import PlanJob, StateDelta
from planner.decision import decision_deltas
from planner.search import SearchConfig, best_path, search
from planner.simulators import BackboneSimulator, Simulator, ssm_part
from planner.tree import Calibration, Node, Tree, confidence, decision_features
from planner.verifiers import answer_reward

log = logging.getLogger(__name__)


def _reused_visits(tree: Tree, prefix: list[int]) -> int:
    """Simulations a reused tree already spent below the forced prefix (they count towards this plan's budget).

    ``simulations`` is what a decision rests on, not what each plan adds: when
    the previous plan already searched the path the sequence took, the next
    one only tops it up (with ``plan_every=1`` most plans then cost a
    decision delta, not a search).
    """
    node = tree.follow(prefix)
    return 0 if node is None else node.visits - 1


def _best_child(node: Node) -> Node:
    """A branch node's most visited child (a branch node has visited children: :meth:`Planner._branches`)."""
    best = node.best_child()
    assert best is not None
    return best


@dataclass
class _Branches:
    """One job's searched nodes below its forced prefix, and the branches the engine may land."""

    keys: list[tuple[int, ...]]  # branch keys (tokens from planned_at), most visited first
    nodes: dict[tuple[int, ...], Node]  # every node below the prefix, by key
    inner: list[Node]  # the branch nodes, in the order of keys
    changes: torch.Tensor | None = None  # (M, n_layer, d_inner, d_state)


class Planner:
    def __init__(self, simulator: Simulator, config: SearchConfig = SearchConfig(), max_trees: int = 256,
                 max_branches: int = 16, model: MambaLMHeadModel | None = None,
                 calibration: Calibration | None = None, tokenizer: Tokenizer | None = None):
        self.simulator = simulator
        self.config = config
        self.max_trees = max_trees
        self.max_branches = max_branches
        self.model = model if model is not None else getattr(simulator, "model", None)
        self.calibration = calibration
        self.tokenizer = tokenizer or ByteTokenizer()
        self._trees: collections.OrderedDict[Hashable, tuple[Tree, int]] = collections.OrderedDict()

    def forget(self, request_id: Hashable) -> None:
        self._trees.pop(request_id, None)

    def tree(self, request_id: Hashable) -> Tree | None:
        """The tree kept for ``request_id`` (re-rooted on its next plan), or None."""
        kept = self._trees.get(request_id)
        return None if kept is None else kept[0]

    def __contains__(self, request_id: Hashable) -> bool:
        return request_id in self._trees

    def __len__(self) -> int:
        """Requests whose trees are kept (at most ``max_trees``, least recently planned dropped first)."""
        return len(self._trees)

    @torch.inference_mode()
    def run(self, jobs: list[PlanJob]) -> list[StateDelta]:
        """One batched search for ``jobs`` (one per request); a delta per job, in order."""
        if not jobs:
            return []
        roots = [self.simulator.root_states(job.state) for job in jobs]
        stacked = tuple(torch.cat([r[i] for r in roots], dim=1) for i in range(len(roots[0])))
        root_values = self.simulator.value(stacked).tolist()
        trees = [self._tree_for(job, states, value) for job, states, value in zip(jobs, roots, root_values)]
        time_budget = min(job.params.time_budget_ms for job in jobs) / 1000.0
        config = SearchConfig(**{**self.config.__dict__, "time_budget_s": time_budget})
        prefixes = [job.tokens[job.planned_at : job.planned_at + 1] for job in jobs]
        rewards = [answer_reward(job, self.tokenizer) for job in jobs]
        budgets = [max(job.params.simulations - _reused_visits(tree, prefix), 0)
                   for job, tree, prefix in zip(jobs, trees, prefixes)]
        stats = search(trees, self.simulator, config, prefixes, budgets=budgets, rewards=rewards)
        found = [self._branches(tree, prefix, job.params.deliberation_lag, job.params.synchronous)
                 for job, tree, prefix in zip(jobs, trees, prefixes)]
        modes = self._changes(jobs, trees, found)
        deltas = []
        for job, tree, prefix, st, br, mode in zip(jobs, trees, prefixes, stats, found, modes):
            main_line = best_path(tree, prefix, job.params.deliberation_lag + job.params.max_staleness + 2)
            inner_keys = frozenset(k for k, n in br.nodes.items() if n.visited_children())
            deltas.append(StateDelta(job.request_id, job.planned_at, job.apply_at, [n.token for n in main_line[1:]],
                                     {k: i for i, k in enumerate(br.keys)}, br.changes,
                                     [confidence(n, self.calibration) for n in br.inner], frozenset(br.nodes),
                                     inner_keys, st.simulations, st.seconds, mode,
                                     [n.best_child().token for n in br.inner],
                                     [decision_features(n)[:2] for n in br.inner]))
            self._trees[job.request_id] = (tree, job.planned_at)
            self._trees.move_to_end(job.request_id)
        while len(self._trees) > self.max_trees:
            self._trees.popitem(last=False)
        return deltas

    def _branches(self, tree: Tree, prefix: list[int], lag: int, exact: bool) -> _Branches:
        """The searched nodes below the forced prefix, keyed by their tokens from planned_at.

        Each node with a visited child, ``lag`` moves below the prefix (or
        more, unless the delta lands at exactly its lag: ``exact``, a waiting
        sequence), becomes a branch. The ``max_branches`` most visited are
        kept (each is a full SSM state of change, shipped to the engine, and
        a row of the decision deltas' backward pass).
        """
        start = tree.follow(prefix)
        if start is None:
            return _Branches([], {}, [])
        nodes: dict[tuple[int, ...], Node] = {}
        stack = [(tuple(prefix), start)]
        while stack:
            key, node = stack.pop()
            nodes[key] = node
            stack.extend((key + (child.token,), child) for child in node.visited_children())
        depth = len(prefix) + lag
        inner = sorted(((k, n) for k, n in nodes.items()
                        if n.visited_children() and (len(k) == depth or (len(k) > depth and not exact))),
                       key=lambda kn: -kn[1].visits)[: self.max_branches]
        return _Branches([k for k, _ in inner], nodes, [n for _, n in inner])

    def _changes(self, jobs: list[PlanJob], trees: list[Tree], found: list[_Branches]) -> list[str]:
        """Fill every job's branch changes (decision deltas in one batched call); the mode of each."""
        part = ssm_part(self.simulator)
        shape = trees[0].store[part].shape
        modes: list[str] = []
        for job, tree, br in zip(jobs, trees, found):
            mode = job.params.delta if self.model is not None else "child"
            modes.append(mode)
            if not br.inner:
                br.changes = torch.zeros(0, shape[0], *shape[2:])
            elif mode == "child":
                idx = torch.tensor([n.row for n in br.inner])
                best = torch.tensor([_best_child(n).row for n in br.inner])
                store = tree.store[part]
                br.changes = (store.index_select(1, best) - store.index_select(1, idx)).transpose(0, 1).float()
        wanted = [(job, tree, br) for job, tree, br, mode in zip(jobs, trees, found, modes)
                  if mode == "decision" and br.inner]
        if not wanted:
            return modes
        convs, ssms = zip(*(self._parent_states(job, tree, br) for job, tree, br in wanted))
        tokens = torch.tensor([n.token for _, _, br in wanted for n in br.inner])
        targets = torch.tensor([_best_child(n).token for _, _, br in wanted for n in br.inner])
        regions = torch.tensor([job.params.trust_region for job, _, br in wanted for _ in br.inner])  # per row
        assert self.model is not None  # a "decision" mode needs the model (else every mode is "child")
        decision = decision_deltas(self.model, torch.cat(convs, dim=1), torch.cat(ssms, dim=1), tokens, targets,
                                   regions)
        first = 0
        for _, _, br in wanted:
            br.changes = decision.changes[first : first + len(br.inner)].contiguous()
            first += len(br.inner)
        return modes

    def _parent_states(self, job: PlanJob, tree: Tree, br: _Branches) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv, ssm), each (n_layer, M, ...): the state each branch node's token is fed into."""
        if isinstance(self.simulator, BackboneSimulator):
            rows = []
            for n in br.inner:
                assert n.parent is not None  # below the pending token (the forced first move): never the root
                rows.append(n.parent.row)
            conv, ssm = tree.gather(rows)
            return conv, ssm
        assert self.model is not None  # only "decision" branches get here (see _changes)
        states = []  # the dynamics hold no conv state: replay the backbone from the job's real state
        for key in br.keys:
            state = job.state.clone()
            for tok in key[:-1]:
                self.model.step(torch.tensor([tok]), state)
            states.append(state)
        both = MambaState.gather(states)
        return both.conv, both.ssm

    def _tree_for(self, job: PlanJob, states: tuple[torch.Tensor, ...], root_value: float) -> Tree:
        top_k = job.params.top_k_actions
        kept = self._trees.get(job.request_id)
        if kept is not None:
            tree, planned_at = kept
            if planned_at <= job.planned_at and tree.top_k == top_k:
                if tree.advance(job.tokens[planned_at : job.planned_at], states, root_value):
                    return tree
        return Tree(states, job.root_logits, root_value, top_k)
