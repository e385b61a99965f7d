"""The recurrent state of Mamba sequences: what a session caches.

A :class:`MambaState` holds, for a batch of ``b`` sequences, every layer's

- ``conv``: (n_layer, b, d_inner, d_conv), the last inputs of the causal
  conv, newest at index -1 (mamba-ssm's layout);
- ``ssm``: (n_layer, b, d_inner, d_state), the SSM hidden state, always
  float32 because it integrates over the whole history.

A single sequence is a state with ``b == 1``. Its size does not grow with
the history, which is why a session can continue without re-reading it.
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

    def zeros(self, batch: int, device: torch.device | str | None = None) -> "MambaState":
        return MambaState(
            conv=torch.zeros(self.n_layer, batch, self.d_inner, self.d_conv, dtype=self.conv_dtype, device=device),
            ssm=torch.zeros(self.n_layer, batch, self.d_inner, self.d_state, dtype=self.ssm_dtype, device=device),
        )

    def check(self, state: "MambaState") -> None:
        """Raise :class:`StateError` unless ``state`` has this layout."""
        b = state.conv.shape[1] if state.conv.dim() == 4 else -1
        want_conv = (self.n_layer, b, self.d_inner, self.d_conv)
        want_ssm = (self.n_layer, b, self.d_inner, self.d_state)
        if tuple(state.conv.shape) != want_conv or tuple(state.ssm.shape) != want_ssm:
            raise StateError(
                f"state shapes conv={tuple(state.conv.shape)} ssm={tuple(state.ssm.shape)} "
                f"do not fit the model (conv (n_layer, b, d_inner, d_conv)={want_conv}, ssm={want_ssm})"
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
    def to_bytes(self, model_id: str = "") -> bytes:
        """safetensors bytes, no pickle; the header records format, ``model_id`` (who wrote it), dtypes and shapes."""
        return st_save(
            {"conv": self.conv.detach().contiguous().cpu(), "ssm": self.ssm.detach().contiguous().cpu()},
            metadata={"format": STATE_FORMAT, "model": model_id},
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
        try:
            tensors = st_load(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:  # safetensors raises several kinds
            raise StateError(f"not a serialized state: {exc}") from exc
        if set(tensors) != {"conv", "ssm"}:
            raise StateError(f"serialized state has tensors {sorted(tensors)}, expected ['conv', 'ssm']")
        state = cls(tensors["conv"], tensors["ssm"])
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
