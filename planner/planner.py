"""From plan jobs to state deltas: a search tree kept per request, searched in batches.

:class:`Planner` is what a worker runs (in its own process, see
:mod:`planner.pool`), and what tests and offline evaluation call directly.
For a batch of :class:`~engine.thinking.PlanJob` it

1. re-roots each request's tree on the tokens generated since its last plan
   (tree reuse), or starts a fresh tree from the job's state and root logits;
2. forces the pending token (already sampled by the engine) as the first
   move, and searches below it, all trees' leaves batched together;
3. returns the tree below that token as branches: for each searched node,
   the state change of its best move (a difference of node states, which the
   engine re-roots on the real state) and the search's confidence there, plus
   the main line for display (see :mod:`engine.thinking`).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Hashable

import torch

from engine.thinking import PlanJob, StateDelta
from planner.search import SearchConfig, best_path, search
from planner.simulators import Simulator, ssm_part
from planner.tree import Tree, confidence

log = logging.getLogger(__name__)


class Planner:
    def __init__(self, simulator: Simulator, config: SearchConfig = SearchConfig(), max_trees: int = 256,
                 max_branches: int = 16):
        self.simulator = simulator
        self.config = config
        self.max_trees = max_trees
        self.max_branches = max_branches
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
        trees = []
        for job, states, value in zip(jobs, roots, root_values):
            trees.append(self._tree_for(job, states, value))
        config = self.config
        time_budget = min(job.params.time_budget_ms for job in jobs) / 1000.0
        config = SearchConfig(**{**config.__dict__, "time_budget_s": time_budget})
        prefixes = [job.tokens[job.planned_at : job.planned_at + 1] for job in jobs]
        stats = search(trees, self.simulator, config, prefixes, budgets=[job.params.simulations for job in jobs])
        deltas = []
        part = ssm_part(self.simulator)
        for job, tree, prefix, st in zip(jobs, trees, prefixes, stats):
            main_line = best_path(tree, prefix, job.params.deliberation_lag + job.params.max_staleness + 2)
            branches, nodes, changes, confidences = self._branches(tree, prefix, part, job.params.deliberation_lag)
            inner = frozenset(k for k, n in nodes.items() if n.visited_children())
            deltas.append(StateDelta(job.request_id, job.planned_at, job.apply_at, [n.token for n in main_line[1:]],
                                     branches, changes, confidences, frozenset(nodes), inner, st.simulations,
                                     st.seconds))
            self._trees[job.request_id] = (tree, job.planned_at)
            self._trees.move_to_end(job.request_id)
        while len(self._trees) > self.max_trees:
            self._trees.popitem(last=False)
        return deltas

    def _branches(self, tree: Tree, prefix: list[int], part: int, lag: int):
        """The searched nodes below the forced prefix, keyed by their tokens from planned_at.

        Each node with a visited child, at least ``lag`` moves below the
        prefix (a delta never lands earlier), becomes a branch: the change of
        its best move and its confidence. The ``max_branches`` most visited
        are kept (each is a full SSM state of change, shipped to the engine).
        """
        start = tree.follow(prefix)
        if start is None:
            return {}, {}, torch.zeros(0, *tree.store[part].shape[:1], *tree.store[part].shape[2:]), []
        nodes: dict[tuple[int, ...], object] = {}
        stack = [(tuple(prefix), start)]
        while stack:
            key, node = stack.pop()
            nodes[key] = node
            stack.extend((key + (child.token,), child) for child in node.visited_children())
        inner = sorted(((k, n) for k, n in nodes.items() if n.visited_children() and len(k) >= len(prefix) + lag),
                       key=lambda kn: -kn[1].visits)
        inner = inner[: self.max_branches]
        if not inner:
            return {}, nodes, torch.zeros(0, *tree.store[part].shape[:1], *tree.store[part].shape[2:]), []
        rows = [n.row for _, n in inner]
        best_rows = [n.best_child().row for _, n in inner]
        idx, best_idx = torch.tensor(rows), torch.tensor(best_rows)
        store = tree.store[part]
        changes = (store.index_select(1, best_idx) - store.index_select(1, idx)).transpose(0, 1).float().contiguous()
        return ({k: i for i, (k, _) in enumerate(inner)}, nodes, changes,
                [confidence(n) for _, n in inner])

    def _tree_for(self, job: PlanJob, states: tuple[torch.Tensor, ...], root_value: float) -> Tree:
        top_k = job.params.top_k_actions
        kept = self._trees.get(job.request_id)
        if kept is not None:
            tree, planned_at = kept
            if planned_at <= job.planned_at and tree.top_k == top_k:
                if tree.advance(job.tokens[planned_at : job.planned_at], states, root_value):
                    return tree
        return Tree(states, job.root_logits, root_value, top_k)
