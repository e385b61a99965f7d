"""The whole-model decode step through the fused CPU library (engine/ops/cpu_fused.py), Mamba-1 or Mamba-2.

At batch 1 a small Mamba's step is ~25 eager ops per layer, each costing a
few microseconds of dispatch for a few hundred FLOPs; one C call for every
layer removes that overhead. The model keeps its ``nn.Linear`` modules (so
engine/quant.py can swap them): the weights are read through the modules at
every step, and the fused step runs while every projection is a plain
``nn.Linear`` holding float32 weights on the CPU or one of engine/quant.py's
int8 / bf16 layers (all of one kind). Anything else (bf16/fp16 models, CUDA,
autograd, batches above ``max_batch``) gets ``None`` and the caller runs the
eager step.
"""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from engine.modules.block import Block, RMSNorm
from engine.modules.mixer2 import Mamba2Mixer
from engine.ops import cpu_fused, kernels
from engine.quant import QuantizedLinear

if TYPE_CHECKING:
    from engine.config import MambaConfig
    from engine.models.mamba_lm import MambaLMHeadModel

# Batches up to this size take the fused step (it won at 8 and 32 in
# loadtest/bench_kernels.py); larger ones were not measured and keep eager's
# batched matmuls (MKL).
DEFAULT_MAX_BATCH = int(os.environ.get("CRSM_FUSED_DECODE_MAX_BATCH", "32"))
# A step runs on one thread below this many multiply-adds per layer, on
# every engine thread above (the default shape has ~430k per layer at b1,
# the 130M shape ~3.8M). On the quiet 2-core VM two threads beat one at both
# shapes (default b1: 190 vs 321 us per step; 130M b1 float32: 36 vs 28
# tok/s). On the same VM loaded to 11-20 by other jobs, two threads lost
# badly at b1 (a barrier waits for a descheduled thread: 130M 0.5-1.7 tok/s
# on 2 threads, 8.5-10.4 on 1): the server therefore gives its engine half
# the cores the planner leaves (1 of 2 here) with OMP_WAIT_POLICY=PASSIVE,
# and this threshold only keeps barriers off steps too small to split.
PARALLEL_MIN_MACS = 100_000


def _projection(m: nn.Module) -> tuple[int, int, int | None] | None:
    """(weight kind, weight pointer, scale pointer) of a plain float32 ``nn.Linear`` or an engine/quant.py
    int8/bf16 layer; None for anything else (that layer's step runs eagerly)."""
    if type(m) is nn.Linear:
        w = m.weight
        return (0, w.data_ptr(), None) if w.dtype == torch.float32 and w.is_contiguous() else None
    weight = getattr(m, "weight", None)
    data_q = getattr(weight, "data_q", None)
    if isinstance(m, QuantizedLinear) and data_q is not None and data_q.is_contiguous():
        kind = cpu_fused.WEIGHT_KINDS.get(data_q.dtype)
        scales = m.weight.scales
        if kind == 1 and scales is not None and scales.is_contiguous():
            return kind, data_q.data_ptr(), scales.data_ptr()
        if kind == 2:
            return kind, data_q.data_ptr(), None
    return None


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _Registrations:
    """Counts parameter, buffer and submodule assignments anywhere in the process (torch's global
    registration hooks): the packed pointers stay valid while it is unchanged. Walking the modules to
    check them cost ~50 us per step at the default shape (reading the pointers through torch ~95 us)."""

    count = 0

    @classmethod
    def bump(cls, *_args) -> None:
        cls.count += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_Registrations.bump)
torch.nn.modules.module.register_module_buffer_registration_hook(_Registrations.bump)
torch.nn.modules.module.register_module_module_registration_hook(_Registrations.bump)


def _layer_pointers2(layer: Block, norm_type: type) -> tuple[int, list[int | None]] | None:
    """(weight kind, the 14 pointers crsm_decode_layers2 expects for one Mamba-2 block (Slot2)), or None."""
    mixer, norm = layer.mixer, layer.norm
    assert isinstance(mixer, Mamba2Mixer)
    found = [_projection(m) for m in (mixer.in_proj, mixer.out_proj)]
    projections = [p for p in found if p is not None]
    if len(projections) != 2 or projections[0][0] != projections[1][0]:
        return None
    (kind, in_w, in_s), (_, out_w, out_s) = projections
    if type(norm) is not norm_type or norm.weight.dtype != torch.float32:
        return None
    small = (mixer.conv1d.weight, mixer.dt_bias, mixer.norm.weight)
    if any(t.dtype != torch.float32 or not t.is_contiguous() for t in small):
        return None
    return kind, [
        _ptr(norm.weight), _ptr(getattr(norm, "bias", None)),
        in_w, _ptr(mixer.in_proj.bias),
        _ptr(mixer.conv1d.weight), _ptr(mixer.conv1d.bias),
        _ptr(mixer.dt_bias), _ptr(mixer._A_for_decode()), _ptr(mixer.D), _ptr(mixer.norm.weight),
        out_w, _ptr(mixer.out_proj.bias),
        in_s, out_s,
    ]  # fmt: skip


def _layer_pointers(layer: Block, norm_type: type) -> tuple[int, list[int | None]] | None:
    """(weight kind, the 17 pointers the C side expects for one block), or None if the block is not
    fused-eligible (its projections must share one weight kind)."""
    mixer, norm = layer.mixer, layer.norm
    if isinstance(mixer, Mamba2Mixer):
        return _layer_pointers2(layer, norm_type)
    found = [_projection(m) for m in (mixer.in_proj, mixer.x_proj, mixer.dt_proj, mixer.out_proj)]
    projections = [p for p in found if p is not None]
    if len(projections) != len(found) or len({p[0] for p in projections}) != 1:
        return None
    (kind, in_w, in_s), (_, xp_w, xp_s), (_, dt_w, dt_s), (_, out_w, out_s) = projections
    if type(norm) is not norm_type or norm.weight.dtype != torch.float32:
        return None
    conv_w = mixer.conv1d.weight
    if conv_w.dtype != torch.float32 or not conv_w.is_contiguous():
        return None
    return kind, [
        _ptr(norm.weight), _ptr(getattr(norm, "bias", None)),
        in_w, _ptr(mixer.in_proj.bias),
        _ptr(conv_w), _ptr(mixer.conv1d.bias),
        xp_w, dt_w, _ptr(mixer.dt_proj.bias),
        _ptr(mixer._A_for_decode()), _ptr(mixer.D),
        out_w, _ptr(mixer.out_proj.bias),
        in_s, xp_s, dt_s, out_s,
    ]  # fmt: skip


def _weight_tensor(proj: nn.Linear | QuantizedLinear) -> Tensor:
    """The tensor a projection's weight pointer was read from (a quantized layer's int8/bf16 data)."""
    weight = proj.weight
    return getattr(weight, "data_q", weight)


def _packed_tensors(model: MambaLMHeadModel) -> list[Tensor]:
    """Detached views of every tensor whose pointer is packed: they keep the storage alive however the module's
    parameters are later replaced, so a missed change reads stale weights, never freed memory."""
    held: list[Tensor | None] = []
    for layer in model.backbone.layers:
        mixer, norm = layer.mixer, layer.norm
        held += [norm.weight, getattr(norm, "bias", None), mixer.conv1d.weight, mixer.conv1d.bias,
                 mixer._A_for_decode(), mixer.D]
        if isinstance(mixer, Mamba2Mixer):
            held += [mixer.dt_bias, mixer.norm.weight]
        projections = ((mixer.in_proj, mixer.out_proj) if isinstance(mixer, Mamba2Mixer) else
                       (mixer.in_proj, mixer.x_proj, mixer.dt_proj, mixer.out_proj))
        for proj in projections:
            held += [_weight_tensor(proj), getattr(proj.weight, "scales", None), proj.bias]
    return [t.detach() for t in held if t is not None]


class FusedDecode:
    """Runs :meth:`MambaLMHeadModel.step`'s layers and final norm in one C call."""

    def __init__(self, max_batch: int = DEFAULT_MAX_BATCH):
        self.max_batch = max_batch
        self._key: tuple | None = None
        self._array: ctypes.Array | None = None
        self._kind = 0
        self._packed_at = -1  # _Registrations.count when packed
        self._held: list[Tensor] = []  # every tensor packed (detached views): its storage lives as long as the table
        self._sentinels: tuple = ()  # (tensor, data_ptr) of the first and last layers' in_proj weights
        self._tracked: list[Tensor] = []  # A_log parameters edited in place by training (not inference tensors)
        self._tracked_versions: tuple = ()

    def invalidate(self) -> None:
        """Forget the packed pointers. ``model.to()`` / ``.float()`` call this; ``param.data = ...`` or ``.to()``
        on a single submodule fire no hook: call it after them (until then the step reads the old weights, which
        the table keeps alive: stale, never freed memory)."""
        self._key = self._array = None
        self._packed_at = -1
        self._held, self._tracked, self._tracked_versions, self._sentinels = [], [], (), ()

    @staticmethod
    def layer_macs(b: int, cfg: MambaConfig) -> int:
        if cfg.layer == "Mamba2":
            in_width = 2 * cfg.d_inner + 2 * cfg.ngroups * cfg.d_state + cfg.nheads
            return b * (cfg.d_model * in_width + cfg.d_inner * cfg.d_model + cfg.d_inner * cfg.d_state)
        d, di, p = cfg.d_model, cfg.d_inner, cfg.dt_rank_value + 2 * cfg.d_state
        return b * (d * 2 * di + di * p + di * cfg.dt_rank_value + di * d)

    def threads_for(self, b: int, cfg: MambaConfig) -> int:
        return torch.get_num_threads() if self.layer_macs(b, cfg) >= PARALLEL_MIN_MACS else 1

    def wins(self, b: int, cfg: MambaConfig) -> bool:
        """Every batch up to ``max_batch``. Batch 1 of the 130M shape used to stay eager (eager's GEMVs then
        matched the fused step on one thread); with the GEMVs prefetching the next rows the fused step on the
        quiet 2-core VM ran 36 tok/s on 2 threads and 28 on 1 against eager's 22-23 (float32), 146-151 / 110
        against 76-80 with int8 weights."""
        return b <= self.max_batch

    def __getstate__(self) -> dict:  # pickled/deep-copied models: the pointer array is rebuilt on use
        fresh = FusedDecode(self.max_batch)
        return dict(fresh.__dict__)

    def _weights(self, model: MambaLMHeadModel) -> ctypes.Array | None:
        """The packed pointer array: reused while no module or parameter was assigned anywhere and no ``A_log``
        was edited in place (its cached ``A`` is then recomputed); else read again from the modules."""
        if (self._packed_at == _Registrations.count and all(t.data_ptr() == p for t, p in self._sentinels)
                and tuple(a._version for a in self._tracked) == self._tracked_versions):
            return self._array  # None: this model is not fused-eligible (also remembered)
        packed_at = _Registrations.count
        self._array = array = self._pack(model)
        self._packed_at = packed_at
        self._tracked = [layer.mixer.A_log for layer in model.backbone.layers if not layer.mixer.A_log.is_inference()]
        self._tracked_versions = tuple(a._version for a in self._tracked)
        ends = (model.backbone.layers[0], model.backbone.layers[-1]) if array is not None else ()
        # A whole-model or whole-stack conversion (layers.half(), param.data = ...) moves these: seen at ~1 us.
        self._sentinels = tuple((w, w.data_ptr()) for w in (_weight_tensor(layer.mixer.in_proj) for layer in ends))
        return array

    def _pack(self, model: MambaLMHeadModel) -> ctypes.Array | None:
        pointers: list[int | None] = []
        kinds = set()
        norm_type = type(model.backbone.norm_f)
        for layer in model.backbone.layers:
            packed = _layer_pointers(layer, norm_type)
            if packed is None:
                self._key = None
                return None
            kinds.add(packed[0])
            pointers.extend(packed[1])
        if len(kinds) != 1:  # one weight kind per step
            self._key = None
            return None
        key = (*kinds, *pointers)
        if key != self._key:  # weights moved, swapped or rebuilt: a new array
            self._array = (ctypes.c_void_p * len(pointers))(*pointers)
            self._key, self._kind = key, kinds.pop()
            self._held = _packed_tensors(model)
        return self._array

    def hidden(self, model: MambaLMHeadModel, embedded: Tensor, conv: Tensor, ssm: Tensor) -> Tensor | None:
        """final_norm(all layers(embedded)) (b, d_model), states advanced in place; None where it cannot run."""
        cfg = model.config
        b = embedded.shape[0]
        if cfg.mixer_rms_eps is not None:
            return None  # the C step has no norms on dt, B and C (Falcon-Mamba): eager's step runs them
        if not self.wins(b, cfg) or not cpu_fused.usable(embedded, conv, ssm, model.lm_head.weight):
            return None
        if kernels.ssm_kernels_for(embedded) or kernels.conv_kernels_for(embedded):
            return None  # mamba-ssm's kernels claim these tensors
        norm_f = model.backbone.norm_f
        if type(norm_f) not in (RMSNorm, nn.LayerNorm) or norm_f.weight.dtype != torch.float32:
            return None
        mamba2 = cfg.layer == "Mamba2"
        if (not mamba2 and cfg.d_state > cpu_fused.MAX_STATE) or not _state_layout_ok(conv, ssm):
            return None  # Mamba-1's C step holds a channel's state on the stack; Mamba-2's streams it
        expected = ((cfg.n_layer, b, cfg.conv_channels, cfg.d_conv), (cfg.n_layer, b, cfg.d_inner, cfg.d_state))
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
        if mamba2:
            low, high = cfg.dt_limit
            rc = lib.crsm_decode_layers2(
                weights, self._kind, norm_f.weight.data_ptr(), _ptr(getattr(norm_f, "bias", None)), cfg.n_layer, b,
                cfg.d_model, cfg.d_inner, cfg.d_state, cfg.nheads, cfg.ngroups, cfg.d_conv,
                int(type(norm_f) is RMSNorm), float(norm_f.eps), float(cfg.norm_epsilon), int(cfg.norm_before_gate),
                float(low), float(min(high, 3.0e38)), hidden.data_ptr(), out.data_ptr(), conv.data_ptr(),
                conv.stride(0), ssm.data_ptr(), ssm.stride(0), self.threads_for(b, cfg),
            )  # fmt: skip
            if rc != 0:
                raise RuntimeError(f"crsm_decode_layers2 returned {rc}")
            return out
        rc = lib.crsm_decode_layers(
            weights, self._kind, norm_f.weight.data_ptr(), _ptr(getattr(norm_f, "bias", None)), cfg.n_layer, b, cfg.d_model,
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
    _, _, di, n = ssm.shape  # Mamba-2's conv window is wider than its SSM state (x, B and C)
    return (
        conv.stride()[1:] == (d * k, k, 1) or b == 1 and conv.stride()[2:] == (k, 1)
    ) and (ssm.stride()[1:] == (di * n, n, 1) or b == 1 and ssm.stride()[2:] == (n, 1))
