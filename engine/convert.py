"""Convert a mamba-ssm (Mamba1 / Mamba2) or Hugging Face (Mamba, Falcon-Mamba, Mamba-2) folder into a CRSM
checkpoint, or verify one.

    python -m engine.convert SRC DST [--dtype float32|bfloat16|float16]
    python -m engine.convert --verify DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from engine.checkpoint import DTYPES, CheckpointError, detect_format, load_model, save_checkpoint, verify_checkpoint
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def convert(src: Path, dst: Path, dtype: torch.dtype | None = None) -> Path:
    """Load ``src`` (any supported format) and write it to ``dst`` in ours."""
    fmt = detect_format(src)
    loaded = load_model(src, dtype=dtype)
    extra = {name: src / name for name in TOKENIZER_FILES if (src / name).is_file()}
    return save_checkpoint(
        loaded.model,
        dst,
        producer={"tool": "engine.convert", "source": str(src.resolve()), "source_format": fmt},
        extra_files=extra,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.convert",
        description="Convert a mamba-ssm (config.json + pytorch_model.bin or safetensors) or Hugging Face "
        "MambaForCausalLM folder into a CRSM checkpoint (config.json, model.safetensors, manifest.json "
        "with sha256 of every file). No pickle is executed: torch files are read with weights_only=True.",
    )
    parser.add_argument("src", type=Path, nargs="?", help="source folder (format is detected)")
    parser.add_argument("dst", type=Path, nargs="?", help="destination folder (written atomically)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast weights (A_log and D stay float32)")
    parser.add_argument("--force", action="store_true", help="replace an existing destination")
    parser.add_argument("--verify", type=Path, metavar="DIR", help="only verify the hashes of a CRSM checkpoint")
    args = parser.parse_args(argv)
    try:
        if args.verify is not None:
            manifest = verify_checkpoint(args.verify)
            print(f"ok: {args.verify} ({len(manifest['files'])} files verified)")
            return 0
        if args.src is None or args.dst is None:
            parser.error("SRC and DST are required unless --verify is given")
        if args.dst.exists() and not args.force:
            parser.error(f"{args.dst} exists; pass --force to replace it")
        out = convert(args.src, args.dst, DTYPES.get(args.dtype) if args.dtype else None)
        print(f"wrote {out}")
        return 0
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
