"""Tokenizers: a byte-level default and Hugging Face ``tokenizer.json`` files.

Both expose the same small interface (:class:`Tokenizer`). Streaming goes
through :class:`IncrementalDecoder`, which holds back the bytes of a UTF-8
character until it is complete, so a multi-byte character split across
tokens is never emitted as replacement characters.
"""

from __future__ import annotations

import codecs
import json
import re
from pathlib import Path
from typing import Protocol

# Byte-level vocabulary: ids 0..255 are the bytes, then these specials.
BYTE_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, add_bos: bool = False) -> list[int]: ...

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a token stands for, or None for a special/unknown id."""
        ...

    def decode(self, ids: list[int]) -> str: ...

    def special_id(self, name: str) -> int | None: ...

    def token_repr(self, token_id: int) -> str: ...


class ByteTokenizer:
    """256 byte ids plus a few specials; any text round-trips exactly."""

    def __init__(self, specials: tuple[str, ...] = BYTE_SPECIALS):
        self.specials = list(specials)
        self._special_ids = {name: 256 + i for i, name in enumerate(self.specials)}
        self.vocab_size = 256 + len(self.specials)
        self.bos_id = self._special_ids.get("<|bos|>")
        self.eos_id = self._special_ids.get("<|eos|>")

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def token_bytes(self, token_id: int) -> bytes | None:
        return bytes((token_id,)) if 0 <= token_id < 256 else None

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def special_id(self, name: str) -> int | None:
        return self._special_ids.get(name)

    def token_repr(self, token_id: int) -> str:
        """A printable form of one token (a byte that is part of a character shows as U+FFFD)."""
        if 0 <= token_id < 256:
            return bytes((token_id,)).decode("utf-8", errors="replace")
        if 256 <= token_id < self.vocab_size:
            return self.specials[token_id - 256]
        return f"<|id:{token_id}|>"



class HFTokenizer:
    """A ``tokenizer.json`` through the ``tokenizers`` library.

    For streaming, each id maps to the bytes it stands for, computed once per
    id: byte-level BPE (GPT-2/NeoX, what Mamba checkpoints ship) through the
    byte-to-unicode table; SentencePiece-style vocabularies through their
    ``\u2581`` space marker and ``<0xNN>`` byte-fallback tokens.
    """

    def __init__(self, path: str | Path, eos_token: str | None = None, bos_token: str | None = None):
        from tokenizers import Tokenizer as _HFTok

        self._tok = _HFTok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        self.eos_token, self.bos_token = eos_token or "", bos_token or ""
        self.eos_id = self._tok.token_to_id(eos_token) if eos_token else None
        self.bos_id = self._tok.token_to_id(bos_token) if bos_token else None
        self._bytes_cache: dict[int, bytes | None] = {}
        self._byte_level = _is_byte_level(Path(path))

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def token_bytes(self, token_id: int) -> bytes | None:
        if token_id in self._bytes_cache:
            return self._bytes_cache[token_id]
        token = self._tok.id_to_token(token_id)
        if token is None or token in self._special:
            out = None
        elif self._byte_level:
            out = bytes(_GPT2_UNICODE_TO_BYTE[ch] for ch in token if ch in _GPT2_UNICODE_TO_BYTE)
        elif _BYTE_FALLBACK.fullmatch(token):
            out = bytes((int(token[3:5], 16),))
        else:  # SentencePiece convention: "▁" marks a space
            out = token.replace("▁", " ").encode("utf-8")
        self._bytes_cache[token_id] = out
        return out

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def special_id(self, name: str) -> int | None:
        return self._tok.token_to_id(name)

    def token_repr(self, token_id: int) -> str:
        data = self.token_bytes(token_id)
        if data is not None:
            return data.decode("utf-8", errors="replace")
        return self._tok.id_to_token(token_id) or f"<|id:{token_id}|>"


def _gpt2_byte_map() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 bytes, inverted."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars)}


_GPT2_UNICODE_TO_BYTE = _gpt2_byte_map()
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _is_byte_level(path: Path) -> bool:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    decoder = spec.get("decoder") or {}
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) if isinstance(d, dict)}
    return "ByteLevel" in kinds


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces that are always valid UTF-8.

    Bytes of an unfinished character are held until the character completes;
    bytes that can never form a character come out as U+FFFD, once.
    Special tokens yield no text (:meth:`push` returns "").
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        data = self._tok.token_bytes(token_id)
        return self._utf8.decode(data) if data else ""

    def flush(self) -> str:
        """Text still held at the end of the stream (a truncated character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def load_tokenizer(checkpoint_dir: str | Path | None) -> Tokenizer:
    """The tokenizer a checkpoint ships (``tokenizer.json``), else the byte-level one.

    BOS/EOS names come from ``tokenizer_config.json`` when present.
    """
    if checkpoint_dir is not None:
        path = Path(checkpoint_dir) / "tokenizer.json"
        if path.is_file():
            names: dict[str, str | None] = {"bos_token": None, "eos_token": None}
            cfg_path = Path(checkpoint_dir) / "tokenizer_config.json"
            if cfg_path.is_file():
                try:
                    raw = json.loads(cfg_path.read_text(encoding="utf-8"))
                except ValueError:
                    raw = {}
                for key in names:
                    value = raw.get(key)
                    names[key] = value.get("content") if isinstance(value, dict) else value
            return HFTokenizer(path, eos_token=names["eos_token"], bos_token=names["bos_token"])
    return ByteTokenizer()
