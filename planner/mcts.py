"""Batched PUCT search over a simulator, for several sessions' trees at once.

As in AlphaZero / MuZero: a node's children are its top-k tokens with their
priors, selection maximises ``Q + c_puct * prior * sqrt(N_parent) / (1 + N)``,
a leaf is expanded with one simulator call and its value backed up along the
path (single agent, no intermediate reward, no discount). Values live in
``[-1, 1]`` and Q is normalised to ``[0, 1]`` with that known range.

What makes it fast and usable live:

- Leaves are evaluated in batches: each round selects up to
  ``leaves_per_tree`` leaves in every tree (a virtual loss on the path makes
  the next selection look elsewhere), then expands all leaves of all trees in
  one simulator call (the way DeepMind's mctx batches trees). How leaves are
  chunked into calls (``max_batch``) never changes the tree.
- Unvisited children get a finite first-play value, the parent's Q minus
  ``fpu_reduction``: with ``+inf`` a small budget would never look past depth
  one. (Gumbel-MuZero root selection was considered; with tree reuse and a
  forced prefix the root is rarely fresh, so plain PUCT is kept.)
- A tree lives as long as its session: :meth:`Tree.advance` re-roots it on
  the node reached by the tokens actually generated, keeps that subtree and
  frees the rest, and puts the real state in the new root.
- The budget is simulations and wall time, whichever ends first.

The search is generic: nothing in it knows about tasks or text.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from planner.simulators import Simulator, as_long

VIRTUAL_LOSS = 1.0  # in value units: a pending path counts as a visit that scored -1


@dataclass(frozen=True)
class SearchConfig:
    simulations: int = 32
    top_k: int = 8
    leaves_per_tree: int = 4
    c_puct: float = 1.25
    fpu_reduction: float = 0.25
    time_budget_s: float = 0.05
    max_batch: int = 1024  # leaves per simulator call
    max_path: int = 16


class Node:
    __slots__ = ("parent", "token", "row", "actions", "priors", "children", "pending", "visits", "value_sum", "value")

    def __init__(self, parent: "Node | None", token: int, row: int, actions: list[int], priors: list[float],
                 value: float):
        self.parent = parent
        self.token = token
        self.row = row  # this node's state in the tree's store
        self.actions, self.priors = actions, priors
        self.children: list[Node | None] = [None] * len(self.actions)
        self.pending: set[int] = set()  # slots selected in this round, not yet expanded
        self.visits = 1  # its own evaluation
        self.value_sum = value
        self.value = value

    @property
    def q(self) -> float:
        return self.value_sum / self.visits

    def slot_of(self, token: int) -> int | None:
        try:
            return self.actions.index(token)
        except ValueError:
            return None

    def child_for(self, token: int) -> "Node | None":
        slot = self.slot_of(token)
        return None if slot is None else self.children[slot]

    def visited_children(self) -> list["Node"]:
        return [c for c in self.children if c is not None]

    def best_child(self) -> "Node | None":
        """Most visited child; ties go to the higher Q, then to the higher prior."""
        best, key = None, None
        for slot, child in enumerate(self.children):
            if child is None:
                continue
            k = (child.visits, child.q, self.priors[slot])
            if key is None or k > key:
                best, key = child, k
        return best


def top_actions(logits: Tensor, k: int, extra: Sequence[int] = ()) -> tuple[list[int], list[float]]:
    """The top-k tokens (plus ``extra`` ones) and their softmax priors renormalised over that set."""
    logits = logits.float()
    k = min(k, logits.shape[-1])
    top = torch.topk(logits, k).indices.tolist()
    tokens = top + [t for t in extra if t not in top and 0 <= t < logits.shape[-1]]
    chosen = logits[torch.tensor(tokens, dtype=torch.long)]
    priors = torch.softmax(chosen, dim=-1)
    if not bool(torch.isfinite(priors).all()):
        priors = torch.full((len(tokens),), 1.0 / len(tokens))
    return tokens, priors.tolist()


def _renormalised(p: list[float]) -> list[float]:
    total = sum(p)
    return [x / total for x in p] if total > 0 else [1.0 / len(p)] * len(p)


def normalised(q: float) -> float:
    return (q + 1.0) / 2.0


def confidence(node: Node) -> float:
    """How sure the search is of ``node``'s best child, in [0, 1], from visit counts and values only.

    visit share of the best child x value advantage of that child over the node
    (0.5 when equal, 0 or 1 at -/+1) x a shrinkage n / (n + 2) for n child visits.
    """
    children = node.visited_children()
    best = node.best_child()
    if best is None:
        return 0.0
    n = sum(c.visits for c in children)
    share = best.visits / n
    advantage = min(max(0.5 + 0.5 * (best.q - node.q), 0.0), 1.0)
    return share * advantage * n / (n + 2.0)


class Tree:
    """One session's search tree and the states of its nodes (a store of rows per state part)."""

    def __init__(self, states: tuple[Tensor, ...], root_logits: Tensor, root_value: float, top_k: int,
                 extra: Sequence[int] = ()):
        self.store = tuple(s.clone() for s in states)  # each (n_layer, rows, ...)
        self.rows = states[0].shape[1]
        self.top_k = top_k
        self.root = Node(None, -1, 0, *top_actions(root_logits, top_k, extra), root_value)
        self.search_root = self.root  # where simulations start (the root, or the end of a forced prefix)

    # States -------------------------------------------------------------
    def gather(self, rows: list[int]) -> tuple[Tensor, ...]:
        idx = torch.tensor(rows, dtype=torch.long)
        return tuple(s.index_select(1, idx) for s in self.store)

    def reserve(self, rows: int) -> None:
        """Make room for ``rows`` more node states (one allocation per search, not per leaf)."""
        if self.rows + rows > self.store[0].shape[1]:
            self.store = tuple(_grown(s, max(self.rows + rows, 2 * s.shape[1])) for s in self.store)

    def add_rows(self, states: tuple[Tensor, ...]) -> list[int]:
        n = states[0].shape[1]
        self.reserve(n)
        for part, s in zip(self.store, states):
            part[:, self.rows : self.rows + n] = s
        first, self.rows = self.rows, self.rows + n
        return list(range(first, first + n))

    def state(self, node: Node, part: int) -> Tensor:
        return self.store[part][:, node.row]

    # Selection and backup ------------------------------------------------
    def select(self, config: SearchConfig) -> tuple[list[Node], Node, int] | None:
        """Descend from the search root to an unexpanded slot, adding virtual loss on the way.

        Slots already pending in this round are not chosen again; None when
        nothing is left to select (every reachable slot is pending or the
        path limit is hit).
        """
        node, path = self.search_root, [self.search_root]
        while len(path) <= config.max_path * 4:
            slot = self._best_slot(node, config)
            if slot is None:
                return None
            child = node.children[slot]
            if child is None:
                node.pending.add(slot)
                for n in path:
                    n.visits += 1
                    n.value_sum -= VIRTUAL_LOSS
                return path, node, slot
            node = child
            path.append(node)
        return None

    @staticmethod
    def _best_slot(node: Node, config: SearchConfig) -> int | None:
        sqrt_n = math.sqrt(node.visits)
        fpu = normalised(node.q) - config.fpu_reduction
        best, best_score = None, -math.inf
        for slot, prior in enumerate(node.priors):
            child = node.children[slot]
            if child is not None:
                n, q = child.visits, normalised(child.q)
            elif slot in node.pending:
                continue
            else:
                n, q = 0, fpu
            score = q + config.c_puct * prior * sqrt_n / (1 + n)
            if score > best_score:
                best, best_score = slot, score
        return best

    def expand(self, path: list[Node], node: Node, slot: int, row: int, actions: list[int], priors: list[float],
               value: float) -> Node:
        child = Node(node, node.actions[slot], row, actions, priors, value)
        node.children[slot] = child
        node.pending.discard(slot)
        for n in path:  # the virtual visit becomes the real one; its -1 becomes the value
            n.value_sum += value + VIRTUAL_LOSS
        return child

    # Reuse ----------------------------------------------------------------
    def follow(self, tokens: Sequence[int], start: Node | None = None) -> Node | None:
        node = start or self.root
        for tok in tokens:
            node = node.child_for(tok)
            if node is None:
                return None
        return node

    def advance(self, tokens: Sequence[int], states: tuple[Tensor, ...], root_value: float) -> bool:
        """Re-root on the node reached by ``tokens`` with the real ``states``; False if it is not in the tree."""
        node = self.follow(tokens)
        if node is None:
            return False
        live: list[Node] = []
        stack = [node]
        while stack:
            n = stack.pop()
            live.append(n)
            stack.extend(n.visited_children())
        self.store = self.gather([n.row for n in live])
        self.rows = len(live)
        for i, n in enumerate(live):
            n.row = i
        for part, s in zip(self.store, states):
            part[:, 0] = s[:, 0]
        node.parent, node.token = None, -1
        node.value_sum += root_value - node.value  # its predicted state's evaluation gives way to the real one's
        node.value = root_value
        self.root = self.search_root = node
        return True

    def size(self) -> int:
        count, stack = 0, [self.root]
        while stack:
            n = stack.pop()
            count += 1
            stack.extend(n.visited_children())
        return count


def _grown(t: Tensor, rows: int) -> Tensor:
    out = t.new_empty((t.shape[0], rows, *t.shape[2:]))
    out[:, : t.shape[1]] = t
    return out


@dataclass
class SearchStats:
    simulations: int
    seconds: float


def _evaluate(trees: list[Tree], leaves: list[tuple[int, list[Node], Node, int]], simulator: Simulator,
              max_batch: int) -> None:
    """Expand ``leaves`` (tree index, path, node, slot), ``max_batch`` per simulator call.

    Leaves are grouped by tree, so a call gathers and stores one slice per tree and state part.
    """
    leaves = sorted(leaves, key=lambda leaf: leaf[0])  # stable: a tree's leaves keep their order
    for start in range(0, len(leaves), max_batch):
        chunk = leaves[start : start + max_batch]
        groups: dict[int, list[int]] = {}
        for j, (ti, _, _, _) in enumerate(chunk):
            groups.setdefault(ti, []).append(j)
        parts = [trees[ti].gather([chunk[j][2].row for j in js]) for ti, js in groups.items()]
        states = tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(len(parts[0])))
        tokens = as_long([node.actions[slot] for _, _, node, slot in chunk])
        out = simulator.expand(states, tokens)
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
                _, path, node, slot = chunk[j]
                p = priors[j][:kt] if kt == k else _renormalised(priors[j][:kt])
                tree.expand(path, node, slot, row, actions[j][:kt], p, values[j])


def prepare_prefix(trees: list[Tree], prefixes: list[list[int]], simulator: Simulator, max_batch: int) -> list[int]:
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
                node.actions.append(prefix[depth])
                node.priors.append(0.0)
                node.children.append(None)
                slot = len(node.actions) - 1
            if node.children[slot] is None:
                path = _path_to(node)
                for n in path:
                    n.visits += 1
                    n.value_sum -= VIRTUAL_LOSS
                node.pending.add(slot)
                leaves.append((ti, path, node, slot))
                spent[ti] += 1
        if leaves:
            _evaluate(trees, leaves, simulator, max_batch)
        moved = False
        for tree, prefix in zip(trees, prefixes):
            if depth < len(prefix):
                tree.search_root = tree.search_root.child_for(prefix[depth])
                moved = True
        if not moved:
            return spent
        depth += 1


def _path_to(node: Node) -> list[Node]:
    path = []
    n: Node | None = node
    while n is not None:
        path.append(n)
        n = n.parent
    return path[::-1]


def search(trees: list[Tree], simulator: Simulator, config: SearchConfig, prefixes: list[list[int]] | None = None,
           budgets: list[int] | None = None) -> list[SearchStats]:
    """Run simulations in every tree (from the end of its forced prefix), batching leaves across trees."""
    t0 = time.monotonic()
    deadline = t0 + config.time_budget_s
    budgets = list(budgets) if budgets is not None else [config.simulations] * len(trees)
    for tree, budget, prefix in zip(trees, budgets, prefixes or [[]] * len(trees)):
        tree.reserve(budget + len(prefix))
    done = prepare_prefix(trees, prefixes, simulator, config.max_batch) if prefixes else [0] * len(trees)
    while time.monotonic() < deadline:
        leaves = []
        for ti, tree in enumerate(trees):
            for _ in range(min(config.leaves_per_tree, budgets[ti] - done[ti])):
                leaf = tree.select(config)
                if leaf is None:
                    break
                leaves.append((ti, *leaf))
                done[ti] += 1
        if not leaves:
            break
        _evaluate(trees, leaves, simulator, config.max_batch)
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
