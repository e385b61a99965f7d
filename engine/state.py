"""The recurrent state of Mamba sequences: what a session caches.

A :class:`MambaState` holds, for a batch of ``b`` sequences, every layer's

- ``conv``: (n_layer, b, conv_channels, d_conv), the last inputs of the
  causal conv, newest at index -1 (mamba-ssm's layout); ``conv_channels`` is
  d_inner for Mamba-1, d_inner + 2 * ngroups * d_state for Mamba-2 (its conv
  runs over x, B and C);
- ``ssm``: (n_layer, b, d_inner, d_state), the SSM hidden state, always
  float32 because it integrates over the whole history. For Mamba-2 it is
  mamba-ssm's (nheads, headdim, d_state) state with the heads laid end to
  end, so every batch operation below is the same for both mixers.

A single sequence is a state with ``b == 1``. Its size does not grow with
the history, which is why a session can continue without re-reading it.
Serialized, the safetensors header states the format, the writer's model
identity, the architecture (``arch``), every shape and dtype, and the stored
precision of the SSM state (float32, or bfloat16 to halve what a store
keeps: it is widened back to float32 on load).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

STATE_FORMAT = "crsm-state/2"  # safetensors metadata: format, model identity; its header: dtypes and shapes


# Precisions a store may keep the SSM state in (``--state-dtype``); it always runs in float32.
STORED_SSM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class StateError(ValueError):
    """A serialized or supplied state does not fit the model."""


@dataclass(frozen=True)
class StateShape:
    """Per-sequence layout of a model's state; built by the model."""

    n_layer: int
    d_inner: int
    d_conv: int
    d_state: int
    conv_dtype: torch.dtype = torch.float32
    ssm_dtype: torch.dtype = torch.float32
    arch: str = "Mamba1"  # the mixer (MambaConfig.layer): stated in serialized states, checked on load
    conv_channels: int = 0  # 0: d_inner (Mamba-1)

    @property
    def conv_width(self) -> int:
        """Channels of the conv window: d_inner, or Mamba-2's x + B + C."""
        return self.conv_channels or self.d_inner

    @property
    def nbytes_per_sequence(self) -> int:
        """Bytes of one sequence's state (both parts, every layer) in memory."""
        conv = self.n_layer * self.conv_width * self.d_conv * self.conv_dtype.itemsize
        return conv + self.n_layer * self.d_inner * self.d_state * self.ssm_dtype.itemsize

    def zeros(self, batch: int, device: torch.device | str | None = None) -> "MambaState":
        return MambaState(
            conv=torch.zeros(self.n_layer, batch, self.conv_width, self.d_conv, dtype=self.conv_dtype, device=device),
            ssm=torch.zeros(self.n_layer, batch, self.d_inner, self.d_state, dtype=self.ssm_dtype, device=device),
        )

    def check(self, state: "MambaState") -> None:
        """Raise :class:`StateError` unless ``state`` has this layout."""
        b = state.conv.shape[1] if state.conv.dim() == 4 else -1
        want_conv = (self.n_layer, b, self.conv_width, self.d_conv)
        want_ssm = (self.n_layer, b, self.d_inner, self.d_state)
        if tuple(state.conv.shape) != want_conv or tuple(state.ssm.shape) != want_ssm:
            raise StateError(
                f"state shapes conv={tuple(state.conv.shape)} ssm={tuple(state.ssm.shape)} do not fit the "
                f"{self.arch} model (conv (n_layer, b, channels, d_conv)={want_conv}, ssm={want_ssm})"
            )
        if state.conv.dtype != self.conv_dtype or state.ssm.dtype != self.ssm_dtype:
            raise StateError(
                f"state dtypes conv={state.conv.dtype} ssm={state.ssm.dtype} do not fit the model "
                f"(conv={self.conv_dtype}, ssm={self.ssm_dtype})"
            )


@dataclass
class MambaState:
    conv: Tensor
    ssm: Tensor

    # Introspection -----------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.conv.shape[1]

    @property
    def n_layer(self) -> int:
        return self.conv.shape[0]

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes

    @property
    def device(self) -> torch.device:
        return self.conv.device

    # Copies, batches ---------------------------------------------------
    def clone(self) -> "MambaState":
        """An independent copy (a fork of a session)."""
        return MambaState(self.conv.clone(), self.ssm.clone())

    def select(self, rows: Sequence[int] | Tensor) -> "MambaState":
        """A copy of some batch rows, in the given order."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.conv.device)
        return MambaState(self.conv.index_select(1, idx), self.ssm.index_select(1, idx))

    def write_rows(self, rows: Sequence[int] | Tensor, source: "MambaState") -> None:
        """Overwrite some rows in place with the rows of ``source`` (same order)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.conv.device)
        self.conv.index_copy_(1, idx, source.conv.to(self.conv.dtype))
        self.ssm.index_copy_(1, idx, source.ssm.to(self.ssm.dtype))

    @staticmethod
    def gather(states: Sequence["MambaState"]) -> "MambaState":
        """Stack several states (each of any batch size) into one batch."""
        if not states:
            raise StateError("cannot gather an empty list of states")
        return MambaState(torch.cat([s.conv for s in states], dim=1), torch.cat([s.ssm for s in states], dim=1))

    # Serialisation -----------------------------------------------------
    def to_bytes(self, model_id: str = "", arch: str = "", ssm_dtype: torch.dtype | None = None) -> bytes:
        """safetensors bytes, no pickle; the header records format, ``model_id`` (who wrote it), ``arch``, dtypes
        and shapes. ``ssm_dtype`` (bfloat16) stores the SSM state at a lower precision (see STORED_SSM_DTYPES)."""
        ssm = self.ssm.detach()
        if ssm_dtype is not None and ssm_dtype != ssm.dtype:
            if ssm_dtype not in STORED_SSM_DTYPES.values():
                raise StateError(f"a state is stored in {', '.join(STORED_SSM_DTYPES)}, not {ssm_dtype}")
            ssm = ssm.to(ssm_dtype)
        return st_save(
            {"conv": self.conv.detach().contiguous().cpu(), "ssm": ssm.contiguous().cpu()},
            metadata={"format": STATE_FORMAT, "model": model_id, "arch": arch},
        )

    @classmethod
    def from_bytes(cls, data: bytes, shape: StateShape, device: torch.device | str | None = None,
                   model_id: str | None = None) -> "MambaState":
        """Load bytes made by :meth:`to_bytes`, refusing any of another format, model (when ``model_id`` is
        given) or shape: a state that does not fit is never loaded."""
        header = state_header(data)
        if header.get("format") != STATE_FORMAT:
            raise StateError(f"state format {header.get('format')!r}, this engine reads {STATE_FORMAT!r}")
        if model_id is not None and header.get("model") != model_id:
            raise StateError(f"state written by another model (model {header.get('model', '')[:12]!r}, "
                             f"this one is {model_id[:12]!r})")
        if header.get("arch") and header["arch"] != shape.arch:
            raise StateError(f"state of a {header['arch']} model, this one is {shape.arch}")
        try:
            tensors = st_load(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:  # safetensors raises several kinds
            raise StateError(f"not a serialized state: {exc}") from exc
        if set(tensors) != {"conv", "ssm"}:
            raise StateError(f"serialized state has tensors {sorted(tensors)}, expected ['conv', 'ssm']")
        ssm = tensors["ssm"]
        if ssm.dtype != shape.ssm_dtype and ssm.dtype in STORED_SSM_DTYPES.values():
            ssm = ssm.to(shape.ssm_dtype)  # stored at a lower precision: widened, as it runs
        state = cls(tensors["conv"], ssm)
        shape.check(state)
        return cls(state.conv.to(device), state.ssm.to(device)) if device is not None else state


def state_header(data: bytes) -> dict[str, str]:
    """The metadata of serialized state bytes (format, model), read without loading a tensor."""
    try:
        size = int.from_bytes(data[:8], "little")
        if not 0 < size <= len(data) - 8:
            raise ValueError(f"header length {size} does not fit {len(data)} bytes")
        header = json.loads(data[8 : 8 + size])
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("metadata is not an object")
        return {str(k): str(v) for k, v in metadata.items()}
    except (ValueError, AttributeError) as exc:  # JSON and Unicode errors are ValueErrors
        raise StateError(f"not a serialized state: {exc}") from exc
