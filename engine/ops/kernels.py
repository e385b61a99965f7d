"""Optional CUDA kernels from mamba-ssm and causal-conv1d.

They are imported inside ``try/except Exception`` because on a CPU-only
machine ``import mamba_ssm`` fails in its own extension loader, and used only
for CUDA tensors. Everything works without them through the pure path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

selective_scan_fn: Callable[..., Any] | None = None
selective_state_update: Callable[..., Any] | None = None
causal_conv1d_fn: Callable[..., Any] | None = None
causal_conv1d_update: Callable[..., Any] | None = None
mamba_chunk_scan_combined: Callable[..., Any] | None = None  # Mamba-2's SSD prefill (Triton)

try:  # pragma: no cover - needs a CUDA build of mamba-ssm
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # type: ignore[no-redef]
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update  # type: ignore[no-redef]
except Exception:
    pass

try:  # pragma: no cover - needs mamba-ssm 2 with Triton
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # type: ignore[no-redef]
except Exception:
    pass

try:  # pragma: no cover - needs a CUDA build of causal-conv1d
    from causal_conv1d import causal_conv1d_fn, causal_conv1d_update  # type: ignore[no-redef]
except Exception:
    pass


def ssm_kernels_for(t: Tensor) -> bool:
    """True when mamba-ssm's scan kernels can run on ``t``."""
    return t.is_cuda and selective_scan_fn is not None and selective_state_update is not None


def ssd_kernels_for(t: Tensor) -> bool:
    """True when mamba-ssm's Mamba-2 kernels (SSD chunk scan, state update) can run on ``t``."""
    return t.is_cuda and mamba_chunk_scan_combined is not None and selective_state_update is not None


def conv_kernels_for(t: Tensor) -> bool:
    """True when causal-conv1d's kernels can run on ``t``."""
    return t.is_cuda and causal_conv1d_fn is not None and causal_conv1d_update is not None


def describe() -> dict[str, bool]:
    """Which kernels imported, for logs and /health-style reports."""
    return {
        "selective_scan_fn": selective_scan_fn is not None,
        "selective_state_update": selective_state_update is not None,
        "mamba_chunk_scan_combined": mamba_chunk_scan_combined is not None,
        "causal_conv1d_fn": causal_conv1d_fn is not None,
        "causal_conv1d_update": causal_conv1d_update is not None,
    }
