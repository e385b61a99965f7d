"""A session as bytes: what the directory and Redis stores keep, checked whole before anything is loaded.

Layout: ``MAGIC`` (8 bytes), the sha256 of the body (32 bytes), then the body:
a 4-byte little-endian header length, the header (JSON: record format,
model identity, id, owner, token counts, pending tokens, metadata, created)
and the state's own bytes (:meth:`engine.state.MambaState.to_bytes`, whose
header again names the format, the model, dtypes and shapes; absent for a
session that has consumed nothing yet).

Decoding refuses, with a message saying why, bytes that are not a record,
whose checksum fails (corrupt, truncated), of another record format, or
written by another model or for another state shape: a refused state is
never loaded. The owner is readable without the rest (:func:`peek_owner`),
so a store answers "not found" to another owner before judging the bytes.
"""

from __future__ import annotations

import hashlib
import json

import torch

from engine.sessions.base import Session, SessionStateInvalid
from engine.state import MambaState, StateError, StateShape

MAGIC = b"CRSMSESS"
RECORD_FORMAT = "crsm-session/1"
_DIGEST = 32
_UNKNOWN = object()


def encode_session(session: Session, model_id: str, shape: StateShape | None = None,
                   state_dtype: torch.dtype | None = None) -> bytes:
    """The record of ``session``, its state serialized with ``model_id`` as the writer and ``shape``'s arch; the
    SSM part in ``state_dtype`` when given (a store's ``--state-dtype``)."""
    arch = shape.arch if shape is not None else ""
    state = session.state
    state_bytes = state.to_bytes(model_id, arch=arch, ssm_dtype=state_dtype) if state is not None else b""
    header = {
        "format": RECORD_FORMAT, "model": model_id, "id": session.id, "owner": session.owner,
        "n_tokens": session.n_tokens, "pending": list(session.pending), "metadata": session.metadata,
        "created": session.created,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    body = len(head).to_bytes(4, "little") + head + state_bytes
    return MAGIC + hashlib.sha256(body).digest() + body


def _split(blob: bytes) -> tuple[dict, bytes]:
    """(header, state bytes) of a record whose checksum holds; :class:`SessionStateInvalid` otherwise."""
    if len(blob) < len(MAGIC) + _DIGEST + 4 or not blob.startswith(MAGIC):
        raise SessionStateInvalid("the stored bytes are not a CRSM session record")
    body = memoryview(blob)[len(MAGIC) + _DIGEST :]
    if hashlib.sha256(body).digest() != blob[len(MAGIC) : len(MAGIC) + _DIGEST]:
        raise SessionStateInvalid("the stored session is corrupt (its checksum does not match)")
    size = int.from_bytes(body[:4], "little")
    try:
        header = json.loads(bytes(body[4 : 4 + size]))
    except ValueError as exc:
        raise SessionStateInvalid(f"the stored session's header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise SessionStateInvalid("the stored session's header is not a JSON object")
    return header, bytes(body[4 + size :])


def peek_owner(blob: bytes) -> object:
    """The owner a record names, or an opaque marker when the bytes are too damaged to tell."""
    try:
        return _split(blob)[0].get("owner", _UNKNOWN)
    except SessionStateInvalid:
        return _UNKNOWN


def owned_by(blob: bytes, owner: str | None) -> bool:
    """Whether ``owner`` may see the record: its own, or a damaged one (so it can be reported and deleted)."""
    found = peek_owner(blob)
    return found is _UNKNOWN or found == owner


def decode_session(blob: bytes, shape: StateShape, model_id: str, device: torch.device | str | None = None,
                   expect_id: str | None = None) -> Session:
    """The session in ``blob``, every check passed; :class:`SessionStateInvalid` saying why otherwise."""
    header, state_bytes = _split(blob)
    if header.get("format") != RECORD_FORMAT:
        raise SessionStateInvalid(f"the stored session has format {header.get('format')!r}; this server reads "
                                  f"{RECORD_FORMAT!r}")
    if header.get("model") != model_id:
        raise SessionStateInvalid(f"the stored session was written by another model (model "
                                  f"{str(header.get('model'))[:12]!r}; this server's is {model_id[:12]!r})")
    if expect_id is not None and header.get("id") != expect_id:
        raise SessionStateInvalid(f"the stored record is session {header.get('id')!r}, not {expect_id!r}")
    try:
        state = MambaState.from_bytes(state_bytes, shape, device, model_id=model_id) if state_bytes else None
        return Session(id=str(header["id"]), owner=header["owner"], state=state,
                       pending=[int(t) for t in header["pending"]], n_tokens=int(header["n_tokens"]),
                       created=float(header["created"]), metadata=dict(header["metadata"]))
    except StateError as exc:
        raise SessionStateInvalid(f"the stored session's state is refused: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise SessionStateInvalid(f"the stored session's header is incomplete: {type(exc).__name__}: {exc}") from None
