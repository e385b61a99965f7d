"""The chunked scan and the kernel dispatch against plain step-by-step references."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from engine.ops import kernels
from engine.ops.selective_scan import initial_state_contribution, selective_scan
from tests.conftest import make_model


def sequential_scan(x, dt, A, B, C, h0):
    h = h0.clone()
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    return torch.stack(ys, 1), h


def random_scan_inputs(b, L, D, N, seed, big_dt=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, D, generator=g)
    dt = F.softplus(torch.randn(b, L, D, generator=g) * (3.0 if big_dt else 1.0) - 2)
    A = -torch.exp(torch.randn(D, N, generator=g))
    B = torch.randn(b, L, N, generator=g)
    C = torch.randn(b, L, N, generator=g)
    h0 = torch.randn(b, D, N, generator=g)
    return x, dt, A, B, C, h0


@given(
    L=st.integers(1, 130),
    chunk=st.one_of(st.none(), st.integers(1, 40)),
    seed=st.integers(0, 1000),
    big_dt=st.booleans(),
)
def test_chunked_scan_equals_sequential(L, chunk, seed, big_dt):
    x, dt, A, B, C, h0 = random_scan_inputs(2, L, 6, 4, seed, big_dt)
    y, h = selective_scan(x, dt, A, B, C, h0, chunk_len=chunk)
    y_ref, h_ref = sequential_scan(x, dt, A, B, C, h0)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h, h_ref, atol=1e-4, rtol=1e-4)


def test_zero_dt_steps_are_identity():
    x, dt, A, B, C, h0 = random_scan_inputs(1, 20, 5, 3, 0)
    dt[:, 7:] = 0
    _, h_all = selective_scan(x, dt, A, B, C, h0)
    _, h_7 = selective_scan(x[:, :7], dt[:, :7], A, B[:, :7], C[:, :7], h0)
    torch.testing.assert_close(h_all, h_7)


def test_initial_state_contribution_is_linear_part():
    x, dt, A, B, C, h0 = random_scan_inputs(2, 33, 5, 4, 3)
    y0, hz = selective_scan(x, dt, A, B, C, None)
    y_extra, h_extra = initial_state_contribution(dt, A, C, h0, block=8)
    y, h = selective_scan(x, dt, A, B, C, h0)
    torch.testing.assert_close(y0 + y_extra, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hz + h_extra, h, atol=1e-5, rtol=1e-5)


# Reference implementations of the mamba-ssm / causal-conv1d kernel APIs, so the
# glue code that calls them (layouts, zero-start scan + start-state correction,
# in-place state updates) runs on CPU in CI.
def ref_selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    assert not delta_softplus and delta_bias is None
    y, h = sequential_scan(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                           torch.zeros(u.shape[0], u.shape[1], A.shape[1]))
    out = (y.transpose(1, 2) + u * D[:, None]) * F.silu(z)
    return (out, h) if return_last_state else out


def ref_selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    assert not dt_softplus and dt_bias is None
    if state.dim() == 4:  # Mamba-2's multi-head form: state (b, h, p, n), B/C (b, g, n), dt (b, h, p), A (h, p, n)
        per_group = state.shape[1] // B.shape[1]
        B, C = (t.repeat_interleave(per_group, dim=1).unsqueeze(2) for t in (B, C))  # (b, h, 1, n)
        state.copy_(state * torch.exp(dt[..., None] * A) + (dt * x)[..., None] * B)
        out = (state * C).sum(-1) + x * D
        return out if z is None else out * F.silu(z)
    state.copy_(state * torch.exp(dt[..., None] * A) + (dt * x)[..., None] * B[:, None, :])
    return (torch.einsum("bdn,bn->bd", state, C) + x * D) * F.silu(z)


def ref_mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                                  dt_softplus=False, return_final_states=False):
    """mamba-ssm's SSD prefill, as a plain recurrence over time: x (b, l, h, p), dt (b, l, h), B/C (b, l, g, n)."""
    assert not dt_softplus and dt_bias is None and z is None
    b, L, H, P = x.shape
    per_group = H // B.shape[2]
    Bh, Ch = (t.repeat_interleave(per_group, dim=2) for t in (B, C))  # (b, l, h, n)
    h = torch.zeros(b, H, P, B.shape[-1]) if initial_states is None else initial_states.clone()
    ys = []
    for t in range(L):
        h = h * torch.exp(dt[:, t] * A)[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None]
        ys.append((h * Ch[:, t, :, None]).sum(-1) + x[:, t] * D[:, None])
    y = torch.stack(ys, 1)
    return (y, h) if return_final_states else y


def ref_causal_conv1d_fn(x, weight, bias=None, activation=None):
    K = weight.shape[-1]
    out = F.conv1d(F.pad(x, (K - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
    return F.silu(out) if activation == "silu" else out


def ref_causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    conv_state.copy_(torch.cat([conv_state[..., 1:], x.unsqueeze(-1)], -1))
    out = (conv_state * weight).sum(-1) + (bias if bias is not None else 0)
    return F.silu(out) if activation == "silu" else out


@pytest.fixture
def fake_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "selective_scan_fn", ref_selective_scan_fn)
    monkeypatch.setattr(kernels, "selective_state_update", ref_selective_state_update)
    monkeypatch.setattr(kernels, "causal_conv1d_fn", ref_causal_conv1d_fn)
    monkeypatch.setattr(kernels, "causal_conv1d_update", ref_causal_conv1d_update)
    monkeypatch.setattr(kernels, "mamba_chunk_scan_combined", ref_mamba_chunk_scan_combined)
    monkeypatch.setattr(kernels, "ssm_kernels_for", lambda t: True)
    monkeypatch.setattr(kernels, "ssd_kernels_for", lambda t: True)
    monkeypatch.setattr(kernels, "conv_kernels_for", lambda t: True)


def run_session(model, ids, lengths, split):
    """Prefill a prefix, prefill the rest from that state, then decode 5 tokens."""
    with torch.no_grad():
        _, state = model.prefill(ids[:, :split])
        logits, state = model.prefill(ids[:, split:], lengths=lengths - split, state=state)
        outs = [logits]
        tok = logits.argmax(-1)
        for _ in range(5):
            logits = model.step(tok, state)
            outs.append(logits)
            tok = logits.argmax(-1)
    return torch.stack(outs), state


@pytest.mark.parametrize("overrides, scan_switch", [
    ({}, "ssm_kernels_for"),
    # Mamba-2: mamba_chunk_scan_combined and the multi-head selective_state_update (their argument layouts, the
    # per-head values broadcast over headdim, the carried state)
    ({"layer": "Mamba2", "headdim": 16, "ngroups": 2, "chunk_size": 8}, "ssd_kernels_for"),
])
def test_kernel_glue_matches_pure_path(monkeypatch, fake_kernels, overrides, scan_switch):
    model = make_model(seed=4, **overrides)
    ids = torch.randint(0, 256, (2, 29), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([29, 17])
    with_kernels, st_k = run_session(model, ids, lengths, split=9)
    monkeypatch.setattr(kernels, scan_switch, lambda t: False)
    monkeypatch.setattr(kernels, "conv_kernels_for", lambda t: False)
    pure, st_p = run_session(model, ids, lengths, split=9)
    torch.testing.assert_close(with_kernels, pure, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(st_k.ssm, st_p.ssm, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(st_k.conv, st_p.conv, atol=1e-5, rtol=1e-5)


_MAMBA1_KERNELS = kernels.selective_scan_fn is not None and kernels.causal_conv1d_fn is not None
_MAMBA2_KERNELS = kernels.mamba_chunk_scan_combined is not None and kernels.causal_conv1d_fn is not None


@pytest.mark.parametrize("overrides, scan_switch", [
    pytest.param({}, "ssm_kernels_for", marks=pytest.mark.skipif(
        not (torch.cuda.is_available() and _MAMBA1_KERNELS), reason="needs CUDA with mamba-ssm and causal-conv1d")),
    # Mamba-2: mamba_chunk_scan_combined (prefill, from a carried state, padded rows) and the multi-head
    # selective_state_update, with groups and a chunk the prompt is no multiple of
    pytest.param({"layer": "Mamba2", "headdim": 16, "ngroups": 2, "chunk_size": 64}, "ssd_kernels_for",
                 marks=pytest.mark.skipif(not (torch.cuda.is_available() and _MAMBA2_KERNELS),
                                          reason="needs CUDA with mamba-ssm 2 (Triton) and causal-conv1d")),
])
def test_cuda_kernels_match_pure_path(monkeypatch, overrides, scan_switch):  # pragma: no cover - GPU only
    model = make_model(seed=5, **overrides).cuda()
    ids = torch.randint(0, 256, (2, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    lengths = torch.tensor([300, 123], device="cuda")
    with_kernels, st_k = run_session(model, ids, lengths, split=40)
    monkeypatch.setattr(kernels, scan_switch, lambda t: False)
    monkeypatch.setattr(kernels, "conv_kernels_for", lambda t: False)
    pure, st_p = run_session(model, ids, lengths, split=40)
    torch.testing.assert_close(with_kernels, pure, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(st_k.ssm, st_p.ssm, atol=1e-3, rtol=1e-3)


def test_ops_dispatch_uses_pure_path_on_cpu():
    x = torch.zeros(1, 2, 3)
    assert not kernels.ssm_kernels_for(x) and not kernels.conv_kernels_for(x)
    assert not any(kernels.describe().values())  # mamba-ssm does not import on a CPU-only machine


def test_scan_gradients_equal_sequential_gradients():
    """Training runs the out-of-place path; its gradients must be those of the recurrence."""
    inputs = random_scan_inputs(2, 23, 4, 3, 7)
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    refs = [t.clone().requires_grad_(True) for t in inputs]
    y, h = selective_scan(*leaves, chunk_len=5)
    y_ref, h_ref = sequential_scan(*refs)
    weights = torch.randn_like(y)
    ((y * weights).sum() + h.square().sum()).backward()
    ((y_ref * weights).sum() + h_ref.square().sum()).backward()
    for got, want in zip(leaves, refs):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)
