"""Weight-only bf16 and int8 linear layers for CPU decoding.

Why: batch-1 decode reads every weight once per token, so on a CPU it runs at
the memory bandwidth over the weight bytes; the only way faster is fewer bytes
per weight. :func:`quantize_model` swaps the model's ``nn.Linear`` modules
(``in_proj``, ``x_proj``, ``dt_proj``, ``out_proj`` of every layer and
``lm_head``) in place for :class:`QuantizedLinear`:

- ``int8``: symmetric per-output-channel int8 weights, ``w ~= q * scale[row]``:
  1 byte per weight read;
- ``bf16``: bfloat16 weights: 2 bytes per weight read.

Decode (up to ``cpu_fused.LINEAR_MAX_ROWS`` rows: the fused decode step and
the LM head) runs the fused CPU library's GEMV (engine/ops/csrc): bf16
weights are widened to float32 in registers against float32 activations;
int8 weights meet activations quantized to int16 per block of 64 columns
(AVX512-VNNI's ``vpdpwssd``; where the CPU lacks VNNI they are widened
against float32 activations). Prefill-sized inputs, and every input when the
library is not built (no compiler, ``CRSM_KERNELS=eager``), take torch's
kernels: ``aten._weight_int8pack_mm`` (gpt-fast's CPU int8 kernel) for up to
16 rows, else oneDNN's bf16 matmul over bf16-widened weights; there the
activation is rounded to bfloat16 on its way in and the output is bfloat16,
widened back to float32 at once.

Everything else stays as loaded (float32 by default): the embedding lookup
(a tied ``lm_head`` gets its own quantized copy, the embedding table stays
float32), norms, the conv weights, ``A_log``/``D``, the selective scan and the
recurrent state (conv and SSM states), so a session's state is the same kind
of tensor whatever the weights.

The mixer's decode step calls ``F.linear(x, self.in_proj.weight, ...)`` on the
weight directly rather than the module, so the quantized weight is a tensor
subclass (:class:`QuantizedWeight`) that routes ``F.linear`` to its kernel;
any other operation on it sees the dequantized float32 weight (correct, slow:
nothing on the serving path does that).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from engine.ops import cpu_fused

if TYPE_CHECKING:
    from engine.models.mamba_lm import MambaLMHeadModel

MODES = ("none", "bf16", "int8")
INT8_GEMV_ROWS = 16  # rows up to which the int8 kernel runs; above, a bf16 matmul over widened weights (measured)
INT8_K_MULTIPLE = 32  # torch's AVX512 int8 kernel reads K in whole vectors (K=24 crashed it): others are widened
LINEAR_NAMES = ("in_proj", "x_proj", "dt_proj", "out_proj")


class QuantizedWeight(Tensor):
    """A (out, in) float32-looking weight stored as int8 + per-row scales, or as bfloat16.

    ``F.linear(x, w, b)`` runs the low-precision kernel; row slices stay quantized
    (the padded-vocabulary head slices its rows); anything else dequantizes.
    """

    data_q: Tensor
    scales: Tensor | None  # int8: per-row float32 scales; bf16: None
    unit_scales: Tensor | None  # int8: bf16 ones for torch's int8 kernel; bf16: None
    kind: str

    @staticmethod
    def __new__(cls, data_q: Tensor, scales: Tensor | None, kind: str) -> QuantizedWeight:  # noqa: PYI034
        out = Tensor._make_wrapper_subclass(cls, data_q.shape, dtype=torch.float32, device=data_q.device,
                                            requires_grad=False)
        out.data_q, out.scales, out.kind = data_q, scales, kind
        # The kernel wants bf16 scales: it gets ones, and the float32 scales multiply its output (no scale rounding).
        out.unit_scales = None if scales is None else torch.ones_like(scales, dtype=torch.bfloat16)
        return out

    # The ignore: mypy treats a dunder method's parameters as positional-only, which leaves untyped Tensor.__repr__'s
    # keyword-only ``tensor_contents`` nameless, so no override signature matches it (not even ``**kwargs``).
    def __repr__(self) -> str:  # type: ignore[override]  # the default repr would dequantize through __torch_dispatch__
        return f"QuantizedWeight({self.kind}, shape={tuple(self.shape)})"

    def dequantize(self) -> Tensor:
        if self.kind == "int8":
            assert self.scales is not None  # int8 weights always carry their scales
            return self.data_q.float() * self.scales.unsqueeze(1)
        return self.data_q.float()

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x (..., in) float32 -> (..., out) float32 through the low-precision kernel.

        Decode-sized inputs (up to ``cpu_fused.LINEAR_MAX_ROWS`` rows) run the fused CPU library's kernel where it
        is built: the weight is widened in registers, activations and sums stay float32. Otherwise (prefill, no
        compiler, ``CRSM_KERNELS=eager``) torch's kernels run, and the activation enters the matmul as bfloat16
        in both modes: torch's int8 kernel is vectorised for
        bfloat16 activations only (with float32 ones it ran ~15x slower than the float32 matmul here), and
        oneDNN's bf16 matmul takes bf16 on both sides. Past INT8_GEMV_ROWS rows (prefill, large batches) the
        int8 weight is widened to bfloat16 for oneDNN's matmul, which beats the int8 kernel there.
        """
        if x.dtype == torch.float32:
            fused = cpu_fused.linear(x, self.data_q, self.scales, bias)
            if fused is not None:
                return fused
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self.kind == "bf16":
            out = F.linear(x2, self.data_q).float()
        elif x2.shape[0] <= INT8_GEMV_ROWS and x2.shape[1] % INT8_K_MULTIPLE == 0:
            out = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.data_q, self.unit_scales)
            out = out.float() * self.scales
        else:
            assert self.scales is not None  # int8 (bf16 took the first branch): scales are set
            out = F.linear(x2, self.data_q.to(torch.bfloat16)).float() * self.scales
        if bias is not None:
            out = out + bias
        return out.reshape(*lead, out.shape[-1]).to(x.dtype)

    def rows(self, index: slice) -> QuantizedWeight:
        return QuantizedWeight(self.data_q[index], None if self.scales is None else self.scales[index], self.kind)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and isinstance(args[1] if len(args) > 1 else kwargs.get("weight"), QuantizedWeight):
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return weight.linear(x, bias)
        if func is Tensor.__getitem__ and isinstance(args[0], QuantizedWeight) and isinstance(args[1], slice):
            return args[0].rows(args[1])
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        """Any other op: run it on the dequantized weight (a plain float32 result)."""
        unwrap = lambda a: a.dequantize() if isinstance(a, QuantizedWeight) else a
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))


def quantize_weight(weight: Tensor, kind: str) -> QuantizedWeight:
    """A float weight (out, in) as int8 with symmetric per-row scales (max |w| / 127), or as bfloat16."""
    w = weight.detach().float()
    if kind == "bf16":
        return QuantizedWeight(w.to(torch.bfloat16).contiguous(), None, kind)
    if kind != "int8":
        raise ValueError(f"quantize kind must be bf16 or int8, not {kind!r}")
    if not bool(torch.isfinite(w).all()):  # a NaN row would round to finite garbage, an inf row to zeros
        raise ValueError("int8 quantization needs finite weights; this layer has NaN or inf values")
    scales = w.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row stays zero
    q = torch.round(w / scales.unsqueeze(1)).clamp_(-127, 127).to(torch.int8).contiguous()
    return QuantizedWeight(q, scales.contiguous(), kind)


class QuantizedLinear(nn.Module):
    """Drop-in for ``nn.Linear`` at inference: ``weight`` is a :class:`QuantizedWeight`, ``bias`` stays float."""

    in_features: int
    out_features: int
    weight: QuantizedWeight
    bias: nn.Parameter | None

    # A QuantizedLinear given (quantize_model run twice) is re-quantized from its dequantized weight.
    def __init__(self, linear: nn.Linear | QuantizedLinear, kind: str):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kind = kind
        self.weight = quantize_weight(linear.weight, kind)  # a plain attribute: not a Parameter, not trained
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.weight.linear(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"

    def weight_bytes(self) -> int:
        w = self.weight
        return w.data_q.numel() * w.data_q.element_size() + (0 if w.scales is None else w.scales.numel() * 4)


def check_mode(mode: str | None) -> str:
    """The quantize mode by name ("none", "bf16", "int8"); a clear ValueError otherwise."""
    mode = "none" if mode in (None, "") else mode
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


@torch.no_grad()
def quantize_model(model: MambaLMHeadModel, mode: str) -> MambaLMHeadModel:
    """Swap the linear layers of a Mamba LM for ``mode`` ones in place; returns the model.

    ``mode`` "none" leaves it untouched. CPU only (the kernels are CPU ones), float32
    models only: the activations and state stay float32 around the quantized matmuls.
    """
    mode = check_mode(mode)
    if mode == "none":
        return model
    if model.backbone.embedding.weight.device.type != "cpu":
        raise ValueError("weight-only quantization runs on CPU models only")
    if model.backbone.embedding.weight.dtype != torch.float32:
        raise ValueError(f"quantize {mode} needs a float32 model (loaded as {model.backbone.embedding.weight.dtype})")
    for layer in model.backbone.layers:
        mixer = layer.mixer
        for name in LINEAR_NAMES:
            if hasattr(mixer, name):  # Mamba-2 mixers have only in_proj and out_proj
                setattr(mixer, name, QuantizedLinear(getattr(mixer, name), mode))
    model.lm_head = QuantizedLinear(model.lm_head, mode)  # tied: a quantized copy; the embedding stays float32
    return model


def weight_bytes_per_token(model: nn.Module) -> int:
    """Weight bytes a batch-1 decode step reads: linears, norms, conv, A, D (not the embedding table: rows only)."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            total += module.weight_bytes()
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    for name, param in model.named_parameters():
        if "embedding" in name or name.endswith("proj.weight") or name == "lm_head.weight":
            continue
        total += param.numel() * param.element_size()
    return total


def describe(model: MambaLMHeadModel) -> dict[str, Any]:
    """Which tensors run in which precision (for logs and the benchmark's record)."""
    kinds = {type(m).__name__ + ":" + getattr(m, "kind", str(getattr(m, "weight", torch.empty(0)).dtype))
             for m in model.modules() if isinstance(m, (nn.Linear, QuantizedLinear))}
    return {"linears": sorted(kinds), "embedding": str(model.backbone.embedding.weight.dtype),
            "state": "float32 ssm; conv " + str(model.state_shape().conv_dtype)}
