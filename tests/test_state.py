"""Per-sequence state: serialisation, fork, gather/select, writing rows."""

import pytest
import torch

from engine import MambaState, StateError
from tests.conftest import make_model


def prefilled(model, n, seed=0):
    ids = torch.randint(0, 256, (n, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.prefill(ids)[1]


def test_bytes_round_trip(tiny_model):
    state = prefilled(tiny_model, 1)
    data = state.to_bytes()
    back = MambaState.from_bytes(data, tiny_model.state_shape())
    assert torch.equal(back.conv, state.conv) and torch.equal(back.ssm, state.ssm)
    assert back.ssm.dtype == torch.float32
    assert state.nbytes == state.conv.nbytes + state.ssm.nbytes > 0


def test_bytes_of_another_model_or_garbage_are_refused(tiny_model):
    other = make_model(d_state=4)
    with pytest.raises(StateError, match="shape"):
        MambaState.from_bytes(prefilled(other, 1).to_bytes(), tiny_model.state_shape())
    wrong_dtype = prefilled(tiny_model, 1)
    wrong_dtype.ssm = wrong_dtype.ssm.double()
    with pytest.raises(StateError, match="dtype"):
        MambaState.from_bytes(wrong_dtype.to_bytes(), tiny_model.state_shape())
    with pytest.raises(StateError):
        MambaState.from_bytes(b"\x00" * 40, tiny_model.state_shape())


def test_fork_is_independent(tiny_model):
    parent = prefilled(tiny_model, 1)
    snapshot = parent.clone()
    child = parent.clone()
    with torch.no_grad():
        tiny_model.step(torch.tensor([3]), child)
    assert not torch.equal(child.ssm, parent.ssm)
    assert torch.equal(parent.ssm, snapshot.ssm) and torch.equal(parent.conv, snapshot.conv)


def test_gather_select_round_trip_and_decoding(tiny_model):
    singles = [prefilled(tiny_model, 1, seed=s) for s in range(3)]
    batch = MambaState.gather(singles)
    assert batch.batch_size == 3
    tokens = torch.tensor([1, 2, 3])
    with torch.no_grad():
        batched_logits = tiny_model.step(tokens, batch)
        for i, single in enumerate(singles):
            alone = tiny_model.step(tokens[i : i + 1], single)
            assert (alone[0] - batched_logits[i]).abs().max() < 1e-5
    for i, part in enumerate(batch.select([i]) for i in range(batch.batch_size)):
        assert torch.allclose(part.ssm, singles[i].ssm, atol=1e-6)
        assert part.ssm.data_ptr() != batch.ssm.data_ptr()  # copies, not views of the batch
    target = tiny_model.allocate_state(3)
    target.write_rows([2, 0], MambaState.gather([singles[0], singles[2]]))
    assert torch.equal(target.ssm[:, 2], singles[0].ssm[:, 0]) and torch.equal(target.ssm[:, 1], torch.zeros_like(target.ssm[:, 1]))
    with pytest.raises(StateError):
        MambaState.gather([])


