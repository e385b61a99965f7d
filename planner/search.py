"""Batched PUCT search over a simulator, for several requests' trees at once.

As in AlphaZero / MuZero: each simulation selects a leaf in a tree
(:meth:`planner.tree.Tree.select`), expands it with one simulator call and
backs its value up the path. What makes it fast and usable live:

- Leaves are evaluated in batches: each round selects up to
  ``leaves_per_tree`` leaves in every tree (a virtual loss on the path makes
  the next selection look elsewhere), then expands all leaves of all trees in
  one simulator call (the way DeepMind's mctx batches trees). How leaves are
  chunked into calls (``max_batch``) never changes the tree.
- Unvisited children get a finite first-play value (see :mod:`planner.tree`).
  (Gumbel-MuZero root selection was considered; with tree reuse and a forced
  prefix the root is rarely fresh, so plain PUCT is kept.)
- Trees are reused across plans of the same request (:meth:`Tree.advance`);
  a forced prefix (tokens already decided) is walked first
  (:func:`prepare_prefix`) and simulations start below it.
- The budget is simulations and wall time, whichever ends first.
- A tree may have a terminal *reward* (a verifier, :mod:`planner.verifiers`):
  a leaf that ends the answer takes the reward as its value instead of the
  value head's, and becomes terminal (selecting it again backs the same
  value up, nothing is expanded below it).

The search is generic: nothing in it knows about tasks or text.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from planner.simulators import Simulator, as_long
from planner.tree import Node, Tree, mark_pending, path_to, tokens_to


@dataclass(frozen=True)
class SearchConfig:
    simulations: int = 32
    top_k: int = 8
    leaves_per_tree: int = 4
    c_puct: float = 1.25
    fpu_reduction: float = 0.25
    time_budget_s: float = 0.05
    max_batch: int = 1024  # leaves per simulator call
    max_depth: int = 64
    """Most nodes on one selection path (the search root included). A guard, not a target: a search of tens
    of simulations stays far shallower, but it bounds one descent in a degenerate tree (a single long line
    kept by reuse over many plans); past it :meth:`Tree.select` gives up for the round."""


@dataclass
class SearchStats:
    simulations: int
    seconds: float


@dataclass
class Leaf:
    """A pending slot to expand: ``node``'s child ``slot`` in ``trees[tree_index]``, reached along ``path``."""

    tree_index: int
    path: list[Node]
    node: Node
    slot: int

    @property
    def token(self) -> int:
        return self.node.actions[self.slot]


def _renormalised(p: list[float]) -> list[float]:
    total = sum(p)
    return [x / total for x in p] if total > 0 else [1.0 / len(p)] * len(p)


Reward = Callable[[list[int]], "float | None"]  # a node's tokens from the root -> terminal value, or None


def expand_leaves(trees: list[Tree], leaves: list[Leaf], simulator: Simulator, max_batch: int,
                  rewards: Sequence[Reward | None] | None = None) -> None:
    """Expand ``leaves``, ``max_batch`` per simulator call.

    Leaves are grouped by tree, so a call gathers and stores one slice per tree and state part.
    """
    leaves = sorted(leaves, key=lambda leaf: leaf.tree_index)  # stable: a tree's leaves keep their order
    for start in range(0, len(leaves), max_batch):
        chunk = leaves[start : start + max_batch]
        groups: dict[int, list[int]] = {}
        for j, leaf in enumerate(chunk):
            groups.setdefault(leaf.tree_index, []).append(j)
        parts = [trees[ti].gather([chunk[j].node.row for j in js]) for ti, js in groups.items()]
        states = tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(len(parts[0])))
        out = simulator.expand(states, as_long([leaf.token for leaf in chunk]))
        values = out.values.tolist()
        # The children's moves for the whole chunk at once: one top-k and one softmax, not one per leaf.
        k = min(max(trees[ti].top_k for ti in groups), out.logits.shape[-1])
        top = torch.topk(out.logits.float().nan_to_num(nan=0.0, posinf=1e4, neginf=-1e4), k)
        actions, priors = top.indices.tolist(), torch.softmax(top.values, dim=-1).tolist()
        for ti, js in groups.items():
            tree = trees[ti]
            rows = tree.add_rows(tuple(s[:, js[0] : js[-1] + 1] for s in out.states))
            kt = min(tree.top_k, k)
            for j, row in zip(js, rows):
                leaf = chunk[j]
                p = priors[j][:kt] if kt == k else _renormalised(priors[j][:kt])
                reward = rewards[ti] if rewards is not None else None
                ended = reward(tokens_to(leaf.node) + [leaf.token]) if reward is not None else None
                if ended is not None:
                    tree.expand(leaf.path, leaf.node, leaf.slot, row, [], [], ended, terminal=True)
                else:
                    tree.expand(leaf.path, leaf.node, leaf.slot, row, actions[j][:kt], p, values[j])


def prepare_prefix(trees: list[Tree], prefixes: list[list[int]], simulator: Simulator, max_batch: int,
                   rewards: Sequence[Reward | None] | None = None) -> list[int]:
    """Walk each tree's forced prefix (tokens already decided), expanding missing nodes; simulations spent."""
    spent = [0] * len(trees)
    for tree, prefix in zip(trees, prefixes):
        tree.search_root = tree.root
    depth = 0
    while True:
        leaves = []
        for ti, (tree, prefix) in enumerate(zip(trees, prefixes)):
            if depth >= len(prefix):
                continue
            node = tree.search_root
            slot = node.slot_of(prefix[depth])
            if slot is None:  # a decided token outside the node's actions: give it a slot
                slot = node.add_action(prefix[depth])
            if node.children[slot] is None:
                path = path_to(node)
                mark_pending(path, node, slot)
                leaves.append(Leaf(ti, path, node, slot))
                spent[ti] += 1
        if leaves:
            expand_leaves(trees, leaves, simulator, max_batch, rewards)
        moved = False
        for tree, prefix in zip(trees, prefixes):
            if depth < len(prefix):
                child = tree.search_root.child_for(prefix[depth])
                assert child is not None  # expanded above where it was missing
                tree.search_root = child
                moved = True
        if not moved:
            return spent
        depth += 1


def search(trees: list[Tree], simulator: Simulator, config: SearchConfig, prefixes: list[list[int]] | None = None,
           budgets: list[int] | None = None, rewards: Sequence[Reward | None] | None = None) -> list[SearchStats]:
    """Run simulations in every tree (from the end of its forced prefix), batching leaves across trees.

    ``rewards[i]`` (optional) scores tree ``i``'s nodes that end the answer (see the module doc).
    """
    t0 = time.monotonic()
    deadline = t0 + config.time_budget_s
    budgets = list(budgets) if budgets is not None else [config.simulations] * len(trees)
    for tree, budget, prefix in zip(trees, budgets, prefixes or [[]] * len(trees)):
        tree.reserve(budget + len(prefix))
    done = prepare_prefix(trees, prefixes, simulator, config.max_batch, rewards) if prefixes else [0] * len(trees)
    while time.monotonic() < deadline:
        leaves, terminal = [], False
        for ti, tree in enumerate(trees):
            for _ in range(min(config.leaves_per_tree, budgets[ti] - done[ti])):
                selected = tree.select(config.c_puct, config.fpu_reduction, config.max_depth)
                if selected is None:
                    break
                path, node, slot = selected
                done[ti] += 1
                if slot is None:  # a terminal node: its value is already backed up again
                    terminal = True
                else:
                    leaves.append(Leaf(ti, path, node, slot))
        if not leaves:
            if terminal:
                continue  # only terminal nodes were selected this round: select again (the budget bounds it)
            break
        expand_leaves(trees, leaves, simulator, config.max_batch, rewards)
    seconds = time.monotonic() - t0
    return [SearchStats(d, seconds) for d in done]


def best_path(tree: Tree, prefix: Sequence[int], max_len: int) -> list[Node]:
    """Nodes along the prefix, then along the most visited children; the root first."""
    nodes = [tree.root]
    for tok in prefix:
        nxt = nodes[-1].child_for(tok)
        if nxt is None:
            return nodes
        nodes.append(nxt)
    while len(nodes) < max_len + 1:
        nxt = nodes[-1].best_child()
        if nxt is None:
            break
        nodes.append(nxt)
    return nodes
