"""Fused CPU kernels (``csrc/crsm_fused.cpp``): built on first use, loaded with ctypes.

Why a small C++ library rather than ``torch.compile`` or a torch C++
extension (measured on the 2-core development VM, see docs/performance.md, "Fused
CPU kernels"): ``torch.compile`` of the decode step took ~52 s to compile on a
cold cache and needs a C++ compiler at run time anyway; a
``torch.utils.cpp_extension`` build includes ``<torch/extension.h>`` and
takes tens of seconds per build. This source includes no torch header, so a
plain ``g++ -O3 -march=native -fopenmp -shared`` builds it in a few seconds;
the result is cached by a hash of source, flags, compiler and CPU, so later
starts only ``dlopen`` it. Tensors cross as raw pointers with the strides
checked here.

Switch: ``CRSM_KERNELS=eager`` turns the fused path off; unset or ``fused``
uses it when it builds. Without a compiler, on a failed build, for non-fp32
or CUDA tensors, or with autograd on, callers get ``None`` and run the eager
path. One log line says which path runs and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "crsm_fused.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17")
ENV_SWITCH = "CRSM_KERNELS"
ENV_CACHE = "CRSM_KERNEL_CACHE"
ABI_VERSION = 5
MAX_STATE = 64  # kMaxState in the source
MAX_CONV = 8  # kMaxConv in the source

_i64, _f32, _int, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p


@dataclass
class KernelStatus:
    """Which path runs and why; ``build_seconds`` is 0 when the library came from the cache."""

    path: str = "eager"
    reason: str = "not loaded yet"
    library: str | None = None
    build_seconds: float = 0.0
    load_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status: KernelStatus | None = None


def requested() -> str:
    """``eager`` or ``fused`` from ``CRSM_KERNELS`` (unset: fused)."""
    value = os.environ.get(ENV_SWITCH, "fused").strip().lower() or "fused"
    if value not in ("eager", "fused"):
        log.warning("%s=%r is not eager|fused; using fused when available", ENV_SWITCH, value)
        return "fused"
    return value


def cache_dir() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "crsm" / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _cpu_signature() -> str:
    """-march=native code is only valid on this CPU: the cache key includes its model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def library_path(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    return cache_dir() / f"crsm_fused-{key}.so"


def build(cxx: str, target: Path) -> float:
    """Compile into ``target`` (atomically: a temporary file renamed); returns seconds spent."""
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return time.perf_counter() - t0


def _declare(lib: ctypes.CDLL) -> None:
    lib.crsm_abi_version.restype = _int
    lib.crsm_selective_scan.restype = _int
    lib.crsm_selective_scan.argtypes = [_ptr] * 9 + [_i64] * 4 + [_ptr, _int, _ptr, _int]
    lib.crsm_causal_conv.restype = _int
    # One list display each (not lists joined by +): mypy types a display by argtypes' declared type, but joins
    # a concatenated mixed list to list[type[_CData]], which that type refuses.
    lib.crsm_causal_conv.argtypes = [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, *[_i64] * 4, _int]
    lib.crsm_decode_layers.restype = _int
    lib.crsm_decode_layers.argtypes = [
        _ptr, _int, _ptr, _ptr, *[_i64] * 7, _int, _f32, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _int
    ]
    lib.crsm_decode_layers2.restype = _int
    lib.crsm_decode_layers2.argtypes = [
        _ptr, _int, _ptr, _ptr, *[_i64] * 8, _int, _f32, _f32, _int, _f32, _f32, _ptr, _ptr, _ptr, _i64, _ptr, _i64,
        _int,
    ]
    lib.crsm_ssd_step.restype = _int
    lib.crsm_ssd_step.argtypes = [_ptr, _i64, *[_ptr] * 7, *[_i64] * 5, _int]
    lib.crsm_int8_vnni.restype = _int
    lib.crsm_linear.restype = _int
    lib.crsm_linear.argtypes = [_int, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _int]


def _load() -> tuple[ctypes.CDLL | None, KernelStatus]:
    if requested() == "eager":
        return None, KernelStatus("eager", f"{ENV_SWITCH}=eager")
    cxx = _compiler()
    if cxx is None:
        return None, KernelStatus("eager", "no C++ compiler (g++ or $CXX) on PATH")
    try:
        target = library_path(cxx)
        built = 0.0 if target.exists() else build(cxx, target)
        t0 = time.perf_counter()
        lib = ctypes.CDLL(str(target))
        _declare(lib)
        if lib.crsm_abi_version() != ABI_VERSION:
            raise RuntimeError(f"ABI version {lib.crsm_abi_version()} != {ABI_VERSION}")
    except Exception as exc:  # noqa: BLE001 - any build or load failure: the eager path still serves
        return None, KernelStatus("eager", f"fused build/load failed: {type(exc).__name__}: {exc}")
    status = KernelStatus("fused", "built" if built else "cached build", str(target), built, time.perf_counter() - t0)
    return lib, status


def library() -> ctypes.CDLL | None:
    """The loaded library, or None for the eager path; builds and logs once per process."""
    global _lib, _status
    if _status is None:
        with _lock:
            if _status is None:
                _lib, status = _load()
                _status = status
                log.info("CPU kernels: %s (%s%s)", status.path, status.reason,
                         f", {status.library}, build {status.build_seconds:.1f}s" if status.library else "")
    return _lib


def status() -> KernelStatus:
    """Where the path stands (loads the library first if nothing asked yet)."""
    library()
    assert _status is not None
    return _status


def reset() -> None:
    """Forget the loaded state so the next call re-reads ``CRSM_KERNELS`` (tests)."""
    global _lib, _status
    with _lock:
        _lib, _status = None, None


def usable(*tensors: Tensor) -> bool:
    """True when every tensor is a CPU float32 tensor outside autograd."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or (grad and t.requires_grad):
            return False
    return True


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def selective_scan(
    x: Tensor, dt: Tensor, A2: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor, h0: Tensor | None,
    dt_softplus: bool = False, lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor] | None:
    """Fused ``(scan(x) + D * x) * silu(z)`` over (b, L, ·); (out, last state), or None where it cannot run.

    ``A2 = A * log2(e)`` (D, N). ``dt`` final (softplus applied, zero on padding), or with ``dt_softplus``
    before its softplus, the kernel then applying it and zeroing steps at or past each row's ``lengths``.
    """
    b, L, Dm = x.shape
    N = A2.shape[1]
    if N > MAX_STATE or not usable(x, dt, A2, B, C, D, z) or (h0 is not None and not usable(h0)):
        return None
    if (dt.shape != x.shape or z.shape != x.shape or B.shape != (b, L, N) or C.shape != (b, L, N)
            or A2.shape != (Dm, N) or D.shape != (Dm,) or (h0 is not None and h0.shape != (b, Dm, N))
            or (lengths is not None and lengths.shape != (b,))):
        return None  # the C code trusts these sizes: anything else is the eager path's to refuse
    lib = library()
    if lib is None:
        return None
    x, dt, z, B, C = (_unit_last(t) for t in (x, dt, z, B, C))
    if B.stride() != C.stride():
        B, C = B.contiguous(), C.contiguous()
    A2, D = A2.contiguous(), D.contiguous()
    h = x.new_zeros(b, Dm, N) if h0 is None else h0.float().clone().contiguous()
    out = x.new_empty(b, L, Dm)
    if L == 0:
        return out, h
    lens = None if lengths is None else lengths.to(device="cpu", dtype=torch.int64).contiguous()
    strides = (_i64 * 8)(x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), z.stride(0), z.stride(1),
                         B.stride(0), B.stride(1))
    rc = lib.crsm_selective_scan(x.data_ptr(), dt.data_ptr(), z.data_ptr(), B.data_ptr(), C.data_ptr(),
                                 A2.data_ptr(), D.data_ptr(), h.data_ptr(), out.data_ptr(), b, L, Dm, N, strides,
                                 int(dt_softplus), None if lens is None else lens.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"crsm_selective_scan returned {rc}")
    return out, h


# Below this many state values per step (b x H x P x N) the SSD step runs on one thread (a barrier costs more).
SSD_PARALLEL_MIN = 1 << 16


def ssd_step(h: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor) -> Tensor | None:
    """Mamba-2's decode step in one pass over the state: ``h`` (b, H, P, N) advances in place; returns
    ``h C + D x`` (b, H, P), or None where it cannot run (then the eager ops do it)."""
    if h.dim() != 4 or not usable(h, x, dt, A, B, C, D):
        return None
    b, H, P, N = h.shape
    G = B.shape[1] if B.dim() == 3 else 0
    if (x.shape != (b, H, P) or dt.shape != (b, H) or A.shape != (H,) or D.shape != (H,) or G < 1 or H % G
            or B.shape != (b, G, N) or C.shape != (b, G, N) or h.stride()[1:] != (P * N, N, 1)):
        return None  # the C code trusts these sizes and strides
    lib = library()
    if lib is None:
        return None
    x, dt, A, B, C, D = (t.contiguous() for t in (x, dt, A, B, C, D))
    y = x.new_empty(b, H, P)
    threads = torch.get_num_threads() if b * H * P * N >= SSD_PARALLEL_MIN else 1
    rc = lib.crsm_ssd_step(h.data_ptr(), h.stride(0), x.data_ptr(), dt.data_ptr(), A.data_ptr(), B.data_ptr(),
                           C.data_ptr(), D.data_ptr(), y.data_ptr(), b, H, P, N, G, threads)
    if rc != 0:
        raise RuntimeError(f"crsm_ssd_step returned {rc}")
    return y


def causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None) -> Tensor | None:
    """silu(causal depthwise conv) over x (b, L, D) from ``conv_state`` (b, D, K) or zeros, in one pass; the
    output (b, L, D), or None where the library cannot run it (the caller's eager path then does)."""
    b, L, Dm = x.shape
    K = weight.shape[-1]
    tensors = [t for t in (x, weight, bias, conv_state) if t is not None]
    if K > MAX_CONV or weight.shape != (Dm, K) or not usable(*tensors):
        return None
    if bias is not None and bias.shape != (Dm,) or conv_state is not None and conv_state.shape != (b, Dm, K):
        return None
    lib = library()
    if lib is None:
        return None
    x = _unit_last(x)
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    state = None if conv_state is None else conv_state.contiguous()
    out = x.new_empty(b, L, Dm)
    if L == 0:
        return out
    rc = lib.crsm_causal_conv(x.data_ptr(), x.stride(0), x.stride(1), None if state is None else state.data_ptr(),
                              weight.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(), b, L, Dm,
                              K, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"crsm_causal_conv returned {rc}")
    return out


def int8_activations() -> bool:
    """True when the library's int8 GEMV quantizes activations to int16 per block of 64 (AVX512-VNNI), False
    when it widens int8 weights against float32 activations (or the library is not loaded)."""
    lib = library()
    return bool(lib is not None and lib.crsm_int8_vnni())


INT8_BLOCK = 64  # kQBlock in the source: activations quantized per block of this many columns
INT8_ACTIVATION_MAX = 32767  # ... to int16: q = round(x * 32767 / max|x| of the block)

# Weight kinds the C side reads (WeightKind in the source).
WEIGHT_KINDS = {torch.float32: 0, torch.int8: 1, torch.bfloat16: 2}
LINEAR_MAX_ROWS = 32  # decode-sized inputs; prefill's matmuls are oneDNN's/MKL's
LINEAR_PARALLEL_MIN_MACS = 1_000_000  # below this a second thread costs more than it saves


def linear(x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor | None:
    """``x @ weight.T * scale + bias`` for a few float32 rows with float32, int8 or bfloat16 weights; None where
    the library cannot run it (the caller then uses its own path).

    A decode step reads 1 (int8) or 2 (bf16) bytes per weight. bf16 weights are widened to float32 in
    registers against float32 activations. int8 weights meet, where the CPU has AVX512-VNNI
    (:func:`int8_activations`), activations quantized to int16 per block of ``INT8_BLOCK`` columns (scale
    max|x| / 32767, int32 sums, a K tail under the block in float32), else they are widened against float32
    activations.
    """
    kind = WEIGHT_KINDS.get(weight.dtype)
    rows = x.numel() // max(x.shape[-1], 1)
    if (kind is None or rows > LINEAR_MAX_ROWS or x.device.type != "cpu" or weight.device.type != "cpu"
            or x.dtype != torch.float32 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            or (kind == 1) != (scale is not None)):
        return None
    lib = library()
    if lib is None:
        return None
    m, k = weight.shape
    for t, n in ((scale, m), (bias, m)):
        if t is not None and (t.dtype != torch.float32 or t.shape != (n,) or t.device.type != "cpu"):
            return None
    weight = weight.contiguous()
    scale = None if scale is None else scale.contiguous()
    bias = None if bias is None else bias.contiguous()
    x2 = x.reshape(rows, k).contiguous()
    out = x2.new_empty(rows, m)
    threads = torch.get_num_threads() if rows * m * k >= LINEAR_PARALLEL_MIN_MACS else 1
    rc = lib.crsm_linear(kind, weight.data_ptr(), None if scale is None else scale.data_ptr(),
                         None if bias is None else bias.data_ptr(), x2.data_ptr(), out.data_ptr(), rows, m, k, threads)
    if rc != 0:
        raise RuntimeError(f"crsm_linear returned {rc}")
    return out.reshape(*x.shape[:-1], m)
