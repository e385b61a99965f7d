"""Which model wrote a stored state: a hash of the checkpoint's config and weights.

A state is only meaningful to the exact weights that produced it, so stored
sessions carry this identity and a server refuses any written by another.
Our checkpoints list the sha256 of every file in their manifest, so the
identity costs nothing to compute; a foreign folder (mamba-ssm, Hugging
Face) has no manifest and its config and weight files are hashed once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engine.checkpoint import CONFIG, MANIFEST, WEIGHTS, sha256_file

_FOREIGN_WEIGHTS = ("*.safetensors", "*.bin")


def model_identity(checkpoint: str | Path, dtype: str = "float32") -> str:
    """A hex digest naming the weights (and the dtype they run in) of the checkpoint at ``checkpoint``."""
    folder = Path(checkpoint)
    files: dict[str, str] = {}
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        listed = json.loads(manifest_path.read_text(encoding="utf-8")).get("files") or {}
        files = {name: listed[name]["sha256"] for name in (CONFIG, WEIGHTS) if name in listed}
    if not files:
        paths = [folder / CONFIG] + sorted(p for pattern in _FOREIGN_WEIGHTS for p in folder.glob(pattern))
        files = {p.name: sha256_file(p) for p in paths if p.is_file()}
    text = json.dumps({"files": files, "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()
