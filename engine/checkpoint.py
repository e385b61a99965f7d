"""Checkpoints: one on-disk format, verified on load, written atomically.

A checkpoint is a directory with

- ``config.json``: the model config (mamba-ssm field names);
- ``model.safetensors``: every tensor (a tied ``lm_head`` is not stored);
- ``manifest.json``: format version, size and sha256 of every other file,
  what produced the checkpoint and its training record;
- optionally ``tokenizer.json`` and other files listed in the manifest.

Loading verifies the folder as a whole before reading anything: every file
in it must be listed in the manifest with its size and hash (an unlisted
file, a pickle beside the weights say, is refused by name), and nothing is
ever unpickled. :func:`load_model` also reads mamba-ssm folders
(``config.json`` + ``pytorch_model.bin`` via ``weights_only=True``, or
safetensors; ``ssm_cfg.layer`` Mamba1 or Mamba2) and Hugging Face
``MambaForCausalLM``, ``FalconMambaForCausalLM`` and ``Mamba2ForCausalLM``
folders; those carry no
hashes, so they load as *unverified* (logged, and reported by the server).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from engine.config import HF_ARCHITECTURES, HF_MODEL_TYPES, MambaConfig
from engine.models import MambaLMHeadModel
from engine.text.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

FORMAT_NAME = "crsm-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FP32_PARAMS = ("A_log", "D")  # kept in float32 whatever the model dtype, as in mamba-ssm
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or of an unknown kind; the message names the file."""


@dataclass
class LoadedModel:
    model: MambaLMHeadModel
    tokenizer: Tokenizer
    source_format: str  # "crsm", "mamba_ssm" or "hf"
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        """Whether every file was checked against a manifest (ours); foreign folders have none."""
        return self.source_format == "crsm"


# Hashing ------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Saving -------------------------------------------------------------------
def model_tensors(model: MambaLMHeadModel) -> dict[str, Tensor]:
    """The tensors to store: the state dict without a tied lm_head."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def save_checkpoint(
    model: MambaLMHeadModel,
    directory: str | Path,
    *,
    producer: Mapping[str, Any] | None = None,
    record: Mapping[str, Any] | None = None,
    extra_tensors: Mapping[str, Tensor] | None = None,
    extra_files: Mapping[str, bytes | str | Path] | None = None,
) -> Path:
    """Write ``model`` as a checkpoint at ``directory``, atomically.

    Everything is written and fsynced in a temporary sibling directory, which
    is then renamed into place; an existing checkpoint there is replaced only
    after the new one is complete. ``extra_tensors`` (e.g. planner heads) go
    into the same safetensors file; ``extra_files`` are copied and hashed.
    """
    target = Path(directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_contents(tmp, model, extra_tensors or {}, extra_files or {})
        files = sorted(p.name for p in tmp.iterdir())
        for name in files:
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "files": {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)} for name in files},
            "extra_tensors": sorted(extra_tensors or {}),
            "producer": dict(producer or {}),
            "record": dict(record or {}),
        }
        with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(manifest, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_contents(folder: Path, model: MambaLMHeadModel, extra_tensors: Mapping[str, Tensor],
                    extra_files: Mapping[str, bytes | str | Path]) -> None:
    """Weights (model + extra tensors in one safetensors file), config and extra files, unhashed."""
    tensors = model_tensors(model)
    for name, tensor in extra_tensors.items():
        if name in tensors:
            raise CheckpointError(f"extra tensor {name!r} collides with a model tensor")
        tensors[name] = tensor.detach().contiguous().cpu()
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": FORMAT_NAME})
    config = {**model.config.to_dict(), "crsm_format_version": FORMAT_VERSION}
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    for name, content in extra_files.items():
        if "/" in name or name in (MANIFEST, CONFIG, WEIGHTS):
            raise CheckpointError(f"invalid extra file name {name!r}")
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            shutil.copyfile(content, folder / name)


def _replace_dir(complete: Path, target: Path) -> None:
    """Rename ``complete`` to ``target``; an existing ``target`` is replaced only once the new one is in place."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        old.rmdir()
        target.rename(old)
        complete.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        complete.rename(target)
    _fsync_dir(target.parent)


# Verifying and loading our format ----------------------------------------
def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing manifest") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a {FORMAT_NAME} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {manifest.get('format_version')!r}, this engine reads {FORMAT_VERSION}"
        )
    return manifest


def verify_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Check the folder as a whole: every file in it is listed, every listed file has its size and sha256.

    Returns the manifest. Hidden entries (names starting with a dot) are ignored: the loader never reads them.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    files = manifest.get("files") or {}
    for required in (CONFIG, WEIGHTS):
        if required not in files:
            raise CheckpointError(f"{directory / MANIFEST}: does not list {required}")
    unlisted = sorted(p.name for p in directory.iterdir()
                      if p.name != MANIFEST and not p.name.startswith(".") and p.name not in files)
    if unlisted:
        raise CheckpointError(f"{directory / unlisted[0]}: not listed in {MANIFEST} (a checkpoint is verified as a "
                              f"whole; remove the file or save the checkpoint again with it)")
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != meta.get("bytes"):
            raise CheckpointError(f"{path}: {size} bytes, manifest says {meta.get('bytes')} (truncated or replaced)")
        if sha256_file(path) != meta.get("sha256"):
            raise CheckpointError(f"{path}: sha256 does not match the manifest (file is corrupted or was modified)")
    return manifest


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def detect_format(directory: str | Path) -> str:
    """"crsm" (ours), "hf" (MambaForCausalLM, FalconMambaForCausalLM, Mamba2ForCausalLM) or "mamba_ssm"."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if (directory / MANIFEST).is_file():
        return "crsm"
    config = _read_json(directory / CONFIG)
    if "crsm_format_version" in config:
        raise CheckpointError(f"{directory / MANIFEST}: missing (a CRSM checkpoint is never loaded unverified)")
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    if model_type in HF_MODEL_TYPES or any(a in HF_ARCHITECTURES for a in architectures):
        return "hf"
    if model_type is not None:  # a Hugging Face config of another family: name what it is
        raise CheckpointError(f"{directory / CONFIG}: model_type {model_type!r} is not served "
                              f"(served: {', '.join(HF_MODEL_TYPES)}, mamba-ssm Mamba1 / Mamba2 folders and ours)")
    if "d_model" in config and "n_layer" in config:
        return "mamba_ssm"
    raise CheckpointError(f"{directory / CONFIG}: neither a CRSM, mamba-ssm nor Hugging Face Mamba config")


def _read_weights(directory: Path) -> dict[str, Tensor]:
    """Tensors of a foreign folder: safetensors (single or sharded) or a weights-only torch file."""
    single = directory / WEIGHTS
    index = directory / "model.safetensors.index.json"
    pt = directory / "pytorch_model.bin"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            tensors: dict[str, Tensor] = {}
            for shard in shards:
                tensors.update(load_file(str(directory / shard)))
            return tensors
        if pt.is_file():
            loaded = torch.load(pt, map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict):
                raise CheckpointError(f"{pt}: expected a state dict")
            return loaded
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors/torch raise many kinds for damaged files
        raise CheckpointError(f"{directory}: could not read weights ({exc})") from exc
    raise CheckpointError(f"{directory}: no model.safetensors, sharded safetensors or pytorch_model.bin")


def normalize_state_dict(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename foreign keys to ours (HF ``embeddings`` -> ``embedding``; drop known prefixes)."""
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if key.startswith("model."):
            key = key[len("model.") :]
        key = key.replace("backbone.embeddings.", "backbone.embedding.")
        out[key] = value
    return out


def build_model(
    config: MambaConfig,
    tensors: Mapping[str, Tensor],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    source: str = "checkpoint",
) -> MambaLMHeadModel:
    """A model from a config and a (normalised) state dict, with clear errors on mismatch."""
    tensors = dict(tensors)
    emb = tensors.get("backbone.embedding.weight")
    if emb is None:
        raise CheckpointError(f"{source}: no backbone.embedding.weight (or backbone.embeddings.weight)")
    head = tensors.get("lm_head.weight")
    if config.tie_embeddings and head is not None and not torch.equal(head, emb):
        config.tie_embeddings = False  # the file holds a separate head: keep it
    if not config.tie_embeddings and head is None:
        raise CheckpointError(f"{source}: untied embeddings but no lm_head.weight")
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    if dtype is None:
        dtype = emb.dtype if emb.dtype.is_floating_point else torch.float32
    model = MambaLMHeadModel(config, device="meta", dtype=dtype)
    expected = model.state_dict()
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: missing tensors {missing[:8]} unexpected tensors {unexpected[:8]}")
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: {name} has shape {tuple(tensors[name].shape)}, config implies {tuple(ref.shape)}"
            )
    converted = {
        k: v.to(device=device, dtype=torch.float32 if k.rsplit(".", 1)[-1] in FP32_PARAMS else dtype)
        for k, v in tensors.items()
    }
    model.load_state_dict(converted, strict=not config.tie_embeddings, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    return model.eval()


def load_model(
    directory: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
) -> LoadedModel:
    """Load any supported folder (detected); our format is verified first. ``dtype`` may be a name in DTYPES.

    ``quantize`` ("none", "bf16", "int8"): weight-only linear layers over a float32 model (see engine/quant.py).
    """
    from engine.quant import check_mode, quantize_model

    directory = Path(directory)
    try:
        quantize = check_mode(quantize)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if quantize != "none" and dtype not in (None, "float32", torch.float32):
        raise CheckpointError(f"quantize {quantize} runs over float32 activations: use it with dtype float32, "
                              f"not {dtype}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    fmt = detect_format(directory)
    manifest: dict[str, Any] = {}
    if fmt == "crsm":
        manifest = verify_checkpoint(directory)
        config = MambaConfig.from_dict(_read_json(directory / CONFIG))
        try:
            tensors = load_file(str(directory / WEIGHTS))
        except Exception as exc:
            raise CheckpointError(f"{directory / WEIGHTS}: unreadable safetensors ({exc})") from exc
        for name in manifest.get("extra_tensors", []):
            tensors.pop(name, None)
    elif fmt == "hf":
        config = MambaConfig.from_hf_dict(_read_json(directory / CONFIG))
        tensors = normalize_state_dict(_read_weights(directory))
    else:
        config = MambaConfig.from_dict(_read_json(directory / CONFIG))
        tensors = normalize_state_dict(_read_weights(directory))
    if quantize != "none":
        dtype = torch.float32
    model = build_model(config, tensors, device=device, dtype=dtype, source=str(directory))
    try:
        quantize_model(model, quantize)
    except ValueError as exc:  # e.g. a CUDA device: the int8/bf16 kernels here are CPU ones
        raise CheckpointError(f"{directory}: {exc}") from None
    if fmt != "crsm":
        log.warning("%s: %s folder loaded UNVERIFIED (no manifest with hashes; `python -m engine.convert` writes "
                    "a verified copy)", directory, fmt)
    tokenizer = load_tokenizer(directory)
    if isinstance(tokenizer, ByteTokenizer) and config.vocab_size > 2 * tokenizer.vocab_size:
        # Without this, a BPE model would read prompts as byte ids and answer with ids the byte tokenizer drops.
        raise CheckpointError(
            f"{directory / 'tokenizer.json'} is missing: the model has a vocabulary of {config.vocab_size} tokens, "
            f"not a byte-level one, so it needs its own tokenizer. Copy the model's tokenizer.json into the folder "
            f"(state-spaces/mamba-* models use EleutherAI/gpt-neox-20b's; the state-spaces/mamba-*-hf folders "
            f"ship it)")
    return LoadedModel(model=model, tokenizer=tokenizer, source_format=fmt, manifest=manifest)
