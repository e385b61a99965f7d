"""The whole-model decode step through the fused CPU library (engine/ops/cpu_fused.py).

At batch 1 a small Mamba's step is ~25 eager ops per layer, each costing a
few microseconds of dispatch for a few hundred FLOPs; one C call for every
layer removes that overhead. The model keeps its ``nn.Linear`` modules (so
engine/quant.py can swap them): the weights are read through the modules at
every step, and the fused step runs only while every projection is a plain
``nn.Linear`` holding float32 weights on the CPU. Anything else (quantized
layers, bf16, CUDA, autograd, batches above ``max_batch``, batch 1 of large
layers where eager is at the bandwidth limit) gets ``None`` and the caller
runs the eager step.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import Tensor, nn

from engine.modules.block import RMSNorm
from engine.ops import cpu_fused, kernels

# Batches up to this size take the fused step (it won at 8 and 32 in
# loadtest/bench_kernels.py); larger ones were not measured and keep eager's
# batched matmuls (MKL).
DEFAULT_MAX_BATCH = int(os.environ.get("CRSM_FUSED_DECODE_MAX_BATCH", "32"))
# A step runs on one thread at batch 1, and at larger batches below this
# many multiply-adds per layer: each layer has four barriers, and on a
# loaded machine a barrier waits for a descheduled thread. Measured on the
# shared 2-core VM at load ~15-20 (interleaved, tok/s): 130M shape at b1,
# eager 7.6-8.6, fused on 1 thread 8.5-10.4, fused on 2 threads 0.5-1.7;
# the default shape at b1 ran ~5x slower on 2 threads than on 1 at load 11.
PARALLEL_MIN_MACS = 2_000_000


def _plain_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.is_contiguous()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _layer_pointers(layer: nn.Module, norm_type: type) -> list[int | None] | None:
    """The 13 pointers the C side expects for one block, or None if the block is not fused-eligible."""
    mixer, norm = layer.mixer, layer.norm
    if not all(_plain_linear(m) for m in (mixer.in_proj, mixer.x_proj, mixer.dt_proj, mixer.out_proj)):
        return None
    if type(norm) is not norm_type or norm.weight.dtype != torch.float32:
        return None
    conv_w = mixer.conv1d.weight
    if conv_w.dtype != torch.float32 or not conv_w.is_contiguous():
        return None
    return [
        _ptr(norm.weight), _ptr(getattr(norm, "bias", None)),
        _ptr(mixer.in_proj.weight), _ptr(mixer.in_proj.bias),
        _ptr(conv_w), _ptr(mixer.conv1d.bias),
        _ptr(mixer.x_proj.weight), _ptr(mixer.dt_proj.weight), _ptr(mixer.dt_proj.bias),
        _ptr(mixer._A_for_decode()), _ptr(mixer.D),
        _ptr(mixer.out_proj.weight), _ptr(mixer.out_proj.bias),
    ]  # fmt: skip


class FusedDecode:
    """Runs :meth:`MambaLMHeadModel.step`'s layers and final norm in one C call."""

    def __init__(self, max_batch: int = DEFAULT_MAX_BATCH):
        self.max_batch = max_batch
        self._key: tuple | None = None
        self._array: ctypes.Array | None = None

    @staticmethod
    def layer_macs(b: int, cfg) -> int:
        d, di, p = cfg.d_model, cfg.d_inner, cfg.dt_rank_value + 2 * cfg.d_state
        return b * (d * 2 * di + di * p + di * cfg.dt_rank_value + di * d)

    def threads_for(self, b: int, cfg) -> int:
        return torch.get_num_threads() if b > 1 and self.layer_macs(b, cfg) >= PARALLEL_MIN_MACS else 1

    def wins(self, b: int, cfg) -> bool:
        """Batch 1 of large layers stays eager: eager's 2-thread GEMVs are at the memory-bandwidth
        limit there, and the 1-thread fused step measured 0.94x (0.69-1.63) on the 130M shape."""
        return b <= self.max_batch and not (b == 1 and self.layer_macs(b, cfg) >= PARALLEL_MIN_MACS)

    def __getstate__(self) -> dict:  # pickled/deep-copied models: the pointer array is rebuilt on use
        return {"max_batch": self.max_batch, "_key": None, "_array": None}

    def _weights(self, model: nn.Module) -> ctypes.Array | None:
        pointers: list[int | None] = []
        norm_type = type(model.backbone.norm_f)
        for layer in model.backbone.layers:
            p = _layer_pointers(layer, norm_type)
            if p is None:
                return None
            pointers.extend(p)
        key = tuple(pointers)
        if key != self._key:  # weights moved, swapped or rebuilt: repack
            self._array = (ctypes.c_void_p * len(pointers))(*pointers)
            self._key = key
        return self._array

    def hidden(self, model: nn.Module, embedded: Tensor, conv: Tensor, ssm: Tensor) -> Tensor | None:
        """final_norm(all layers(embedded)) (b, d_model), states advanced in place; None where it cannot run."""
        cfg = model.config
        b = embedded.shape[0]
        if not self.wins(b, cfg) or not cpu_fused.usable(embedded, conv, ssm, model.lm_head.weight):
            return None
        if kernels.ssm_kernels_for(embedded) or kernels.conv_kernels_for(embedded):
            return None  # mamba-ssm's kernels claim these tensors
        norm_f = model.backbone.norm_f
        if type(norm_f) not in (RMSNorm, nn.LayerNorm) or norm_f.weight.dtype != torch.float32:
            return None
        if cfg.d_state > cpu_fused.MAX_STATE or not _state_layout_ok(conv, ssm):
            return None
        expected = ((cfg.n_layer, b, cfg.d_inner, cfg.d_conv), (cfg.n_layer, b, cfg.d_inner, cfg.d_state))
        if (tuple(conv.shape), tuple(ssm.shape)) != expected or tuple(embedded.shape) != (b, cfg.d_model):
            return None  # the C code trusts these sizes: anything else is eager's to refuse
        lib = cpu_fused.library()
        if lib is None:
            return None
        weights = self._weights(model)
        if weights is None:
            return None
        hidden = embedded.contiguous().clone()
        out = torch.empty_like(hidden)
        rc = lib.crsm_decode_layers(
            weights, norm_f.weight.data_ptr(), _ptr(getattr(norm_f, "bias", None)), cfg.n_layer, b, cfg.d_model,
            cfg.d_inner, cfg.d_state, cfg.dt_rank_value, cfg.d_conv, int(type(norm_f) is RMSNorm),
            float(norm_f.eps), hidden.data_ptr(), out.data_ptr(), conv.data_ptr(), conv.stride(0), ssm.data_ptr(),
            ssm.stride(0), self.threads_for(b, cfg),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"crsm_decode_layers returned {rc}")
        return out


def _state_layout_ok(conv: Tensor, ssm: Tensor) -> bool:
    """Each layer's (b, D, K) / (b, D, N) slice contiguous; layers may sit at any stride (decode-batch views)."""
    _, b, d, k = conv.shape
    n = ssm.shape[-1]
    return (
        conv.stride()[1:] == (d * k, k, 1) or b == 1 and conv.stride()[2:] == (k, 1)
    ) and (ssm.stride()[1:] == (d * n, n, 1) or b == 1 and ssm.stride()[2:] == (n, 1))
