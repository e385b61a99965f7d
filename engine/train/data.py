"""Training text: prepared offline from a Debian package, split deterministically.

The default corpus is the reStructuredText sources of the Python 3.11
documentation (Debian package ``python3.11-doc``, PSF licence): about 11 MB
of English technical prose. Preparation downloads the package with
``apt-get download`` (a package registry, never at serve time), unpacks it,
and writes ``train.bin`` / ``val.bin`` (raw UTF-8 bytes) plus ``data.json``
naming the source, licence, split rule and sizes. Files go to the held-out
split by a hash of their path, so the split never depends on file order.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SOURCE = {
    "package": "python3.11-doc",
    "files": "usr/share/doc/python3.11/html/_sources/**/*.rst.txt",
    "licence": "PSF-2.0 (Python Software Foundation License)",
}
VAL_PERCENT = 2


def held_out(relative_path: str) -> bool:
    return int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 100 < VAL_PERCENT


def prepare(out_dir: Path, deb: Path | None = None) -> dict:
    """Write train.bin, val.bin and data.json under ``out_dir``; returns the record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if deb is None:
            subprocess.run(["apt-get", "download", SOURCE["package"]], cwd=tmp_path, check=True,
                           stdout=subprocess.DEVNULL)
            deb = next(tmp_path.glob(f"{SOURCE['package']}_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(tmp_path / "root")], check=True)
        root = tmp_path / "root" / "usr/share/doc/python3.11/html/_sources"
        files = sorted(p for p in root.rglob("*.rst.txt"))
        train, val = bytearray(), bytearray()
        for path in files:
            rel = str(path.relative_to(root))
            (val if held_out(rel) else train).extend(path.read_bytes() + b"\n\n")
        package_version = deb.name.split("_")[1]
    (out_dir / "train.bin").write_bytes(bytes(train))
    (out_dir / "val.bin").write_bytes(bytes(val))
    record = {**SOURCE, "package_version": package_version, "documents": len(files),
              "split": f"a file is held out when sha256(path) % 100 < {VAL_PERCENT}",
              "train_bytes": len(train), "val_bytes": len(val)}
    (out_dir / "data.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def load_split(data_dir: Path, split: str) -> np.ndarray:
    return np.frombuffer((data_dir / f"{split}.bin").read_bytes(), dtype=np.uint8)


def windows(data: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Rows of ``length`` bytes of ``data`` from each start, as int64 token ids."""
    return np.stack([data[s : s + length] for s in starts]).astype(np.int64)


def sample_windows(text: np.ndarray, stream: np.ndarray | None, count: int, length: int, stream_fraction: float,
                   gen: np.random.Generator) -> np.ndarray:
    """``count`` random windows of ``length`` bytes of ``text``, each replaced by a window of ``stream``
    (the generated problems) with probability ``stream_fraction``: the training mix of every stage."""
    rows = windows(text, gen.integers(0, len(text) - length - 1, size=count), length)
    is_task = gen.random(count) < stream_fraction
    if stream is not None and is_task.any():
        rows[is_task] = windows(stream, gen.integers(0, len(stream) - length - 1, size=int(is_task.sum())), length)
    return rows
