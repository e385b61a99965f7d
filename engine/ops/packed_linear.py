"""Prefill projections through oneDNN with each weight packed once (CPU, float32).

Why: on CPU ``F.linear`` is MKL's sgemm, which on the AMD EPYC development VM runs its AVX2 "zen" kernels and
re-reads the row-major weight in its own blocking on every call. oneDNN's matmul against a weight reordered once
into its blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, the path Inductor's CPU freezing uses)
measured, on the 130M projections with 2 threads: 1.2x (2048 rows, 3072 x 768) to 2.3x (17 rows) MKL's speed;
whole 130M prefills 1.10x (2048 tokens) and 1.16x (512).

Cost: a second copy of each packed weight (the fused decode step reads the row-major one), made on first use:
+4 bytes per packed parameter (the mixers' in/out projections; ~70% of a 130M model's weights). Set
``CRSM_PREFILL_PACKED=0`` to keep MKL and one copy. Quantized and bfloat16 weights, autograd (training) and
tensors off the CPU always take ``F.linear``.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

ENV_SWITCH = "CRSM_PREFILL_PACKED"
# Always packed from this many weights (the in/out projections of 130M-class models, 1.2-2.4M: oneDNN wins
# from 1 row); smaller weights (x_proj, dt_proj: MKL's calls are ~10 us at a few rows, oneDNN's ~25) from
# MIN_ROWS rows.
MIN_WEIGHTS = 1 << 19
MIN_ROWS = 64


_OFF = ("0", "false", "off", "no")
_ON = ("", "1", "true", "on", "yes")


def enabled() -> bool:
    """oneDNN's packed linear is present and ``CRSM_PREFILL_PACKED`` does not say off (0/false/off/no; read per
    call: tests flip it). An unrecognised value is logged once and leaves packing on, the default."""
    value = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if value not in _OFF and value not in _ON:
        _warn_value(value)
    return value not in _OFF and _available()


_WARNED: set[str] = set()


def _warn_value(value: str) -> None:
    if value not in _WARNED and len(_WARNED) < 8:
        _WARNED.add(value)
        log.warning("%s=%r is not one of 0/1/false/true/off/on/no/yes; prefill packing stays on", ENV_SWITCH, value)


_AVAILABLE: bool | None = None


def _available() -> bool:
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                          and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    return _AVAILABLE


def _disable(reason: Exception) -> None:
    global _AVAILABLE
    _AVAILABLE = False
    log.warning("oneDNN packed linear failed (%r); prefill projections use F.linear from now on", reason)


_ANNOUNCED = False


def _announce() -> None:
    """Say once per process that prefill weights now have a second copy (memory a user should know about)."""
    global _ANNOUNCED
    if not _ANNOUNCED:
        _ANNOUNCED = True
        log.info("prefill projections run through oneDNN with packed copies of their float32 weights "
                 "(+4 bytes per packed weight; %s=0 keeps one copy)", ENV_SWITCH)


class PackedWeights:
    """A module's packed copies, one per name, rebuilt when the weight's storage, shape or version changes
    (``load_state_dict`` copies in place and bumps the version; inference tensors have none and are frozen)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, Tensor]] = {}

    def get(self, name: str, weight: Tensor) -> Tensor:
        version = None if weight.is_inference() else weight._version
        key = (weight.data_ptr(), tuple(weight.shape), version)
        entry = self._entries.get(name)
        if entry is None or entry[0] != key:
            with torch.no_grad():
                entry = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
            self._entries[name] = entry
            _announce()
        return entry[1]

    def __getstate__(self) -> dict:  # pickled / deep-copied models pack again on use
        return {"_entries": {}}

    def clear(self) -> None:
        self._entries.clear()


def _packable(x: Tensor, weight: Tensor, bias: Tensor | None, rows: int) -> bool:
    if type(weight) not in (Tensor, nn.Parameter) or weight.dtype != torch.float32 or x.dtype != torch.float32:
        return False
    if x.device.type != "cpu" or weight.device.type != "cpu" or weight.dim() != 2 or rows == 0:
        return False
    if bias is not None and (type(bias) not in (Tensor, nn.Parameter) or bias.dtype != torch.float32):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return (weight.numel() >= MIN_WEIGHTS or rows >= MIN_ROWS) and enabled()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, cache: PackedWeights, name: str) -> Tensor:
    """``F.linear(x, weight, bias)``, through oneDNN with ``cache``'s packed copy of ``weight`` where that wins."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not _packable(x, weight, bias, rows):
        return F.linear(x, weight, bias)
    try:
        packed = cache.get(name, weight)
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]).contiguous(), packed,
                                                 None if bias is None else bias.detach(), "none", [], "")
    except RuntimeError as exc:  # an unusual build: fall back for good rather than fail prefills
        _disable(exc)
        return F.linear(x, weight, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])
