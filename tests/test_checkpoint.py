"""Checkpoint format: round trip, verification, atomic writes, no pickle, foreign folders, CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint import CheckpointError, load_model, save_checkpoint, verify_checkpoint
from engine.convert import main as convert_main
from tests.conftest import make_model

ROOT = Path(__file__).resolve().parents[1]


def logits_of(model, ids=None):
    ids = torch.arange(20).view(1, 20) if ids is None else ids
    with torch.no_grad():
        return model(ids)[0]


def test_round_trip(tmp_path):
    model = make_model(tie_embeddings=False)
    path = save_checkpoint(model, tmp_path / "ckpt", producer={"by": "test"}, record={"steps": 3},
                           extra_files={"notes.txt": b"hello"})
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "notes.txt"}
    assert manifest["format_version"] == 1 and manifest["record"] == {"steps": 3}
    loaded = load_model(path)
    assert loaded.source_format == "crsm"
    assert torch.equal(logits_of(loaded.model), logits_of(model))
    assert not loaded.model.config.tie_embeddings


def test_tied_head_is_stored_once_and_retied(tmp_path):
    model = make_model()
    path = save_checkpoint(model, tmp_path / "c")
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))
    loaded = load_model(path).model
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight
    assert torch.equal(logits_of(loaded), logits_of(model))


def test_flipped_byte_is_refused_naming_the_file(tmp_path):
    path = save_checkpoint(make_model(), tmp_path / "c")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*sha256"):
        load_model(path)


def test_truncated_file_and_missing_manifest_are_refused(tmp_path):
    path = save_checkpoint(make_model(), tmp_path / "c")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors.*bytes"):
        verify_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest"):
        load_model(path)


def test_failed_save_leaves_the_old_checkpoint_and_no_temp_dirs(tmp_path):
    model = make_model()
    path = save_checkpoint(model, tmp_path / "c")
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(FileNotFoundError):
        save_checkpoint(make_model(seed=9), path, extra_files={"x.txt": tmp_path / "does-not-exist"})
    assert (path / "model.safetensors").read_bytes() == before
    verify_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    save_checkpoint(make_model(seed=9), path)  # replacing works and is verified
    assert (path / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def test_pickle_payload_is_never_executed(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    _Exploit.marker = tmp_path / "pwned"
    (folder / "config.json").write_text(json.dumps({"d_model": 8, "n_layer": 1, "vocab_size": 16}))
    torch.save({"backbone.embedding.weight": _Exploit()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError):
        load_model(folder)
    assert not _Exploit.marker.exists()


def test_mamba_ssm_folder_with_padded_vocab(tmp_path):
    """mamba-ssm stores padded embeddings and both tied keys in pytorch_model.bin."""
    model = make_model(vocab_size=250, pad_vocab_size_multiple=8)
    folder = tmp_path / "mamba_ssm"
    folder.mkdir()
    cfg = model.config.to_dict()
    cfg.pop("extra", None)
    cfg["fused_add_norm"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    loaded = load_model(folder)
    assert loaded.source_format == "mamba_ssm"
    assert loaded.model.backbone.embedding.weight.shape[0] == 256
    assert torch.equal(logits_of(loaded.model), logits_of(model))


def test_wrong_shapes_are_named(tmp_path):
    model = make_model()
    folder = tmp_path / "bad"
    folder.mkdir()
    cfg = model.config.to_dict()
    cfg["d_model"] = 48
    (folder / "config.json").write_text(json.dumps(cfg))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="shape"):
        load_model(folder)


def test_convert_cli_from_hf_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=64, hidden_size=16, state_size=4,
                                                                num_hidden_layers=2)).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    assert convert_main(["--verify", str(tmp_path / "out")]) == 0
    loaded = load_model(tmp_path / "out")
    assert loaded.manifest["producer"]["source_format"] == "hf"
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        assert (loaded.model(ids)[0] - hf(ids).logits).abs().max() < 1e-4
    with pytest.raises(SystemExit):  # an existing destination needs --force
        convert_main([str(tmp_path / "hf"), str(tmp_path / "out")])
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "out"), "--force"]) == 0


def test_convert_cli_help_and_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "engine.convert", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--verify" in out.stdout
    (tmp_path / "empty").mkdir()
    assert convert_main([str(tmp_path / "empty"), str(tmp_path / "o")]) == 1


# The tamper matrix: every change to a verified folder is refused, naming the file ---------------------------
def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


TAMPERING = {
    "flipped weights": (lambda c: _flip(c / "model.safetensors"), r"model\.safetensors: sha256"),
    "flipped config": (lambda c: (c / "config.json").write_text((c / "config.json").read_text() + " "),
                       r"config\.json: .*bytes"),
    "flipped listed extra": (lambda c: _flip(c / "planner.json"), r"planner\.json: sha256"),
    "truncated weights": (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:-7]),
                          r"model\.safetensors: \d+ bytes"),
    "listed file removed": (lambda c: (c / "planner.json").unlink(), r"planner\.json: listed in the manifest but missing"),
    "unlisted tokenizer": (lambda c: (c / "tokenizer.json").write_text("{broken"), r"tokenizer\.json: not listed"),
    "pickle beside the weights": (lambda c: torch.save({"x": _Exploit()}, c / "pytorch_model.bin"),
                                  r"pytorch_model\.bin: not listed"),
    "manifest hash edited": (lambda c: _edit_manifest(c, lambda m: m["files"]["config.json"].update(sha256="0" * 64)),
                             r"config\.json: sha256"),
    "manifest entry dropped": (lambda c: _edit_manifest(c, lambda m: m["files"].pop("planner.json")),
                               r"planner\.json: not listed"),
    "manifest not JSON": (lambda c: (c / "manifest.json").write_text("{"), r"manifest\.json: not valid JSON"),
    "manifest of another version": (lambda c: _edit_manifest(c, lambda m: m.update(format_version=99)),
                                    r"manifest\.json: format version 99"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampered_checkpoint_is_refused_naming_the_file(tmp_path, case):
    tamper, message = TAMPERING[case]
    folder = save_checkpoint(make_model(), tmp_path / "c", extra_files={"planner.json": b'{"config": {}}'})
    load_model(folder)  # intact: loads
    _Exploit.marker = tmp_path / "pwned"
    tamper(folder)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)
    assert not _Exploit.marker.exists()  # no pickle was ever loaded


def test_foreign_folders_load_unverified(tmp_path, caplog):
    folder = tmp_path / "ssm"
    folder.mkdir()
    model = make_model()
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(folder / "model.safetensors"))
    with caplog.at_level("WARNING"):
        loaded = load_model(folder)
    assert loaded.source_format == "mamba_ssm" and not loaded.verified and "UNVERIFIED" in caplog.text
    assert load_model(save_checkpoint(model, tmp_path / "ours")).verified
