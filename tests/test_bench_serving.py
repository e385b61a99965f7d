"""loadtest/bench_serving.py's model shapes: the 130m folder loads in the server and streams a frame per token."""

from __future__ import annotations

import json

import httpx

from engine.checkpoint import load_model
from engine.text.tokenizer import ByteTokenizer
from loadtest.bench_serving import bench_checkpoint, server_args
from tests.serving import running_server


def test_default_shape_is_the_byte_level_benchmark_model(tmp_path):
    loaded = load_model(bench_checkpoint(tmp_path / "m"))
    cfg = loaded.model.config
    assert (cfg.d_model, cfg.n_layer, cfg.vocab_size) == (256, 4, ByteTokenizer().vocab_size)
    assert isinstance(loaded.tokenizer, ByteTokenizer)
    assert not (tmp_path / "m" / "tokenizer.json").exists()
    assert server_args("default", "none") == ["--max-running", "32", "--max-waiting", "64", "--quantize", "none"]


def test_130m_shape_is_served_with_a_frame_per_token(tmp_path):
    folder = bench_checkpoint(tmp_path / "m", "130m")
    loaded = load_model(folder)  # the loader refuses a 50280-token vocabulary without a tokenizer.json
    cfg = loaded.model.config
    assert (cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.d_state, cfg.expand, cfg.d_conv) == (768, 24, 50280, 16, 2, 4)
    assert sum(p.numel() for p in loaded.model.parameters()) > 120e6
    tok = loaded.tokenizer
    assert tok.vocab_size == 50280
    assert len(tok.encode("x" * 128)) == 128  # one token per prompt byte, as with the byte-level model
    assert all(tok.token_bytes(i) and tok.token_bytes(i).isascii() for i in range(256, 50280))
    args = server_args("130m", "int8")
    assert args[args.index("--quantize") + 1] == "int8" and args[args.index("--planner-workers") + 1] == "0"

    with running_server(folder, "--quantize", "int8") as url:
        body = {"model": "tiny", "prompt": "x" * 32, "max_tokens": 8, "ignore_eos": True, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        frames, usage = 0, None
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    frames += 1
                usage = chunk.get("usage") or usage
        models = httpx.get(url + "/v1/models", timeout=10).json()
    assert usage["completion_tokens"] == 8
    assert frames == 8  # every sampled id has text, so TTFT and ITL are per token as with the byte-level model
    assert models["data"][0]["id"] == "tiny"
