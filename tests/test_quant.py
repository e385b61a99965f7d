"""Weight-only bf16 / int8 linear layers (engine/quant.py): parity, exactness, state precision, the CLI option."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.checkpoint import CheckpointError, load_model, save_checkpoint
from engine.ops import cpu_fused
from engine.quant import MODES, QuantizedLinear, QuantizedWeight, quantize_model, quantize_weight
from loadtest.quant_quality import greedy
from tests.conftest import make_model

DEFAULT = Path(__file__).resolve().parents[1] / "checkpoints" / "default"


def bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_k |x_k| |w_jk|: the scale of each output's rounding error."""
    return x.abs() @ w.abs().T


def activation_steps(x: torch.Tensor) -> torch.Tensor:
    """Per column, the step the int8 decode kernel rounds x to: max|x| / 32767 over its block of 64 columns
    (int16 activations; zero in the tail under a whole block, which runs in float32)."""
    k = x.shape[1] - x.shape[1] % cpu_fused.INT8_BLOCK
    steps = torch.zeros_like(x)
    if k:
        blocks = (x[:, :k].abs().reshape(x.shape[0], -1, cpu_fused.INT8_BLOCK).amax(-1, keepdim=True)
                  / cpu_fused.INT8_ACTIVATION_MAX)
        steps[:, :k] = blocks.expand(-1, -1, cpu_fused.INT8_BLOCK).reshape(x.shape[0], k)
    return steps


@pytest.mark.parametrize("shape", [(96, 64), (264, 256), (512, 16), (48, 512), (40, 24), (7, 2), (80, 1536)])
@pytest.mark.parametrize("rows", [1, 3, 32, 33])
def test_int8_linear_within_half_a_step_per_weight(shape, rows):
    """|y_q - y| <= sum_k |x_k| * scale_j / 2 (each weight rounds to its nearest step), plus the activation's
    rounding: to int16 per block of 64 in the decode kernel (half its step per column, times |w| and the
    weight's half step), to bf16 elsewhere (2^-9 relative; 2^-7 of the error scale allowed, which also covers
    float32 summation)."""
    torch.manual_seed(0)
    w, x = torch.randn(shape), torch.randn(rows, shape[1])
    q = quantize_weight(w, "int8")
    scale = w.abs().amax(1) / 127
    steps = activation_steps(x)
    allowed = (x.abs().sum(1, keepdim=True) * scale / 2 + steps @ (w.abs().T + scale / 2) / 2
               + 2**-7 * bound(x, w))
    assert ((F.linear(x, q) - F.linear(x, w)).abs() <= allowed).all()


@pytest.mark.skipif(not cpu_fused.int8_activations(), reason="the library's int8 GEMV widens weights here (no VNNI)")
@pytest.mark.parametrize("k", [64, 768, 100])
def test_int8_decode_kernel_is_the_block_quantized_arithmetic(k):
    """The VNNI kernel computes scale_j * (sum over blocks of s_b * sum q_x q_w + tail in float32), with q_x =
    round(x / s_b), s_b = max|x| / 32767 per block of 64 (int16 activations): a float64 rendering of that
    agrees to float32 rounding, so no error beyond the documented quantization hides in the kernel."""
    torch.manual_seed(k)
    w, x = torch.randn(40, k), torch.randn(3, k) * torch.logspace(-2, 1, k)  # blocks of very different scales
    q = quantize_weight(w, "int8")
    n = k - k % cpu_fused.INT8_BLOCK
    amax = x[:, :n].abs().reshape(3, -1, cpu_fused.INT8_BLOCK).amax(-1, keepdim=True)  # float32, as the kernel
    qx = torch.round(x[:, :n].reshape(3, -1, cpu_fused.INT8_BLOCK) * (cpu_fused.INT8_ACTIVATION_MAX / amax))
    xq = torch.cat([(qx.double() * (amax / cpu_fused.INT8_ACTIVATION_MAX).double()).reshape(3, n),
                    x[:, n:].double()], 1)
    expected = (xq @ q.data_q.double().T) * q.scales.double()
    magnitude = (xq.abs() @ q.data_q.double().abs().T) * q.scales.double()
    got = cpu_fused.linear(x, q.data_q, q.scales, None)
    assert got is not None
    assert ((got.double() - expected).abs() <= 1e-6 * magnitude).all()  # float32 sums of exact block products


@pytest.mark.parametrize("shape", [(96, 64), (264, 256), (48, 512)])
def test_bf16_linear_within_bf16_rounding(shape):
    """Weights and activation rounded to bf16 (2^-9 relative each), output rounded once more: <= 2^-7 of the bound."""
    torch.manual_seed(0)
    w, x = torch.randn(shape), torch.randn(5, shape[1])
    err = (F.linear(x, quantize_weight(w, "bf16")) - F.linear(x, w)).abs()
    assert (err <= 2**-7 * bound(x, w)).all()
    assert err.max() > 0  # it really runs in bf16


@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_exact_where_the_weights_are_representable(kind):
    """Weights on the quantization grid give the float32 result bit for bit, the identity passes its input through.

    Integer weights with a row maximum of 127 are int8 at scale 1 and exact in bf16; the inputs pick single
    columns or small sums, so every output has at most 8 significant bits (the matmul's bf16 output is exact).
    """
    torch.manual_seed(0)
    w = torch.randint(-127, 128, (40, 24)).float()
    w[:, 0] = 127.0
    x = torch.cat([torch.eye(24)[:6], -torch.eye(24)[6:12], torch.eye(24)[12:14] * 2])
    q = quantize_weight(w, kind)
    assert torch.equal(q.dequantize(), w)
    assert torch.equal(F.linear(x, q), F.linear(x, w))
    small = torch.randint(-1, 2, (5, 24)).float()
    eye = quantize_weight(torch.eye(24) * 127, kind)
    assert torch.equal(F.linear(small, eye), 127 * small)
    assert torch.equal(F.linear(small.repeat(8, 1), eye), 127 * small.repeat(8, 1))  # the many-rows path too


def test_int8_round_trip_error_is_at_most_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(64, 80) * torch.logspace(-3, 1, 64).unsqueeze(1)  # rows of very different scales
    q = quantize_weight(w, "int8")
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((q.dequantize() - w).abs() <= step / 2 * (1 + 1e-5)).all()
    assert q.data_q.dtype == torch.int8 and q.scales.shape == (64,)
    zero = quantize_weight(torch.zeros(3, 8), "int8")
    assert torch.equal(zero.dequantize(), torch.zeros(3, 8))


def test_module_swap_keeps_state_scan_and_embedding_float32():
    model = quantize_model(make_model(seed=3, d_model=64, n_layer=2), "int8")
    for layer in model.backbone.layers:
        mixer = layer.mixer
        for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
            assert isinstance(getattr(mixer, name), QuantizedLinear)
            assert isinstance(getattr(mixer, name).weight, QuantizedWeight)
        assert mixer.A_log.dtype == mixer.D.dtype == mixer.conv1d.weight.dtype == torch.float32
    assert isinstance(model.lm_head, QuantizedLinear)
    assert model.backbone.embedding.weight.dtype == torch.float32
    with torch.inference_mode():
        logits, state = model.prefill(torch.randint(0, 261, (2, 9)))
        assert state.conv.dtype == state.ssm.dtype == logits.dtype == torch.float32
        assert model.step(logits.argmax(-1), state).dtype == torch.float32
        assert state.conv.dtype == state.ssm.dtype == torch.float32
        assert model.allocate_state(1).conv.dtype == torch.float32


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_quantized_prefill_and_step_match_their_own_forward(kind):
    """Three paths (forward, prefill, step) reach the same quantized kernels: they agree with each other."""
    model = quantize_model(make_model(seed=4, d_model=64, n_layer=2), kind)
    ids = torch.randint(0, 261, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full, _ = model(ids)
        _, state = model.prefill(ids[:, :6])
        stepped = [model.step(ids[:, t], state) for t in range(6, 12)]
    assert torch.allclose(torch.stack(stepped, 1), full[:, 6:], atol=2e-3, rtol=2e-3)


def test_padded_vocabulary_head_slices_stay_quantized():
    model = quantize_model(make_model(seed=5, vocab_size=250), "int8")  # padded to 256 rows
    assert model.lm_head.weight.shape[0] == 256
    with torch.inference_mode():
        logits, _ = model.prefill(torch.randint(0, 250, (1, 5)))
    assert logits.shape == (1, 250)


@pytest.mark.parametrize("kind, threshold", [("bf16", 0.8), ("int8", 0.8)])
def test_default_model_greedy_agreement_with_float32(kind, threshold):
    """The trained default model: 16 prompts x 48 greedy tokens, free-running; most positions identical."""
    text = b"def greet(name):\n    return 'Hello, ' + name\n\nThe :mod:`os` module provides a portable way "
    prompts = torch.tensor([list(text[i : i + 24]) for i in range(0, 64, 4)])
    with torch.inference_mode():
        reference = greedy(load_model(DEFAULT).model, prompts, 48)
        tokens = greedy(load_model(DEFAULT, quantize=kind).model, prompts, 48)
    assert (tokens == reference).float().mean().item() >= threshold
    assert (tokens[:, 0] == reference[:, 0]).all()  # the first token, right after the same prompt


def test_load_model_refuses_unknown_modes_and_non_float32(tmp_path):
    folder = save_checkpoint(make_model(), tmp_path / "m")
    with pytest.raises(CheckpointError, match="quantize must be one of none, bf16, int8, not 'int4'"):
        load_model(folder, quantize="int4")
    with pytest.raises(CheckpointError, match="dtype float32"):
        load_model(folder, dtype="bfloat16", quantize="int8")
    assert isinstance(load_model(folder, quantize="int8").model.lm_head, QuantizedLinear)


def test_cli_quantize_bad_value_is_a_clear_error(capsys, tmp_path):
    from server.cli import QUANTIZE_MODES, main

    assert QUANTIZE_MODES == MODES
    folder = save_checkpoint(make_model(), tmp_path / "m")
    assert main(["--checkpoint", str(folder), "--quantize", "int4", "--planner-workers", "0"]) == 2
    assert "--quantize must be none, bf16 or int8, not 'int4'" in capsys.readouterr().err
    assert main(["--checkpoint", str(folder), "--quantize", "int8", "--dtype", "bfloat16"]) == 2
    assert "float32" in capsys.readouterr().err


def test_int8_refuses_non_finite_weights_instead_of_rounding_them_to_finite_garbage():
    from engine.quant import quantize_weight

    for bad in (float("nan"), float("inf")):
        weight = torch.randn(8, 32)
        weight[3, 5] = bad
        with pytest.raises(ValueError, match="finite"):
            quantize_weight(weight, "int8")
    assert quantize_weight(torch.zeros(8, 32), "int8").scales.eq(1).all()  # an all-zero layer is fine
