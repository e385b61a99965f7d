"""Mamba-2 (``Mamba2ForCausalLM``, mamba-ssm ``ssm_cfg.layer: Mamba2``) served like Mamba-1.

Random-weight folders made by transformers (no download), in several shapes (n_groups 1 and > 1, head_dim 64,
32 and 16, tied and untied heads, prompts longer than one chunk and not a multiple of it): prefill and cached
decode logits within 1e-4 of transformers', greedy tokens over HTTP equal ``generate`` (served directly, from
a mamba-ssm folder and after ``engine.convert``). Batched, padded and continued prefills equal one-by-one
ones. Sessions, forks, the prefix cache, the directory store across a restart and a ``kill -9``, a drain that
ends streams and writes their sessions behind, and Redis replicas give the same greedy tokens as sending the
whole history: those tests are Mamba-1's own, imported here and run against a Mamba-2 checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
import torch

from engine.checkpoint import load_model, save_checkpoint
from engine.config import ConfigError, MambaConfig
from engine.state import MambaState, StateError
from engine.text.tokenizer import ByteTokenizer
from loadtest.bench_engine import write_byte_level_tokenizer
from tests.conftest import make_model, reference_greedy
from tests.hf_parity import max_logit_differences, off_the_init
from tests.serving import ROOT, complete, ids_request, running_server, token_ids

# Mamba-1's own tests, collected here again: they run against this module's `checkpoint` and `model` fixtures.
from tests.test_drain import (  # noqa: F401
    test_past_the_drain_timeout_streams_end_with_a_final_event_and_sessions_are_written_back,
)
from tests.test_replicas_redis import (  # noqa: F401 (fixtures)
    redis_url,
    replicas,
    test_a_session_made_on_a_continues_on_b_as_on_one_server,  # noqa: F401
)
from tests.test_scheduler import test_prefix_cache_reuses_a_conversation  # noqa: F401
from tests.test_server import test_fork_is_independent, test_session_continuation_equals_one_shot  # noqa: F401
from tests.test_session_store_serving import (  # noqa: F401
    test_a_session_continues_across_a_restart_and_a_kill_9_as_if_uninterrupted,
)

transformers = pytest.importorskip("transformers")

VOCAB = 264  # byte-level ids plus a few: the byte-level tokenizer.json of loadtest.bench_engine covers them

# name: (head_dim, n_groups, tied head, chunk_size); d_model 64, expand 2: 128 channels in 128 / head_dim heads.
SHAPES = {
    "hd64-g1-tied": (64, 1, True, 16),
    "hd32-g2-untied": (32, 2, False, 16),
    "hd16-g4-untied": (16, 4, False, 8),
}


def mamba2_folder(folder, shape: str = "hd32-g2-untied", seed: int = 0, **overrides):
    head_dim, groups, tied, chunk = SHAPES[shape]
    cfg = dict(vocab_size=VOCAB, hidden_size=64, state_size=16, num_hidden_layers=2, expand=2, conv_kernel=4,
               head_dim=head_dim, num_heads=128 // head_dim, n_groups=groups, chunk_size=chunk,
               tie_word_embeddings=tied)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**cfg)).eval()
    off_the_init(model)
    with torch.no_grad():  # the gated norm's weight too: its groups must matter
        for layer in model.backbone.layers:
            layer.mixer.norm.weight.add_(0.3 * torch.randn_like(layer.mixer.norm.weight))
    model.generation_config.eos_token_id = None  # every side generates exactly the greedy tokens
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    write_byte_level_tokenizer(folder / "tokenizer.json")
    return model


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


def tiny_mamba2(seed: int = 0, **overrides):
    base = dict(layer="Mamba2", d_model=32, n_layer=2, vocab_size=261, d_state=8, headdim=16, ngroups=2,
                chunk_size=8)
    return make_model(seed, **{**base, **overrides})


# Parity with transformers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_prefill_and_decode_logits_match_transformers(tmp_path, shape):
    hf = mamba2_folder(tmp_path, shape)
    loaded = load_model(tmp_path)
    model = loaded.model
    head_dim, groups, tied, chunk = SHAPES[shape]
    cfg = model.config
    assert loaded.source_format == "hf" and cfg.layer == "Mamba2"
    assert (cfg.headdim, cfg.ngroups, cfg.tie_embeddings, cfg.chunk_size) == (head_dim, groups, tied, chunk)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    # A prompt of 21 tokens: longer than one chunk (8 or 16) and not a multiple of it.
    forward, decode = max_logit_differences(hf, model, ids, prompt=21)
    assert forward < 1e-4 and decode < 1e-4


def test_the_gated_norm_groups_matter(tmp_path):
    """Normalising over all channels instead of per group gives other logits: the groups are not a no-op here."""
    hf = mamba2_folder(tmp_path, "hd16-g4-untied")
    model = load_model(tmp_path).model
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits
        for layer in model.backbone.layers:
            layer.mixer.norm.group_size = model.config.d_inner
        ungrouped, _ = model(ids)
    assert (ungrouped - ref).abs().max() > 1e-2


@pytest.fixture(scope="module")
def served_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mamba2")
    return {shape: (root / shape, mamba2_folder(root / shape, shape, seed=3)) for shape in SHAPES}


@pytest.mark.parametrize("shape", SHAPES)
def test_greedy_tokens_over_http_equal_generate(served_folders, shape):
    folder, hf = served_folders[shape]
    prompt = list(b"Mamba-2 over HTTP: a prompt of several chunks, 51 b")  # not a multiple of 8 or 16
    assert len(prompt) == 51
    expected = hf_greedy(hf, prompt, 32)
    with running_server(folder) as url:
        assert token_ids(complete(url, **ids_request(prompt, 32))) == expected
        card = httpx.get(url + "/v1/models").json()["data"][0]
    cfg = load_model(folder).model.config
    per_sequence = cfg.n_layer * (cfg.d_inner * cfg.d_state * 4 + cfg.conv_channels * cfg.d_conv * 4)
    assert card["architecture"] == "Mamba2" and card["state_bytes_per_session"] == per_sequence


def test_a_mamba_ssm_folder_and_a_converted_checkpoint_serve_the_same_tokens(served_folders, tmp_path):
    folder, hf = served_folders["hd32-g2-untied"]
    tensors = load_model(folder).model.state_dict()
    mamba_ssm = tmp_path / "mamba-ssm"
    mamba_ssm.mkdir()
    (mamba_ssm / "config.json").write_text(json.dumps({
        "d_model": 64, "d_intermediate": 0, "n_layer": 2, "vocab_size": VOCAB, "attn_layer_idx": [], "attn_cfg": {},
        "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 32, "ngroups": 2, "chunk_size": 16},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
        "tie_embeddings": False}))
    torch.save({k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in tensors.items()},
               mamba_ssm / "pytorch_model.bin")
    write_byte_level_tokenizer(mamba_ssm / "tokenizer.json")
    converted = tmp_path / "converted"
    subprocess.run([sys.executable, "-m", "engine.convert", str(folder), str(converted)], cwd=ROOT, check=True,
                   capture_output=True, timeout=120)
    assert json.loads((converted / "config.json").read_text())["ssm_cfg"]["layer"] == "Mamba2"
    prompt = list(b"Three folders, one model: ")
    expected = hf_greedy(hf, prompt, 16)
    for checkpoint in (mamba_ssm, converted):
        loaded = load_model(checkpoint)
        assert loaded.source_format == ("mamba_ssm" if checkpoint == mamba_ssm else "crsm")
        with running_server(checkpoint) as url:
            assert token_ids(complete(url, **ids_request(prompt, 16))) == expected, checkpoint


# The engine's own invariants on Mamba-2 -----------------------------------------------------------------------
def test_a_padded_batch_and_a_continued_prefill_equal_one_sequence_at_a_time():
    model = tiny_mamba2()
    rows = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 8, 17, 30)]
    batch = torch.zeros(len(rows), 30, dtype=torch.long)
    for i, row in enumerate(rows):
        batch[i, : len(row)] = row
    with torch.no_grad():
        logits, state = model.prefill(batch, lengths=torch.tensor([len(r) for r in rows]))
        for i, row in enumerate(rows):
            alone, alone_state = model.prefill(row.unsqueeze(0))
            assert (logits[i] - alone[0]).abs().max() < 1e-4
            assert (state.select([i]).ssm - alone_state.ssm).abs().max() < 1e-4
            assert (state.select([i]).conv - alone_state.conv).abs().max() < 1e-4
        row = rows[-1].unsqueeze(0)
        for cut in (1, 7, 8, 9, 16, 29):  # continued at, around and between chunk boundaries
            _, first = model.prefill(row[:, :cut])
            continued, cont_state = model.prefill(row[:, cut:], state=first)
            whole, whole_state = model.prefill(row)
            assert (continued - whole).abs().max() < 1e-4 and (cont_state.ssm - whole_state.ssm).abs().max() < 1e-4
        stepped = model.allocate_state(1)
        for t in range(row.shape[1]):  # one token at a time through the decode step
            step_logits = model.step(row[:, t], stepped)
        assert (step_logits - whole).abs().max() < 1e-4 and (stepped.ssm - whole_state.ssm).abs().max() < 1e-4


def test_a_dt_limit_clamps_prefill_and_decode_alike():
    model = tiny_mamba2(dt_limit=(0.01, 0.05))
    row = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole, whole_state = model.prefill(row)
        stepped = model.allocate_state(1)
        for t in range(20):
            logits = model.step(row[:, t], stepped)
        free = tiny_mamba2()
        unclamped, _ = free.prefill(row)
    assert (logits - whole).abs().max() < 1e-4 and (stepped.ssm - whole_state.ssm).abs().max() < 1e-4
    assert (unclamped - whole).abs().max() > 1e-3  # the limit is not a no-op in this test


def test_state_bytes_state_the_architecture_and_may_store_bfloat16():
    model = tiny_mamba2()
    shape = model.state_shape()
    with torch.no_grad():
        _, state = model.prefill(torch.randint(0, 256, (1, 12)))
    full = state.to_bytes("m", arch=shape.arch)
    half = state.to_bytes("m", arch=shape.arch, ssm_dtype=torch.bfloat16)
    assert abs(len(full) - len(half) - state.ssm.numel() * 2) < 16  # 2 bytes less per SSM value; the header as is
    back = MambaState.from_bytes(half, shape, model_id="m")
    assert back.ssm.dtype == torch.float32 and torch.allclose(back.ssm, state.ssm, rtol=1e-2, atol=1e-3)
    assert torch.equal(MambaState.from_bytes(full, shape, model_id="m").ssm, state.ssm)
    mamba1 = make_model().state_shape()
    with pytest.raises(StateError, match="Mamba2 model, this one is Mamba1"):
        MambaState.from_bytes(full, mamba1, model_id="m")
    with pytest.raises(StateError, match="shape"):  # a record without an arch is still refused by its shapes
        MambaState.from_bytes(state.to_bytes("m"), mamba1, model_id="m")


@pytest.mark.parametrize("field, value, named", [
    ("headdim", 24, "headdim 24 does not divide"),
    ("ngroups", 3, "ngroups 3 does not divide"),
    ("dt_limit", (0.1, 0.01), "dt_limit"),
    ("mixer_rms_eps", 1e-6, "mixer_rms_eps"),
])
def test_bad_mamba2_configs_are_refused_naming_the_field(field, value, named):
    with pytest.raises(ConfigError, match=named):
        MambaConfig(**{"layer": "Mamba2", "d_model": 32, "headdim": 16, field: value})


def test_configs_round_trip_through_json():
    cfg = MambaConfig(layer="Mamba2", d_model=32, headdim=16, ngroups=2, dt_limit=(0.001, 0.2))
    assert MambaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    unbounded = MambaConfig(layer="Mamba2", d_model=32, headdim=16)
    assert MambaConfig.from_dict(json.loads(json.dumps(unbounded.to_dict()))) == unbounded
    assert MambaConfig.from_dict({"d_model": 32, "n_layer": 2, "vocab_size": 64,
                                  "ssm_cfg": {"layer": "Mamba2"}}).d_state == 128  # mamba-ssm's Mamba2 default


# Mamba-1's serving tests against a Mamba-2 checkpoint -----------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The fixture Mamba-1's imported tests use: a byte-level Mamba-2 checkpoint in our verified format. Its head
    says only printable ASCII (other rows zero), so replies decode to text that encodes back to the same ids, as a
    trained model's do: a chat that repeats a reply can then hit the prefix cache."""
    model = tiny_mamba2(seed=11, vocab_size=ByteTokenizer().vocab_size, tie_embeddings=False)
    with torch.no_grad():
        printable = torch.zeros(model.lm_head.weight.shape[0], dtype=torch.bool)
        printable[32:127] = True
        model.lm_head.weight[~printable] = 0.0
    return save_checkpoint(model, tmp_path_factory.mktemp("m2"))


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint).model


@pytest.fixture(scope="module")
def url(checkpoint):
    with running_server(checkpoint, "--max-running", "32", "--max-waiting", "32") as base:
        yield base


def test_the_served_checkpoint_is_mamba2(model):
    assert model.config.layer == "Mamba2" and model.state_shape().arch == "Mamba2"


def test_a_chat_prefix_hit_gives_the_tokens_of_the_whole_history(checkpoint, model):
    turn = [{"role": "user", "content": "hello there"}]
    body = {"model": "tiny", "max_tokens": 6, "temperature": 0}
    with running_server(checkpoint) as url, running_server(checkpoint, "--prefix-cache-bytes", "0") as cold:
        first = httpx.post(url + "/v1/chat/completions", json={**body, "messages": turn}).json()
        follow = turn + [first["choices"][0]["message"], {"role": "user", "content": "and again"}]
        hit = httpx.post(url + "/v1/chat/completions", json={**body, "messages": follow}).json()
        miss = httpx.post(cold + "/v1/chat/completions", json={**body, "messages": follow}).json()
    assert hit["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert miss["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert hit["choices"][0]["message"] == miss["choices"][0]["message"]


def test_a_store_kept_in_bfloat16_resumes(checkpoint, model, tmp_path):
    store = tmp_path / "sessions"
    prompt = list(b"kept in half the bytes")
    with running_server(checkpoint, "--session-store", str(store), "--state-dtype", "bfloat16") as url:
        sid = httpx.post(url + "/v1/sessions", json={}).json()["id"]
        first = token_ids(complete(url, **ids_request(prompt, 4, session_id=sid)))
    record = (store / f"{sid}.session").stat().st_size
    shape = model.state_shape()
    kept = shape.n_layer * (shape.conv_width * shape.d_conv * 4 + shape.d_inner * shape.d_state * 2)  # SSM in bf16
    assert kept < record < kept + 2048  # the rest: record and safetensors headers
    with running_server(checkpoint, "--session-store", str(store), "--state-dtype", "bfloat16") as url:
        resumed = complete(url, **ids_request(list(b" more"), 4, session_id=sid))
    assert first == reference_greedy(model, prompt, 4)
    assert resumed["usage"]["completion_tokens"] == 4  # agreement with float32 is measured in loadtest/


# Thinking on Mamba-2 -------------------------------------------------------------------------------------------
def test_the_planner_stages_train_on_a_mamba2_backbone_and_think_runs_with_a_verifier(tmp_path):
    """The pipeline (backbone, dynamics, assembly, value) on a tiny Mamba-2, then ``/think`` with the task
    verifier over HTTP: plans are searched on Mamba-2 states, their decision deltas land, the verdict is given."""
    from engine.models.planner_net import load_planner
    from tests.test_think_http import sse_json
    from tests.test_train_pipeline import run_cli
    from tests.train_helpers import tiny_pipeline_config

    model = {"layer": "Mamba2", "d_model": 32, "n_layer": 2, "d_state": 8, "headdim": 16, "ngroups": 2,
             "chunk_size": 16}
    config = tiny_pipeline_config(tmp_path, backbone={"model": model})
    run_cli("pipeline", "--config", str(config), timeout=600)
    ckpt = tmp_path / "run" / "checkpoint"
    loaded = load_model(ckpt)
    assert loaded.model.config.layer == "Mamba2"
    planner = load_planner(ckpt, loaded.model)
    assert planner.trained and planner.record["stage"] == "value"
    with running_server(ckpt, "--planner-workers", "1", timeout=120) as url:
        body = {"prompt": "Q: 12+30=\nA: ", "max_tokens": 12, "temperature": 0, "deliberation_lag": 0,
                "plan_every": 1, "min_confidence": 0, "verifier": "task", "stop": ["\n"]}
        for _ in range(30):  # the worker process loads in the background: until a plan comes back
            with httpx.stream("POST", url + "/think", json=body, timeout=120) as r:
                assert r.status_code == 200
                events = sse_json(r)
            thoughts = [ev for kind, ev in events if kind == "thought"]
            if any(t["outcome"] != "error" for t in thoughts):
                break
    kind, done = events[-1]
    assert kind == "done" and done["usage"]["think"]["verifier"] == "task"
    assert isinstance(done["usage"]["think"]["verified"], bool)
    assert any(t["outcome"] == "applied" for t in thoughts), [t["outcome"] for t in thoughts]


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_low_precision_weights_take_the_fused_mamba2_step_and_equal_the_layer_by_layer_one(mode):
    """int8 / bf16 weights (engine/quant.py) run the whole-model C step; the layer-by-layer step (the same GEMV
    kernel per projection, the rest eager) gives the same logits."""
    from engine.quant import quantize_model

    model = quantize_model(tiny_mamba2(seed=5, d_model=64, d_state=16), mode)
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(5))

    def decode(max_batch: int):
        model.fused_decode.max_batch = max_batch
        with torch.inference_mode():
            logits, state = model.prefill(ids)
            probe = state.clone()
            used = model.fused_decode.hidden(model, model.backbone.embedding(ids[:, -1]), probe.conv,
                                             probe.ssm) is not None
            tokens, outs = logits.argmax(-1), []
            for _ in range(8):
                outs.append(model.step(tokens, state))
                tokens = outs[-1].argmax(-1)
        return used, torch.stack(outs)

    (fused_used, fused), (layered_used, layered) = decode(32), decode(0)
    assert fused_used and not layered_used
    torch.testing.assert_close(fused, layered, atol=2e-4, rtol=2e-4)
