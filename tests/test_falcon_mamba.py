"""Falcon-Mamba (``FalconMambaForCausalLM``): the Mamba-1 mixer with weightless RMS norms on dt, B and C.

Random-weight folders made by transformers (no download): prefill and cached decode logits within 1e-4 of
transformers', greedy tokens over HTTP equal ``generate`` (served directly and after ``engine.convert``), a
session continued over HTTP equals one request with the whole history, and the families not served are
refused at load naming the field and its value.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import torch

from engine.checkpoint import CheckpointError, load_model
from engine.config import ConfigError, MambaConfig
from loadtest.bench_engine import write_byte_level_tokenizer
from tests.hf_parity import max_logit_differences, off_the_init
from tests.serving import ROOT, complete, ids_request, running_server, token_ids

transformers = pytest.importorskip("transformers")

VOCAB = 264  # byte-level ids plus a few: the byte-level tokenizer.json of loadtest.bench_engine covers them


def falcon_folder(folder, seed=0, **overrides):
    cfg = dict(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=3, expand=2, conv_kernel=4,
               time_step_rank=4, mixer_rms_eps=1e-6)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.FalconMambaForCausalLM(transformers.FalconMambaConfig(**cfg)).eval()
    off_the_init(model)
    model.generation_config.eos_token_id = None  # every side generates exactly the greedy tokens
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    write_byte_level_tokenizer(folder / "tokenizer.json")
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_prefill_and_decode_logits_match_transformers(tmp_path, tie):
    hf = falcon_folder(tmp_path, tie_word_embeddings=tie)
    loaded = load_model(tmp_path)
    model = loaded.model
    assert loaded.source_format == "hf" and model.config.mixer_rms_eps == 1e-6
    assert model.config.tie_embeddings == tie
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    forward, decode = max_logit_differences(hf, model, ids)  # decode at batch 2: the fused CPU step must stand aside
    assert forward < 1e-4 and decode < 1e-4


def test_the_norms_are_what_makes_it_falcon(tmp_path):
    """The same weights served as plain Mamba-1 give other logits: the norms are not a no-op in this test."""
    hf = falcon_folder(tmp_path)
    model = load_model(tmp_path).model
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
        for mixer in (layer.mixer for layer in model.backbone.layers):
            mixer.rms_eps = None
        plain, _ = model(ids)
    assert (plain - ref).abs().max() > 1e-2


@pytest.fixture(scope="module")
def served_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("falcon") / "falcon-mamba"
    return folder, falcon_folder(folder, seed=3, num_hidden_layers=2)


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_greedy_tokens_over_http_equal_generate_directly_and_after_convert(served_folder, tmp_path):
    folder, hf = served_folder
    prompt = list(b"Falcon-Mamba, over HTTP: ")
    expected = hf_greedy(hf, prompt, 32)
    converted = tmp_path / "converted"
    subprocess.run([sys.executable, "-m", "engine.convert", str(folder), str(converted)], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    assert json.loads((converted / "config.json").read_text())["mixer_rms_eps"] == 1e-6
    for checkpoint in (folder, converted):
        with running_server(checkpoint) as url:
            assert token_ids(complete(url, **ids_request(prompt, 32))) == expected, checkpoint
            info = httpx.get(url + "/v1/models").json()["data"][0]
            assert info["verified"] is (checkpoint == converted)


def test_a_session_continued_over_http_equals_the_whole_history(served_folder):
    folder, hf = served_folder
    first, second = list(b"The first turn. "), list(b"And the second: ")
    with running_server(folder) as url:
        sid = httpx.post(url + "/v1/sessions", json={}).json()["id"]
        said = token_ids(complete(url, **ids_request(first, 6, session_id=sid)))
        resumed = complete(url, **ids_request(second, 12, session_id=sid))
    whole = first + said + second
    assert said == hf_greedy(hf, first, 6)
    assert token_ids(resumed) == hf_greedy(hf, whole, 12)
    assert resumed["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(first) + len(said) - 1


@pytest.mark.parametrize("config, named", [
    ({"model_type": "nemotron_h", "hidden_size": 32}, "model_type 'nemotron_h'"),
    ({"d_model": 32, "n_layer": 2, "vocab_size": 64, "ssm_cfg": {"layer": "Mamba3"}}, "ssm_cfg.layer 'Mamba3'"),
    ({"d_model": 32, "n_layer": 2, "vocab_size": 64, "ssm_cfg": {"layer": "Mamba2", "d_ssm": 32}},
     "ssm_cfg.d_ssm 32"),
    ({"d_model": 32, "n_layer": 2, "vocab_size": 64, "ssm_cfg": {"layer": "Mamba2", "D_has_hdim": True}},
     "ssm_cfg.D_has_hdim True"),
    ({"model_type": "mamba2", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 64, "head_dim": 16,
      "num_heads": 3}, "num_heads 3"),
    ({"d_model": 32, "n_layer": 2, "vocab_size": 64, "d_intermediate": 128}, "d_intermediate 128"),
    ({"d_model": 32, "n_layer": 2, "vocab_size": 64, "attn_layer_idx": [1]}, "attn_layer_idx [1]"),
])
def test_what_is_not_served_is_refused_at_load_naming_the_field_and_the_value(tmp_path, config, named):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises((CheckpointError, ConfigError), match="is not served") as refused:
        load_model(tmp_path)
    assert named in str(refused.value)


def test_a_config_that_names_only_its_class_is_falcon_mamba_too():
    raw = {"architectures": ["FalconMambaForCausalLM"], "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 64,
           "mixer_rms_eps": 1e-5}
    assert MambaConfig.from_hf_dict(raw).mixer_rms_eps == 1e-5
    assert MambaConfig.from_hf_dict({**raw, "architectures": ["MambaForCausalLM"]}).mixer_rms_eps is None


@pytest.mark.parametrize("eps", [0, -1e-6, 1.5, "1e-6", True])
def test_a_bad_mixer_rms_eps_is_refused(eps):
    with pytest.raises(ConfigError, match="mixer_rms_eps"):
        MambaConfig(mixer_rms_eps=eps)
