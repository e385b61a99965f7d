"""The search: finds a known best action, batching never changes a tree, trees are reused, budgets hold."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.models.planner_net import PlannerConfig, PlannerNet
from planner.search import SearchConfig, search
from planner.simulators import Expansion, LatentSimulator
from planner.tree import Tree, confidence

LONG = 60.0  # a time budget that never ends a search in these tests: simulations do


class RewardOneToken:
    """A toy simulator: the state remembers the first move; its value is +1 below ``target``, else -0.5."""

    name = "toy"

    def __init__(self, vocab: int, target: int):
        self.vocab, self.target = vocab, target
        self.calls = 0

    def value(self, states):
        return torch.zeros(states[0].shape[1])

    def expand(self, states, tokens):
        self.calls += 1
        b = tokens.shape[0]
        parent = states[0].view(b)
        first = torch.where(parent < 0, tokens.float(), parent)
        values = torch.where(first == self.target, 1.0, -0.5)
        return Expansion((first.view(1, b, 1),), torch.zeros(b, self.vocab), values)


def toy_tree(vocab=10, target=7) -> Tree:
    logits = torch.linspace(1.0, 0.0, vocab)  # prior decreasing with the token id: the target is not the favourite
    return Tree((torch.full((1, 1, 1), -1.0),), logits, 0.0, top_k=8)


def signature(tree: Tree) -> list[tuple]:
    out, stack = [], [((), tree.root)]
    while stack:
        key, node = stack.pop()
        out.append((key, node.visits, round(node.q, 6), tuple(node.actions)))
        stack.extend((key + (c.token,), c) for c in node.visited_children())
    return sorted(out)


def test_search_finds_the_rewarded_action_though_the_policy_ranks_it_last():
    tree, sim = toy_tree(), RewardOneToken(10, 7)
    [stats] = search([tree], sim, SearchConfig(simulations=64, top_k=8, time_budget_s=LONG))
    assert stats.simulations == 64
    best = tree.root.best_child()
    assert best.token == 7
    assert best.visits > 64 // 2
    assert confidence(tree.root) > 0.4
    assert sim.calls < 64  # leaves were evaluated in batches


def test_unvisited_children_have_a_finite_first_play_value_so_small_budgets_go_deeper():
    tree, sim = toy_tree(), RewardOneToken(10, 7)
    search([tree], sim, SearchConfig(simulations=12, top_k=8, leaves_per_tree=1, time_budget_s=LONG))
    depth = max(len(key) for key, *_ in signature(tree))
    assert depth >= 2  # with +inf first-play values 12 simulations would only cover the 8 root moves


def net_and_states(seed: int, trees: int):
    torch.manual_seed(seed)
    net = PlannerNet(PlannerConfig(n_layer=2, d_inner=8, d_state=4, vocab_size=20, d_token=8, d_summary=4,
                                   d_policy=8, d_value=8)).double()
    states = [torch.randn(2, 1, 8, 4, dtype=torch.float64) for _ in range(trees)]
    logits = [torch.randn(20, dtype=torch.float64) for _ in range(trees)]
    return net, states, logits


def fresh_trees(net, states, logits) -> list[Tree]:
    sim = LatentSimulator(net)
    return [Tree((s,), lg, float(sim.value((s,))), top_k=4) for s, lg in zip(states, logits)]


def test_batched_evaluation_gives_the_same_trees_as_one_leaf_at_a_time():
    net, states, logits = net_and_states(seed=3, trees=3)
    sim = LatentSimulator(net)
    config = SearchConfig(simulations=24, top_k=4, leaves_per_tree=4, time_budget_s=LONG)
    with torch.inference_mode():
        together = fresh_trees(net, states, logits)
        search(together, sim, config)
        alone = fresh_trees(net, states, logits)
        for tree in alone:
            search([tree], sim, SearchConfig(**{**config.__dict__, "max_batch": 1}))
    for a, b in zip(together, alone):
        assert signature(a) == signature(b)
        assert sum(1 for _ in _walk(a.root)) == 25


def test_a_tree_is_reused_under_the_token_actually_played():
    net, states, logits = net_and_states(seed=4, trees=1)
    sim = LatentSimulator(net)
    with torch.inference_mode():
        [tree] = fresh_trees(net, states, logits)
        search([tree], sim, SearchConfig(simulations=40, top_k=4, time_budget_s=LONG))
        child = tree.root.best_child()
        kept_visits, kept_size = child.visits, sum(1 for _ in _walk(child))
        real = torch.randn(2, 1, 8, 4, dtype=torch.float64)
        assert tree.advance([child.token], (real,), root_value=0.25)
        assert tree.root is child and tree.root.parent is None
        assert tree.root.visits == kept_visits and sum(1 for _ in _walk(tree.root)) == kept_size
        assert torch.equal(tree.state(tree.root, 0), real[:, 0])
        assert tree.rows == kept_size  # the rest of the old tree's states were freed
        assert not tree.advance([999], (real,), root_value=0.0)


def test_the_time_budget_ends_a_search_early():
    net, states, logits = net_and_states(seed=5, trees=1)
    with torch.inference_mode():
        [tree] = fresh_trees(net, states, logits)
        [stats] = search([tree], LatentSimulator(net), SearchConfig(simulations=10_000, top_k=4, time_budget_s=0.05))
    assert 0 < stats.simulations < 10_000


def _walk(node):
    yield node
    for child in node.visited_children():
        yield from _walk(child)


def test_the_planner_reuses_a_request_tree_along_the_tokens_generated_since_its_last_plan():
    from engine.thinking import PlanJob, ThinkParams
    from planner.planner import Planner
    from planner.simulators import BackboneSimulator
    from tests.conftest import make_model

    model = make_model(seed=8)
    torch.manual_seed(0)
    planner = Planner(BackboneSimulator(model, PlannerNet.for_backbone(model)))
    params = ThinkParams(simulations=24, time_budget_ms=60_000, deliberation_lag=1)
    with torch.inference_mode():
        logits, state = model.prefill(torch.tensor([[1, 2, 3]]))
        pending = int(logits.argmax())
        [first] = planner.run([PlanJob("s", 0, state.clone(), logits[0], [pending], params)])
        tree = planner.tree("s")
        node = tree.follow([pending, first.path[1]])
        assert node is not None
        kept = node.visits
        step_logits = model.step(torch.tensor([pending]), state)  # the engine feeds the pending token...
        [second] = planner.run([PlanJob("s", 1, state.clone(), step_logits[0], [pending, first.path[1]], params)])
        reused = planner.tree("s")
        assert reused is tree and tree.root is node.parent  # ...and the tree is re-rooted on the real state
        assert tree.follow([first.path[1]]).visits >= kept
        planner.forget("s")
        assert "s" not in planner


# Decision deltas and terminal rewards ------------------------------------------------------------------------
def _decision_case(model, seed: int, rows: int = 6):
    """Constructed states (a random prompt's state, then noise), a fed token and a target that is not the argmax."""
    from engine.state import MambaState

    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    with torch.inference_mode():
        prompt = torch.randint(0, min(vocab, 256), (rows, 12), generator=gen)
        _, state = model.prefill(prompt)
        state = MambaState(state.conv, state.ssm + 0.1 * torch.randn(state.ssm.shape, generator=gen))
        tokens = torch.randint(0, min(vocab, 256), (rows,), generator=gen)
        logits = model.step(tokens, state.clone())
    order = logits.argsort(dim=1, descending=True)
    targets = order.gather(1, (1 + torch.arange(rows) % 2).view(-1, 1)).squeeze(1)  # the 2nd or 3rd favourite
    return state, tokens, targets


def _argmax_after(model, state, tokens, changes):
    from engine.state import MambaState

    with torch.inference_mode():
        moved = MambaState(state.conv.clone(), state.ssm + changes.transpose(0, 1))
        return model.step(tokens, moved).argmax(dim=1)


def test_a_decision_delta_makes_the_chosen_token_win_the_step_it_lands_on():
    from engine.checkpoint import load_model
    from planner.decision import decision_deltas
    from tests.conftest import make_model

    models = [load_model(Path(__file__).parent.parent / "checkpoints" / "default").model.float().eval()] + [make_model(seed=s) for s in (1, 2)]
    for i, model in enumerate(models):
        state, tokens, targets = _decision_case(model, seed=i)
        before = _argmax_after(model, state, tokens, torch.zeros(len(tokens), *state.ssm.shape[:1],
                                                                  *state.ssm.shape[2:]))
        assert not bool((before == targets).any())
        decision = decision_deltas(model, state.conv, state.ssm, tokens, targets, trust_region=0.5)
        assert bool(torch.isfinite(decision.changes).all())
        won = _argmax_after(model, state, tokens, decision.changes)
        assert bool((won == targets).all()), (i, won.tolist(), targets.tolist(), decision.margins)
        limit = 0.5 * state.ssm.flatten(2).norm(dim=2).clamp_min(1.0).transpose(0, 1)  # (rows, layers)
        assert bool((decision.changes.flatten(2).norm(dim=2) <= limit * (1 + 1e-4)).all())


def test_a_decision_delta_is_zero_where_the_choice_already_wins():
    from planner.decision import decision_deltas
    from tests.conftest import make_model

    model = make_model(seed=3)
    state, tokens, _ = _decision_case(model, seed=3)
    with torch.inference_mode():
        favourite = model.step(tokens, state.clone()).argmax(dim=1)
    decision = decision_deltas(model, state.conv, state.ssm, tokens, favourite, trust_region=0.5, target_margin=0.0)
    assert float(decision.changes.abs().max()) == 0.0


def test_a_terminal_reward_steers_the_search_and_ends_the_branch():
    """A reward that ends every branch at depth 2 and pays only for (.., 7): the search finds 7 and never
    expands below a terminal node."""
    tree, sim = toy_tree(target=3), RewardOneToken(10, 3)

    def reward(key):
        if len(key) < 2:
            return None
        return 1.0 if key[1] == 7 else -1.0

    [stats] = search([tree], sim, SearchConfig(simulations=200, top_k=8, time_budget_s=LONG), prefixes=[[0]],
                     rewards=[reward])
    below = tree.root.child_for(0)
    assert below.best_child().token == 7
    assert below.best_child().terminal and below.best_child().q == 1.0
    assert all(not c.visited_children() for c in below.visited_children())
    assert stats.simulations <= 200


def test_each_row_of_a_decision_batch_keeps_its_own_trust_region():
    """Rows of several requests share one batch: a request asking trust_region 0 must not zero the others'."""
    from planner.decision import decision_deltas
    from tests.conftest import make_model

    model = make_model(seed=1)
    state, tokens, targets = _decision_case(model, seed=1)
    regions = torch.tensor([0.0] + [0.5] * (len(tokens) - 1))
    decision = decision_deltas(model, state.conv, state.ssm, tokens, targets, trust_region=regions)
    norms = decision.changes.flatten(2).norm(dim=2)  # (rows, layers)
    assert float(norms[0].max()) == 0.0 and bool((norms[1:].sum(dim=1) > 0).all())
    limit = regions.view(-1, 1) * state.ssm.flatten(2).norm(dim=2).clamp_min(1.0).transpose(0, 1)
    assert bool((norms <= limit * (1 + 1e-4)).all())
