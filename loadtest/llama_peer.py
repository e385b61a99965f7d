"""llama.cpp as a peer of the engine benchmark: same weights, converted to GGUF, run by its own bench tools.

Found as ``--llama-bench PATH``, ``$CRSM_LLAMA_BENCH`` or ``llama-bench`` on PATH; ``llama-quantize`` and
``llama-batched-bench`` are looked for beside it, ``convert_hf_to_gguf.py`` (with its ``gguf-py``) in
``--llama-src`` / ``$CRSM_LLAMA_SRC``. Nothing here is needed for the benchmark to run: without them the peer
is reported as absent with the reason.

- decode b1 and prefill: ``llama-bench -n N -p 512,2048`` (``tg`` and ``pp`` tests, tokens/s);
- batched decode: ``llama-batched-bench -npl 8,32`` (``speed_tg``: all sequences' tokens per second).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LlamaTools:
    bench: Path
    quantize: Path | None
    batched: Path | None
    src: Path | None

    def version(self) -> str:
        out = subprocess.run([str(self.bench), "--version"], check=False, capture_output=True, text=True, timeout=60)
        text = (out.stdout + out.stderr).strip()
        return " ".join(text.splitlines()[-2:]) if text else "unknown"


def find_tools(bench: str | None, src: str | None) -> tuple[LlamaTools | None, str]:
    """The llama.cpp tools, or None and why not."""
    path = bench or os.environ.get("CRSM_LLAMA_BENCH") or shutil.which("llama-bench")
    if not path or not Path(path).is_file():
        return None, "llama-bench not found (--llama-bench, CRSM_LLAMA_BENCH or PATH)"
    folder = Path(path).resolve().parent
    sibling = lambda name: (folder / name) if (folder / name).is_file() else None
    src_path = src or os.environ.get("CRSM_LLAMA_SRC")
    src_dir = Path(src_path) if src_path and (Path(src_path) / "convert_hf_to_gguf.py").is_file() else None
    if src_dir is None:
        return None, "convert_hf_to_gguf.py not found (--llama-src or CRSM_LLAMA_SRC: the llama.cpp source folder)"
    return LlamaTools(Path(path), sibling("llama-quantize"), sibling("llama-batched-bench"), src_dir), ""


def convert(tools: LlamaTools, hf_folder: Path, out_dir: Path) -> dict[str, Path]:
    """The HF folder as GGUF f32 and, when llama-quantize is there, Q8_0."""
    f32 = out_dir / "model-f32.gguf"
    env = {**os.environ, "PYTHONPATH": str(tools.src / "gguf-py")}
    subprocess.run([sys.executable, str(tools.src / "convert_hf_to_gguf.py"), str(hf_folder), "--outfile", str(f32),
                    "--outtype", "f32"], check=True, capture_output=True, env=env, timeout=1800)
    files = {"f32": f32}
    if tools.quantize is not None:
        q8 = out_dir / "model-q8_0.gguf"
        subprocess.run([str(tools.quantize), str(f32), str(q8), "Q8_0"], check=True, capture_output=True,
                       timeout=1800)
        files["q8_0"] = q8
    return files


def run_bench(tools: LlamaTools, gguf: Path, threads: int, decode_tokens: int, prefill: list[int]) -> dict[str, float]:
    """One repetition of llama-bench: tokens/s of decode b1 (``decode_b1``) and ``prefill_N``."""
    cmd = [str(tools.bench), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json",
           "-n", str(decode_tokens), "-p", ",".join(map(str, prefill or [0])), "-b", str(max(prefill or [512]))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
    rates = {}
    for test in json.loads(out.stdout):
        key = f"prefill_{test['n_prompt']}" if test["n_prompt"] else "decode_b1"
        rates[key] = float(test["avg_ts"])
    return rates


def run_batched(tools: LlamaTools, gguf: Path, threads: int, decode_tokens: int, batches: list[int]) -> dict:
    """One repetition of llama-batched-bench: decode tokens/s of all sequences together at each batch size."""
    if tools.batched is None or not batches:
        return {}
    ctx = max(batches) * (decode_tokens + 16)
    cmd = [str(tools.batched), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-c", str(ctx),
           "-b", "2048", "-ub", "512", "-npp", "8", "-ntg", str(decode_tokens), "-npl", ",".join(map(str, batches)),
           "--output-format", "jsonl"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
    rates = {}
    for line in (out.stdout + "\n" + out.stderr).splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            row = json.loads(line)
            rates[f"decode_b{row['pl']}"] = float(row["speed_tg"])
    return rates
