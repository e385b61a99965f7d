"""The backbone: cached prefill/decode against full forwards, causality, batching, parity with transformers."""

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from engine import MambaConfig, MambaLMHeadModel
from engine.checkpoint import load_model
from tests.conftest import make_model
from tests.hf_parity import max_logit_differences, off_the_init

configs = st.fixed_dictionaries(
    {
        "d_model": st.sampled_from([8, 16, 24]),
        "n_layer": st.integers(1, 3),
        "d_state": st.sampled_from([2, 4, 8, 16]),
        "d_conv": st.integers(2, 4),
        "expand": st.integers(1, 2),
        "rms_norm": st.booleans(),
        "residual_in_fp32": st.booleans(),
        "tie_embeddings": st.booleans(),
        "vocab_size": st.integers(5, 300),
        "pad_vocab_size_multiple": st.sampled_from([1, 8]),
    }
)


@given(cfg=configs, length=st.integers(2, 90), data=st.data())
def test_prefill_then_cached_steps_equal_full_forward(cfg, length, data):
    model = make_model(seed=data.draw(st.integers(0, 100)), **cfg)
    split = data.draw(st.integers(1, length - 1))
    ids = torch.randint(0, cfg["vocab_size"], (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        full, full_state = model(ids)
        logits, state = model.prefill(ids[:, :split])
        assert full.shape[-1] == cfg["vocab_size"]  # padded rows are never exposed
        assert (logits - full[:, split - 1]).abs().max() < 1e-4
        for t in range(split, length):
            logits = model.step(ids[:, t], state)
            assert (logits - full[:, t]).abs().max() < 1e-4, t
    assert (state.ssm - full_state.ssm).abs().max() < 1e-4
    assert (state.conv - full_state.conv).abs().max() < 1e-5


@given(first=st.integers(1, 40), second=st.integers(1, 40))
def test_prefill_continues_from_a_state(first, second):
    """A session fed in two prefills equals one prefill of the concatenation."""
    model = make_model(seed=1)
    ids = torch.randint(0, 256, (1, first + second), generator=torch.Generator().manual_seed(first * 41 + second))
    with torch.no_grad():
        full_logits, full_state = model.prefill(ids)
        _, state = model.prefill(ids[:, :first])
        logits, state = model.prefill(ids[:, first:], state=state)
    assert (logits - full_logits).abs().max() < 1e-4
    assert (state.ssm - full_state.ssm).abs().max() < 1e-4


def test_causality():
    model = make_model(seed=2)
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base, _ = model(ids)
        for j in (5, 33, 69):
            changed = ids.clone()
            changed[0, j] = (changed[0, j] + 7) % 256
            out, _ = model(changed)
            assert (out[:, :j] - base[:, :j]).abs().max() < 1e-6
            assert (out[:, j] - base[:, j]).abs().max() > 1e-4  # and the change is visible from j on


def test_batch_of_unequal_lengths_equals_each_alone():
    model = make_model(seed=3)
    lengths = [37, 5, 1, 20]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (n,), generator=g) for n in lengths]
    batch = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    for i, s in enumerate(seqs):
        batch[i, : len(s)] = s
    with torch.no_grad():
        start = model.allocate_state(len(seqs))
        start.ssm.normal_(generator=g)  # resumed sequences, not only fresh ones
        start.conv.normal_(generator=g)
        logits, state = model.prefill(batch, lengths=torch.tensor(lengths), state=start)
        for i, s in enumerate(seqs):
            alone_logits, alone_state = model.prefill(s[None], state=start.select([i]))
            assert (logits[i] - alone_logits[0]).abs().max() < 1e-4
            assert (state.ssm[:, i] - alone_state.ssm[:, 0]).abs().max() < 1e-4
            assert (state.conv[:, i] - alone_state.conv[:, 0]).abs().max() < 1e-6


def test_decode_rows_are_independent():
    model = make_model(seed=6)
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, state = model.prefill(ids)
        batched = model.step(ids[:, -1], state)
        for i in range(3):
            _, alone = model.prefill(ids[i : i + 1])
            assert (model.step(ids[i : i + 1, -1], alone) - batched[i]).abs().max() < 1e-5


def test_bad_inputs_are_refused(tiny_model):
    with pytest.raises(ValueError):
        tiny_model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError):
        tiny_model.prefill(torch.zeros(2, 4, dtype=torch.long), lengths=torch.tensor([4, 5]))
    with pytest.raises(ValueError):
        tiny_model.prefill(torch.zeros(2, 4, dtype=torch.long), state=tiny_model.allocate_state(3))


def test_vocab_padding_like_mamba_ssm():
    cfg = MambaConfig(d_model=16, n_layer=1, vocab_size=50277)
    assert cfg.padded_vocab_size == 50280
    model = MambaLMHeadModel(MambaConfig(d_model=8, n_layer=1, vocab_size=13))
    assert model.backbone.embedding.weight.shape[0] == 16
    assert model.lm_head.weight is model.backbone.embedding.weight
    with torch.no_grad():
        assert model(torch.tensor([[1, 2]]))[0].shape == (1, 2, 13)


# Parity with transformers ----------------------------------------------------
transformers = pytest.importorskip("transformers")


def hf_model(tmp_path, seed=0, **overrides):
    cfg = dict(vocab_size=264, hidden_size=32, state_size=8, num_hidden_layers=3, expand=2, conv_kernel=4,
               time_step_rank=4)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(**cfg)).eval()
    off_the_init(model)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_parity_with_transformers(tmp_path, tie):
    hf = hf_model(tmp_path, tie_word_embeddings=tie)
    ours = load_model(tmp_path)
    assert ours.source_format == "hf"
    model = ours.model
    assert model.config.tie_embeddings == tie
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    forward, decode = max_logit_differences(hf, model, ids)
    assert forward < 1e-4 and decode < 1e-4
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mamba"
