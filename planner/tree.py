"""A search tree: nodes with PUCT statistics, their states in one store, reuse along the generated tokens.

A node's children are its top-k tokens with their priors (:func:`top_actions`);
selection maximises ``Q + c_puct * prior * sqrt(N_parent) / (1 + N)`` and a
leaf's value is backed up along its path (single agent, no intermediate
reward, no discount). Values live in ``[-1, 1]`` and Q is normalised to
``[0, 1]`` with that known range. Unvisited children get a finite first-play
value, the parent's Q minus ``fpu_reduction``: with ``+inf`` a small budget
would never look past depth one.

A selected slot is *pending* until it is expanded: :func:`mark_pending` counts
a virtual visit that scored -1 on its path, so the next selection of the same
round looks elsewhere, and :meth:`Tree.expand` turns it into the real one.

A tree lives as long as the request it plans for: :meth:`Tree.advance`
re-roots it on the node reached by the tokens actually generated, keeps that
subtree and frees the rest, and puts the real state in the new root. The
search that grows trees, several at once, is :mod:`planner.search`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

VIRTUAL_LOSS = 1.0  # in value units: a pending path counts as a visit that scored -1


class Node:
    __slots__ = ("parent", "token", "row", "actions", "priors", "children", "pending", "visits", "value_sum", "value",
                 "terminal")

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
        self.terminal = False  # it ends the answer: its value is a verifier's reward, nothing is expanded below

    @property
    def q(self) -> float:
        return self.value_sum / self.visits

    def slot_of(self, token: int) -> int | None:
        try:
            return self.actions.index(token)
        except ValueError:
            return None

    def add_action(self, token: int) -> int:
        """Give ``token`` a slot (prior 0) among this node's actions; its slot."""
        self.actions.append(token)
        self.priors.append(0.0)
        self.children.append(None)
        return len(self.actions) - 1

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


def normalised(q: float) -> float:
    return (q + 1.0) / 2.0


def decision_features(node: Node) -> tuple[float, float, int]:
    """The search's evidence for ``node``'s best child: (visit share, value advantage over the node, child visits)."""
    children = node.visited_children()
    best = node.best_child()
    if best is None:
        return 0.0, 0.0, 0
    n = sum(c.visits for c in children)
    return best.visits / n, best.q - node.q, n


@dataclass(frozen=True)
class Calibration:
    """``P(the search's choice is right) = sigmoid(bias + w_share * share + w_advantage * advantage)``.

    Fitted on held-out problems by :mod:`planner.offline.calibrate` and stored in the
    checkpoint's ``planner.json`` (key ``calibration``), so a stated
    confidence of p is right about p of the time on such problems.
    """

    bias: float
    w_share: float
    w_advantage: float
    record: dict = field(default_factory=dict, compare=False)

    def __call__(self, share: float, advantage: float) -> float:
        z = self.bias + self.w_share * share + self.w_advantage * advantage
        return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))

    def as_dict(self) -> dict:
        return {"bias": self.bias, "w_share": self.w_share, "w_advantage": self.w_advantage, "record": self.record}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(float(d["bias"]), float(d["w_share"]), float(d["w_advantage"]), dict(d.get("record", {})))


def confidence(node: Node, calibration: Calibration | None = None) -> float:
    """How sure the search is of ``node``'s best child, in [0, 1], from visit counts and values only.

    With a calibration: its logistic of visit share and value advantage.
    Without (an uncalibrated checkpoint): visit share of the best child x
    value advantage of that child over the node (0.5 when equal, 0 or 1 at
    -/+1) x a shrinkage n / (n + 2) for n child visits.
    """
    share, advantage, n = decision_features(node)
    if n == 0:
        return 0.0
    if calibration is not None:
        return calibration(share, advantage)
    return share * min(max(0.5 + 0.5 * advantage, 0.0), 1.0) * n / (n + 2.0)


def path_to(node: Node) -> list[Node]:
    """The nodes from the root down to ``node``, both included."""
    path = []
    n: Node | None = node
    while n is not None:
        path.append(n)
        n = n.parent
    return path[::-1]


def tokens_to(node: Node) -> list[int]:
    """The tokens from the root down to ``node`` (the root's own placeholder token excluded)."""
    return [n.token for n in path_to(node)[1:]]


def mark_pending(path: list[Node], node: Node, slot: int) -> None:
    """Select ``node``'s ``slot`` for expansion: pending, and a virtual loss on every node of ``path``."""
    node.pending.add(slot)
    for n in path:
        n.visits += 1
        n.value_sum -= VIRTUAL_LOSS


class Tree:
    """One request's search tree and the states of its nodes (a store of rows per state part)."""

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
    def select(self, c_puct: float, fpu_reduction: float,
               max_depth: int) -> tuple[list[Node], Node, int | None] | None:
        """Descend from the search root to an unexpanded slot and mark it pending: (path, node, slot).

        Slots already pending in this round are not chosen again; None when
        nothing is left to select (every reachable slot is pending, or the
        path would hold more than ``max_depth`` nodes). Reaching a terminal
        node backs its value up again along the path and returns
        ``(path, terminal node, None)``: a simulation with nothing to expand.
        """
        node, path = self.search_root, [self.search_root]
        while len(path) <= max_depth:
            slot = _best_slot(node, c_puct, fpu_reduction)
            if slot is None:
                return None
            child = node.children[slot]
            if child is None:
                mark_pending(path, node, slot)
                return path, node, slot
            node = child
            path.append(node)
            if node.terminal:
                for n in path:
                    n.visits += 1
                    n.value_sum += node.value
                return path, node, None
        return None

    def expand(self, path: list[Node], node: Node, slot: int, row: int, actions: list[int], priors: list[float],
               value: float, terminal: bool = False) -> Node:
        child = Node(node, node.actions[slot], row, actions, priors, value)
        child.terminal = terminal
        node.children[slot] = child
        node.pending.discard(slot)
        for n in path:  # the virtual visit becomes the real one; its -1 becomes the value
            n.value_sum += value + VIRTUAL_LOSS
        return child

    # Reuse ----------------------------------------------------------------
    def follow(self, tokens: Sequence[int], start: Node | None = None) -> Node | None:
        node = start or self.root
        for tok in tokens:
            child = node.child_for(tok)
            if child is None:
                return None
            node = child
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


def _best_slot(node: Node, c_puct: float, fpu_reduction: float) -> int | None:
    """The PUCT choice among ``node``'s slots that are not pending; None when all are."""
    sqrt_n = math.sqrt(node.visits)
    fpu = normalised(node.q) - fpu_reduction
    best, best_score = None, -math.inf
    for slot, prior in enumerate(node.priors):
        child = node.children[slot]
        if child is not None:
            n, q = child.visits, normalised(child.q)
        elif slot in node.pending:
            continue
        else:
            n, q = 0, fpu
        score = q + c_puct * prior * sqrt_n / (1 + n)
        if score > best_score:
            best, best_score = slot, score
    return best


def _grown(t: Tensor, rows: int) -> Tensor:
    out = t.new_empty((t.shape[0], rows, *t.shape[2:]))
    out[:, : t.shape[1]] = t
    return out
