"""Serving a Hugging Face Mamba folder as README's "Serve a real Mamba" says: directly, with its tokenizer.json.

The folder is made by transformers' ``MambaForCausalLM.save_pretrained`` (random weights, a non-byte
vocabulary); without ``tokenizer.json`` the server must refuse to start and name the file, not serve
prompts read as byte ids.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from loadtest.bench_engine import write_byte_level_tokenizer as byte_level_tokenizer_json
from tests.serving import ROOT, complete, ids_request, running_server, token_ids

VOCAB = 1024  # more than twice the byte-level fallback's: a model that needs its own tokenizer


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                                   conv_kernel=4)
    hf = transformers.MambaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("hf") / "mamba-hf"
    hf.save_pretrained(folder)
    return folder, hf


def test_a_folder_without_its_tokenizer_is_refused_naming_the_file(hf_folder):
    folder, _ = hf_folder
    done = subprocess.run([sys.executable, "-m", "server", "--checkpoint", str(folder), "--planner-workers", "0",
                           "--port", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert f"{folder / 'tokenizer.json'} is missing" in done.stderr
    assert f"vocabulary of {VOCAB} tokens" in done.stderr


def test_a_folder_with_its_tokenizer_is_served_directly(hf_folder, tmp_path):
    folder, hf = hf_folder
    served = tmp_path / "with-tokenizer"
    served.mkdir()
    for item in folder.iterdir():
        (served / item.name).write_bytes(item.read_bytes())
    byte_level_tokenizer_json(served / "tokenizer.json")
    prompt = [72, 101, 108, 108, 111]  # "Hello" in the byte-level BPE's ids
    with torch.inference_mode():
        expected = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                               max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    with running_server(served) as url:
        assert token_ids(complete(url, **ids_request(prompt, 8))) == expected
