"""The fused CPU kernels (engine/ops/cpu_fused.py, engine/modules/fused_decode.py) against the eager path.

Parity at 1e-4 for the prefill scan and the whole-model decode step, greedy
tokens on the default checkpoint, parity with transformers while the fused
path runs, every fallback (switch, no compiler, failed build, swapped
layers, autograd), and that the server picks the fused path by default.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from engine import ops
from engine.checkpoint import load_model
from engine.ops import cpu_fused
from engine.ops.selective_scan import LOG2E
from loadtest.process import stop
from tests.conftest import make_model

ROOT = Path(__file__).resolve().parents[1]
HAVE_CXX = shutil.which(os.environ.get("CXX", "g++")) is not None
needs_cxx = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler: only the fallback can be tested")


@pytest.fixture(autouse=True)
def fresh_kernel_state():
    """Each test reads CRSM_KERNELS and the cache dir anew, and leaves no loaded state behind."""
    cpu_fused.reset()
    yield
    cpu_fused.reset()


def set_mode(monkeypatch, mode: str) -> None:
    monkeypatch.setenv(cpu_fused.ENV_SWITCH, mode)
    cpu_fused.reset()


def scan_inputs(b: int, L: int, D: int, N: int, seed: int, with_state: bool):
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(b, L, 2 * D, generator=g)
    x, z = xz[..., :D], xz[..., D:]  # strided views, as the mixer's chunk gives them
    dt = torch.nn.functional.softplus(torch.randn(b, L, D, generator=g) - 1.0)
    if b > 1:
        dt[0, L // 2 :] = 0  # a right-padded row: its tail is identity steps
    A = -torch.exp(torch.randn(D, N, generator=g) * 0.5)
    BC = torch.randn(b, L, 4 + 2 * N, generator=g)
    B, C = BC[..., 4 : 4 + N], BC[..., 4 + N :]
    Dskip = torch.randn(D, generator=g)
    h0 = torch.randn(b, D, N, generator=g) if with_state else None
    return x, dt, A, B, C, Dskip, z, h0


def both_paths(monkeypatch, fn):
    """fn() under CRSM_KERNELS=fused and under eager; asserts the fused run really used the library."""
    set_mode(monkeypatch, "fused")
    assert cpu_fused.status().path == "fused", cpu_fused.status()
    fused = fn()
    set_mode(monkeypatch, "eager")
    eager = fn()
    return fused, eager


# Prefill scan --------------------------------------------------------------------
@needs_cxx
@pytest.mark.parametrize("L", [1, 15, 16, 17, 63, 64, 65, 300])
@pytest.mark.parametrize("b,with_state", [(1, False), (3, True), (2, False)])
@pytest.mark.parametrize("D,N", [(40, 8), (32, 16)])
def test_scan_matches_eager(monkeypatch, L, b, with_state, D, N):
    """Chunk boundaries of the eager scan (sqrt(L)), a channel tail beyond the 16-lane blocks, padding, h0."""
    inputs = scan_inputs(b, L, D, N, seed=L * 7 + b, with_state=with_state)
    with torch.inference_mode():
        (out_f, h_f), (out_e, h_e) = both_paths(monkeypatch, lambda: ops.ssm_scan(*inputs))
    torch.testing.assert_close(out_f, out_e, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h_f, h_e, atol=1e-4, rtol=1e-4)
    if with_state:
        assert not torch.equal(h_f, inputs[-1])  # the start state was read, not written


@needs_cxx
def test_scan_does_not_touch_start_state(monkeypatch):
    x, dt, A, B, C, Dskip, z, h0 = scan_inputs(2, 20, 32, 16, seed=3, with_state=True)
    before = h0.clone()
    set_mode(monkeypatch, "fused")
    with torch.inference_mode():
        assert cpu_fused.selective_scan(x, dt, A * LOG2E, B, C, Dskip, z, h0) is not None
    assert torch.equal(h0, before)


def test_scan_under_autograd_stays_eager(monkeypatch):
    """Training needs gradients: tensors that require grad never reach the library."""
    set_mode(monkeypatch, "fused")
    x, dt, A, B, C, Dskip, z, h0 = scan_inputs(1, 10, 32, 16, seed=1, with_state=False)
    x = x.clone().requires_grad_(True)
    assert cpu_fused.selective_scan(x, dt, A * LOG2E, B, C, Dskip, z, h0) is None
    out, _ = ops.ssm_scan(x, dt, A, B, C, Dskip, z, h0)
    out.sum().backward()
    assert x.grad is not None


@needs_cxx
@pytest.mark.parametrize("L", [1, 3, 17, 70])
@pytest.mark.parametrize("D,K", [(40, 4), (32, 2), (5, 3)])
@pytest.mark.parametrize("with_state", [False, True])
def test_prefill_conv_matches_eager(monkeypatch, L, D, K, with_state):
    """The fused causal conv (one pass, window in registers) against the eager shifted multiply-adds, from a
    carried state or zeros, on the strided x the mixer's chunk gives; the new state from padded rows too."""
    g = torch.Generator().manual_seed(L * D + K)
    xz = torch.randn(3, L, 2 * D, generator=g)
    x = xz[..., :D]
    weight, bias = torch.randn(D, K, generator=g), torch.randn(D, generator=g)
    state = torch.randn(3, D, K, generator=g) if with_state else None
    lengths = torch.tensor([L, max(L - 1, 0), min(L, 2)])
    (out_f, new_f), (out_e, new_e) = both_paths(monkeypatch, lambda: ops.conv(x, weight, bias, state, lengths))
    torch.testing.assert_close(out_f, out_e, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_f, new_e, atol=0, rtol=0)


def test_next_state_is_last_window_without_the_window():
    from engine.ops.causal_conv1d import last_window, next_state, time_window

    g = torch.Generator().manual_seed(3)
    for L in (0, 1, 2, 3, 4, 9):
        x = torch.randn(4, L, 6, generator=g)
        for state in (None, torch.randn(4, 6, 4, generator=g)):
            lengths = torch.tensor([L, max(L - 1, 0), min(L, 1), 0])
            for lens in (None, lengths):
                expected = last_window(time_window(x, state, 4), lens, 4)
                assert torch.equal(next_state(x, state, lens, 4), expected), (L, state is None, lens)


@needs_cxx
def test_scan_applies_softplus_and_padding_itself(monkeypatch):
    """dt before its softplus plus lengths, into the fused scan, equals softplus and masking done first."""
    set_mode(monkeypatch, "fused")
    x, _, A, B, C, Dskip, z, h0 = scan_inputs(3, 40, 48, 16, seed=4, with_state=True)
    raw = torch.randn(3, 40, 48, generator=torch.Generator().manual_seed(5)) * 3
    lengths = torch.tensor([40, 23, 1])
    out_f, h_f = ops.ssm_scan(x, raw, A, B, C, Dskip, z, h0, dt_softplus=True, lengths=lengths)
    valid = (torch.arange(40) < lengths.unsqueeze(1)).unsqueeze(-1)
    set_mode(monkeypatch, "eager")
    out_e, h_e = ops.ssm_scan(x, torch.nn.functional.softplus(raw) * valid, A, B, C, Dskip, z, h0)
    torch.testing.assert_close(out_f, out_e, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h_f, h_e, atol=1e-4, rtol=1e-4)


# Whole model: prefill and decode ---------------------------------------------------
def session(model, ids, lengths, split, steps, state_rows=None):
    """Prefill in two parts (the second from a state, right-padded), then ``steps`` greedy decode steps.

    With ``state_rows``, decode runs on the first rows of a larger state
    buffer, as the engine's decode batch does.
    """
    with torch.inference_mode():
        _, state = model.prefill(ids[:, :split])
        logits, state = model.prefill(ids[:, split:], lengths=lengths - split, state=state)
        if state_rows:
            buf = model.allocate_state(state_rows)
            buf.conv[:, : ids.shape[0]] = state.conv
            buf.ssm[:, : ids.shape[0]] = state.ssm
            state = type(state)(buf.conv[:, : ids.shape[0]], buf.ssm[:, : ids.shape[0]])
        outs, tok = [logits], logits.argmax(-1)
        for _ in range(steps):
            logits = model.step(tok, state)
            outs.append(logits)
            tok = logits.argmax(-1)
    return torch.stack(outs), state.conv.clone(), state.ssm.clone()


@needs_cxx
@pytest.mark.parametrize(
    "b,overrides,state_rows",
    [
        (1, {}, None),
        (3, {}, 5),
        (2, {"rms_norm": False, "bias": True, "d_model": 48, "d_state": 16}, None),
        (4, {"d_model": 64, "n_layer": 3, "d_state": 16}, 4),
        (7, {"bias": True, "d_model": 40}, 9),  # from 6 rows: the broadcast GEMM (8-wide, row tails)
        (13, {"d_model": 48}, None),  # 16-wide
        (32, {"rms_norm": False}, None),  # two 16-wide vectors
        # Mamba-2 (crsm_decode_layers2, crsm_ssd_step): groups, a conv width off the 16-lane grid, a dt limit,
        # the norm before the gate, the broadcast GEMM's widths.
        (1, {"layer": "Mamba2", "headdim": 16, "ngroups": 2, "chunk_size": 16}, None),
        (3, {"layer": "Mamba2", "headdim": 8, "ngroups": 4, "d_state": 12, "bias": True}, 5),
        (7, {"layer": "Mamba2", "headdim": 16, "dt_limit": (0.01, 0.3), "rms_norm": False}, 9),
        (13, {"layer": "Mamba2", "headdim": 32, "norm_before_gate": True, "d_state": 16}, None),
        (32, {"layer": "Mamba2", "headdim": 16, "ngroups": 2, "d_state": 16}, None),
    ],
)
def test_model_prefill_and_decode_match_eager(monkeypatch, b, overrides, state_rows):
    model = make_model(seed=b, **overrides)
    L = 70
    ids = torch.randint(0, 256, (b, L), generator=torch.Generator().manual_seed(b))
    lengths = torch.tensor([L - 13 * (i % 4) for i in range(b)])
    fused, eager = both_paths(monkeypatch, lambda: session(model, ids, lengths, split=17, steps=64,
                                                           state_rows=state_rows))
    for f, e in zip(fused, eager):
        torch.testing.assert_close(f, e, atol=1e-4, rtol=1e-4)


@needs_cxx
@pytest.mark.parametrize("m,k", [(1, 7), (13, 48), (50, 100), (80, 64)])
def test_float_linear_matches_float64_for_every_row_count(m, k):
    """crsm_linear's two forms (dot-product tiles up to 5 rows, broadcast GEMM from 6: 8-, 16- and 32-wide) and
    their tails of rows and columns agree with a float64 product to float32 summation error."""
    g = torch.Generator().manual_seed(m * k)
    w, bias = torch.randn(m, k, generator=g), torch.randn(m, generator=g)
    for rows in range(1, cpu_fused.LINEAR_MAX_ROWS + 1):
        x = torch.randn(rows, k, generator=g)
        for b in (None, bias):
            got = cpu_fused.linear(x, w, None, b)
            assert got is not None
            expected = x.double() @ w.double().T + (0 if b is None else b.double())
            magnitude = x.double().abs() @ w.double().abs().T + 1
            assert ((got.double() - expected).abs() <= 1e-6 * k * magnitude).all(), (rows, b is None)


@needs_cxx
@pytest.mark.parametrize("overrides", [{}, {"layer": "Mamba2", "headdim": 16, "ngroups": 2}])
def test_fused_decode_runs_inside_model_step(monkeypatch, overrides):
    """The step really takes the fused path (not silently eager) for a fp32 CPU model in inference."""
    set_mode(monkeypatch, "fused")
    model = make_model(seed=2, **overrides)
    state = model.allocate_state(2)
    with torch.inference_mode():
        emb = model.backbone.embedding(torch.tensor([3, 4]))
        assert model.fused_decode.hidden(model, emb, state.conv, state.ssm) is not None


@needs_cxx
def test_default_checkpoint_greedy_tokens_identical(monkeypatch):
    model = load_model(ROOT / "checkpoints" / "default").model.eval()
    prompt = torch.tensor([list(b"def fibonacci(n):\n    ")])

    def greedy():
        with torch.inference_mode():
            logits, state = model.prefill(prompt)
            out = []
            for _ in range(64):
                tok = logits.argmax(-1)
                out.append(int(tok))
                logits = model.step(tok, state)
        return out

    fused, eager = both_paths(monkeypatch, greedy)
    assert fused == eager


@needs_cxx
def test_parity_with_transformers_on_fused_path(monkeypatch, tmp_path):
    from tests.test_model import hf_model

    set_mode(monkeypatch, "fused")
    hf = hf_model(tmp_path, hidden_size=48, state_size=16)
    model = load_model(tmp_path).model
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gen = hf.generate(ids[:, :24], max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
        logits, state = model.prefill(ids[:, :24])
        assert model.fused_decode.hidden(model, model.backbone.embedding(ids[:, 0]), state.conv.clone(),
                                         state.ssm.clone()) is not None
        steps = [logits]
        for t in range(23):
            steps.append(model.step(gen.sequences[:, 24 + t], state))
    assert (torch.stack(steps, 1) - torch.stack(gen.logits, 1)).abs().max() < 1e-4


# Fallbacks ---------------------------------------------------------------------------
def test_switch_to_eager_gives_the_eager_path(monkeypatch):
    set_mode(monkeypatch, "eager")
    assert cpu_fused.library() is None
    assert cpu_fused.status().path == "eager" and "CRSM_KERNELS=eager" in cpu_fused.status().reason
    x, dt, A, B, C, Dskip, z, h0 = scan_inputs(1, 9, 32, 16, seed=0, with_state=False)
    assert cpu_fused.selective_scan(x, dt, A * LOG2E, B, C, Dskip, z, h0) is None
    model = make_model(seed=1)
    state = model.allocate_state(1)
    with torch.inference_mode():
        assert model.fused_decode.hidden(model, model.backbone.embedding(torch.tensor([1])), state.conv,
                                         state.ssm) is None


@pytest.mark.parametrize("cxx,reason", [("/nonexistent/g++", "no C++ compiler"), ("/bin/false", "build/load failed")])
def test_no_compiler_or_failed_build_falls_back(monkeypatch, tmp_path, cxx, reason):
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv(cpu_fused.ENV_CACHE, str(tmp_path))
    set_mode(monkeypatch, "fused")
    assert cpu_fused.library() is None
    assert reason in cpu_fused.status().reason
    model = make_model(seed=6)
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(6))
    outs, _, _ = session(model, ids, torch.tensor([30, 22]), split=10, steps=4)  # still serves, eagerly
    assert torch.isfinite(outs).all()


@needs_cxx
def test_swapped_projection_falls_back_to_eager(monkeypatch):
    """engine/quant.py swaps nn.Linear modules in place: a layer that is not a plain fp32 Linear runs eagerly."""

    class Wrapped(torch.nn.Module):  # same arithmetic, not an nn.Linear: stands in for a quantized layer
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    set_mode(monkeypatch, "fused")
    model = make_model(seed=8)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(8))
    before = session(model, ids, torch.tensor([20]), split=5, steps=8)
    mixer = model.backbone.layers[1].mixer
    mixer.out_proj = Wrapped(mixer.out_proj)
    mixer.out_proj.weight = mixer.out_proj.inner.weight  # what the eager step reads
    mixer.out_proj.bias = mixer.out_proj.inner.bias
    state = model.allocate_state(1)
    with torch.inference_mode():
        assert model.fused_decode.hidden(model, model.backbone.embedding(torch.tensor([1])), state.conv,
                                         state.ssm) is None
    after = session(model, ids, torch.tensor([20]), split=5, steps=8)
    for f, e in zip(before, after):
        torch.testing.assert_close(f, e, atol=1e-4, rtol=1e-4)


@needs_cxx
def test_library_builds_into_cache_then_reuses_it(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu_fused.ENV_CACHE, str(tmp_path))
    set_mode(monkeypatch, "fused")
    first = cpu_fused.status()
    assert first.path == "fused" and first.reason == "built" and first.build_seconds > 0
    assert Path(first.library).parent == tmp_path and Path(first.library).exists()
    cpu_fused.reset()
    again = cpu_fused.status()
    assert again.reason == "cached build" and again.build_seconds == 0 and again.library == first.library


# What `make serve` runs ---------------------------------------------------------------
def kernel_log_line(env: dict, timeout: float = 120.0) -> str:
    """Start ``python -m server`` (make serve's command, default checkpoint) under ``env``; its 'CPU kernels' line."""
    from tests.serving import free_port

    cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(free_port()), "--log-level", "info",
           "--threads", "1", "--planner-workers", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put(None)], daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if "CPU kernels:" in line:
                return line
        pytest.fail(f"no 'CPU kernels:' log line within {timeout:.0f}s (server exit code {proc.poll()})")
    finally:
        stop(proc, timeout=20)


@needs_cxx
def test_serve_default_picks_fused_path():
    env = {k: v for k, v in os.environ.items() if k != cpu_fused.ENV_SWITCH}  # unset, as `make serve` runs
    line = kernel_log_line(env)
    assert "CPU kernels: fused" in line, line


def test_serve_switch_off_logs_eager():
    line = kernel_log_line({**os.environ, cpu_fused.ENV_SWITCH: "eager"})
    assert "CPU kernels: eager (CRSM_KERNELS=eager)" in line, line


def test_fused_decode_batches_and_threads():
    """Every batch up to max_batch goes fused (130M at batch 1 too); steps too small to split run on 1 thread."""
    from engine.config import MambaConfig
    from engine.modules.fused_decode import FusedDecode

    fused, small, big = FusedDecode(max_batch=32), MambaConfig(), MambaConfig(d_model=768, n_layer=24)
    tiny = MambaConfig(d_model=32, n_layer=2)
    assert fused.wins(1, small) and fused.wins(8, small) and fused.wins(32, small)
    assert not fused.wins(33, small)
    assert fused.wins(1, big) and fused.wins(8, big) and fused.wins(32, big)
    assert fused.threads_for(1, tiny) == 1
    assert fused.threads_for(1, small) == fused.threads_for(32, big) == torch.get_num_threads()


@needs_cxx
@pytest.mark.parametrize("kind", ["int8", "bf16"])
@pytest.mark.parametrize("b", [1, 5])
def test_fused_decode_with_quantized_weights_matches_the_eager_quantized_step(monkeypatch, kind, b):
    """engine/quant.py's int8 / bf16 layers run inside the fused step, reading the same low-precision weights
    with the same GEMV arithmetic the eager step uses per projection: the two agree at 1e-4."""
    from engine.quant import quantize_model

    set_mode(monkeypatch, "fused")
    model = quantize_model(make_model(seed=11, d_model=64, n_layer=2, d_state=16), kind)
    ids = torch.randint(0, 256, (b, 30), generator=torch.Generator().manual_seed(b))
    lengths = torch.full((b,), 30)
    with torch.inference_mode():
        _, state = model.prefill(ids)
        assert model.fused_decode.hidden(model, model.backbone.embedding(ids[:, 0]), state.conv.clone(),
                                         state.ssm.clone()) is not None  # the quantized model is fused-eligible
    fused = session(model, ids, lengths, split=10, steps=24)
    monkeypatch.setattr(model.fused_decode, "wins", lambda batch, cfg: False)  # per-projection eager step
    eager = session(model, ids, lengths, split=10, steps=24)
    for f, e in zip(fused, eager):
        torch.testing.assert_close(f, e, atol=1e-4, rtol=1e-4)


@needs_cxx
def test_packed_pointers_follow_swaps_and_in_place_edits(monkeypatch):
    """The fused step caches its pointer table: quantizing the model in place after fused steps, and an
    in-place edit of A_log (training), are both seen by the next step."""
    from engine.quant import quantize_model

    set_mode(monkeypatch, "fused")
    model = make_model(seed=12, d_model=64, n_layer=2, d_state=16)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(12))
    session(model, ids, torch.tensor([20]), split=5, steps=3)  # packs float32 pointers
    with torch.no_grad():
        model.backbone.layers[1].mixer.A_log.mul_(0.5)
    edited = session(model, ids, torch.tensor([20]), split=5, steps=6)
    monkeypatch.setattr(model.fused_decode, "wins", lambda batch, cfg: False)
    edited_eager = session(model, ids, torch.tensor([20]), split=5, steps=6)
    for f, e in zip(edited, edited_eager):
        torch.testing.assert_close(f, e, atol=1e-4, rtol=1e-4)
    monkeypatch.undo()
    set_mode(monkeypatch, "fused")
    quantize_model(model, "int8")
    quantized = session(model, ids, torch.tensor([20]), split=5, steps=6)
    monkeypatch.setattr(model.fused_decode, "wins", lambda batch, cfg: False)
    quantized_eager = session(model, ids, torch.tensor([20]), split=5, steps=6)
    for f, e in zip(quantized, quantized_eager):
        torch.testing.assert_close(f, e, atol=1e-4, rtol=1e-4)
    assert model.fused_decode._kind == cpu_fused.WEIGHT_KINDS[torch.int8]  # the table was repacked with int8


@needs_cxx
def test_packed_table_sees_a_stack_conversion_and_keeps_old_storage_alive(monkeypatch):
    """``layers.double().float()`` replaces every weight's storage without a registration hook: the sentinel
    pointers see it and the step repacks (it read freed memory before); the table holds its tensors' storage."""
    set_mode(monkeypatch, "fused")
    model = make_model(seed=13, d_model=64, n_layer=2, d_state=16)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(13))
    before = session(model, ids, torch.tensor([20]), split=5, steps=4)
    packed = model.fused_decode._array
    old_ptr = model.backbone.layers[0].mixer.in_proj.weight.data_ptr()
    held = {t.data_ptr() for t in model.fused_decode._held}
    assert old_ptr in held
    model.backbone.layers.double().float()  # on a submodule: MambaLMHeadModel._apply does not run
    assert model.backbone.layers[0].mixer.in_proj.weight.data_ptr() != old_ptr
    after = session(model, ids, torch.tensor([20]), split=5, steps=4)
    assert model.fused_decode._array is not packed  # repacked, not the old pointers
    for f, e in zip(before, after):
        torch.testing.assert_close(f, e, atol=1e-5, rtol=1e-5)


@needs_cxx
def test_scan_refuses_mismatched_shapes_instead_of_reading_past_them(monkeypatch):
    set_mode(monkeypatch, "fused")
    x, dt, A, B, C, Dskip, z, h0 = scan_inputs(3, 20, 32, 16, seed=7, with_state=True)
    A2 = A * LOG2E
    assert cpu_fused.selective_scan(x, dt, A2, B, C, Dskip, z, h0) is not None
    assert cpu_fused.selective_scan(x, dt, A2, B, C, Dskip, z, h0[:1]) is None  # one state row for three
    assert cpu_fused.selective_scan(x, dt, A2, B, C, Dskip, z, h0, lengths=torch.tensor([20])) is None
    assert cpu_fused.selective_scan(x, dt[:, :10], A2, B, C, Dskip, z, h0) is None


def test_a_state_wider_than_the_kernel_falls_back_to_eager():
    """d_state above the compiled bound (64): decode runs eagerly instead of raising (it raised on every step)."""
    model = make_model(seed=0, d_state=80).eval()
    with torch.inference_mode():
        logits, state = model.prefill(torch.tensor([[1, 2, 3]]))
        assert model.fused_decode.hidden(model, model.backbone.embedding(logits.argmax(-1)), state.conv,
                                         state.ssm) is None
        assert model.step(logits.argmax(-1), state).shape == (1, model.config.vocab_size)
