"""Backbone training stage: the loss falls, a run resumes where it stopped, the result loads and generates."""

import json

import numpy as np
import torch

from engine.checkpoint import load_model
from engine.train.backbone import BackboneConfig, _load_state, train
from engine.train.data import held_out


def tiny_data(folder):
    folder.mkdir()
    text = ("the quick brown fox jumps over the lazy dog. " * 400).encode()
    (folder / "train.bin").write_bytes(text)
    (folder / "val.bin").write_bytes(text[:4000])
    (folder / "data.json").write_text(json.dumps({"source": "test"}))
    return folder


def config(tmp_path, data, steps, **kw):
    return BackboneConfig(data_dir=str(data), out_dir=str(tmp_path / "run"), model={"d_model": 16, "n_layer": 1},
                          seq_len=32, batch_size=4, steps=steps, lr=1e-2, min_lr=1e-3, warmup=2, eval_every=5,
                          eval_batches=2, save_every=5, threads=1, **kw)


def read_metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_checkpoint_serves(tmp_path):
    data = tiny_data(tmp_path / "data")
    ckpt = train(config(tmp_path, data, steps=30))
    rows = read_metrics(tmp_path)
    assert np.mean([r["loss"] for r in rows[-5:]]) < np.mean([r["loss"] for r in rows[:5]]) - 0.5
    loaded = load_model(ckpt)
    assert loaded.manifest["record"]["stage"] == "backbone" and loaded.manifest["record"]["val_bits_per_byte"] > 0
    with torch.inference_mode():
        logits, state = loaded.model.prefill(torch.tensor([loaded.tokenizer.encode("the quick")]))
        assert loaded.model.step(logits.argmax(-1), state).shape == (1, loaded.tokenizer.vocab_size)


def test_resume_continues_from_the_saved_step_and_optimizer_state(tmp_path):
    data = tiny_data(tmp_path / "data")
    train(config(tmp_path, data, steps=10))
    first = read_metrics(tmp_path)
    assert [r["step"] for r in first] == list(range(1, 11))
    # The saved optimizer moments are what a resumed run starts from.
    from engine import MambaConfig, MambaLMHeadModel
    from engine.tokenizer import ByteTokenizer

    model = MambaLMHeadModel(MambaConfig(vocab_size=ByteTokenizer().vocab_size, d_model=16, n_layer=1))
    opt = torch.optim.AdamW(model.parameters())
    assert _load_state(tmp_path / "run", model, opt) == 10
    assert all(float(s["step"]) == 10 for s in opt.state.values()) and len(opt.state) == len(list(model.parameters()))
    train(config(tmp_path, data, steps=15))
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 16))


def test_held_out_split_is_deterministic():
    names = [f"library/mod{i}.rst.txt" for i in range(500)]
    assert [held_out(n) for n in names] == [held_out(n) for n in names]
    assert 0 < sum(held_out(n) for n in names) < 30
