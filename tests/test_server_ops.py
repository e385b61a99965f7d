"""Integration tests against a real uvicorn on loopback: metrics, health, the CLI, checkpoints it serves,
the load generator, cancellation on hang-up, readiness, bounded fuzzing and the chat prefix cache."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.serving import ROOT, complete, metric_value, running_server

openai = pytest.importorskip("openai")


# Metrics, health, CLI -----------------------------------------------------------------
def test_metrics_present_and_moving(url):
    names = ["crsm_time_to_first_token_seconds_count", "crsm_inter_token_latency_seconds_count",
             "crsm_e2e_request_latency_seconds_count", "crsm_prompt_tokens_total", "crsm_generation_tokens_total",
             "crsm_batch_size_count"]
    complete(url, prompt="warm", max_tokens=3)
    before = httpx.get(url + "/metrics").text
    complete(url, prompt="count me", max_tokens=5)
    after = httpx.get(url + "/metrics").text
    for name in names:
        assert metric_value(after, name) > metric_value(before, name), name
    assert metric_value(after, "crsm_generation_tokens_total") - metric_value(before, "crsm_generation_tokens_total") == 5
    for name in ("crsm_requests_running", "crsm_requests_waiting", "crsm_sessions_cached", "crsm_session_bytes",
                 "crsm_prefix_cache_queries_total", "crsm_prefix_cache_hits_total"):
        metric_value(after, name)
    httpx.post(url + "/v1/completions", json={"prompt": 5})
    assert metric_value(httpx.get(url + "/metrics").text, "crsm_request_errors_total", status="400") >= 1
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/ready").status_code == 200


def test_cli_help_and_missing_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "CRSM_MAX_RUNNING" in out.stdout and "CRSM_CHECKPOINT" in out.stdout
    out = subprocess.run([sys.executable, "-m", "server", "--checkpoint", str(tmp_path / "none")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_default_checkpoint_is_served_without_arguments():
    """What `make serve` runs: no --checkpoint, the shipped default, verified and generating."""
    from engine.checkpoint import verify_checkpoint
    from engine.models.planner_net import PLANNER_CONFIG_FILE
    from server.cli import DEFAULT_CHECKPOINT

    manifest = verify_checkpoint(DEFAULT_CHECKPOINT)
    record = manifest["record"]  # the pipeline's result: backbone + trained planner heads
    assert record["stage"] == "value" and record["backbone"]["val_bits_per_byte"] < 2.0
    assert PLANNER_CONFIG_FILE in manifest["files"] and manifest["extra_tensors"]
    with running_server(None) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is a module?"}],
                                             max_tokens=20, temperature=0)
        assert out.choices[0].message.content and out.usage.prompt_tokens > 0


def test_load_generator_against_the_live_server(url, tmp_path):
    from loadtest.run import main as loadtest_main

    out = tmp_path / "run.json"
    loadtest_main(["--url", url, "--concurrency", "3", "--max-requests", "6", "--duration", "30", "--max-tokens", "8",
                   "--prompt-chars", "40", "--out", str(out), "--plot", str(tmp_path / "run.png")])
    report = json.loads(out.read_text())
    assert report["completed"] == 6 and report["errors"] == {}
    assert report["ttft_seconds"]["p50"] > 0 and report["itl_seconds"]["p99"] >= report["itl_seconds"]["p50"]
    assert all(r["completion_tokens"] == 8 for r in report["records"])
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"
    loadtest_main(["--url", url, "--scenario", "resume", "--history", "0,200", "--repeats", "1", "--prompt-chars", "16",
                   "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["history_chars"] for r in rows] == [0, 200] and all(r["resumed_ttft_s"] > 0 for r in rows)


def test_non_streamed_request_is_cancelled_when_the_client_hangs_up(url):
    def cancelled(text):
        return metric_value(text, "crsm_requests_finished_total", reason="cancelled") if 'reason="cancelled"' in text else 0.0

    before = cancelled(httpx.get(url + "/metrics").text)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json={"prompt": "long", "max_tokens": 30000, "ignore_eos": True},
                   timeout=httpx.Timeout(30.0, read=0.5))
    deadline = time.monotonic() + 30  # both the count and the gauge (set at the end of the step that retired it)
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics").text
        if cancelled(text) != before and metric_value(text, "crsm_requests_running") == 0:
            break
        time.sleep(0.1)
    assert cancelled(text) == before + 1 and metric_value(text, "crsm_requests_running") == 0


def test_not_ready_answers_503(checkpoint):
    """Before the engine thread runs (model loading, warm-up), probes and generation say 503."""
    from engine.checkpoint import load_model
    from engine.loop.scheduler import Engine
    from engine.text.chat import ChatTemplate
    from server.app import ServerConfig, create_app

    loaded = load_model(checkpoint)
    engine = Engine(loaded.model, loaded.tokenizer)  # never started: no lifespan under ASGITransport
    app = create_app(engine, loaded.tokenizer, ChatTemplate(loaded.tokenizer), ServerConfig(model_name="tiny"))

    async def probe():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return [await client.get("/health"), await client.get("/ready"),
                    await client.post("/v1/completions", json={"prompt": "x"})]

    health, ready, completion = asyncio.run(probe())
    assert health.status_code == ready.status_code == completion.status_code == 503
    assert completion.json()["error"]["type"] == "service_unavailable"
    assert completion.headers["retry-after"] == "5"


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_fields = ["prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "n",
           "logprobs", "top_logprobs", "session_id", "stream_options", "model", "repetition_penalty", "echo",
           "presence_penalty", "max_completion_tokens", "return_tokens_as_token_ids"]


@settings(max_examples=60)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/sessions"]),
       body=st.dictionaries(st.sampled_from(_fields), _json_values, max_size=6))
def test_fuzzed_bodies_never_get_a_500(url, path, body):
    """Bounded fuzz on loopback: any JSON body gets a 2xx or an OpenAI error, never a 500."""
    if body.get("stream") is True:
        body["stream"] = False
    for key in ("max_tokens", "max_completion_tokens"):  # keep every generation short
        if isinstance(body.get(key), int) and not isinstance(body.get(key), bool):
            body[key] = min(body[key], 8)
    body.setdefault("max_tokens", 4)
    r = httpx.post(url + path, json=body, timeout=30)
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_chat_reuses_the_state_of_an_earlier_turn():
    """Without a session id: the second turn repeats the first plus the reply and a new message; only the new
    part is prefilled, and the output equals the same conversation on a fresh server (no cache).

    Uses the shipped default model: its replies are plain text, so the client can send them back verbatim."""
    def chat(base, messages):
        r = httpx.post(base + "/v1/chat/completions", json={"messages": messages, "max_tokens": 8,
                                                             "temperature": 0, "logprobs": True,
                                                             "return_tokens_as_token_ids": True}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    from engine.text.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    first = [{"role": "user", "content": "What is a module?"}]
    with running_server(None) as base:
        reply = chat(base, first)
        reply_ids = [int(t["token"].split(":")[1]) for t in reply["choices"][0]["logprobs"]["content"]]
        assert tok.encode(tok.decode(reply_ids)) == reply_ids
        second = first + [{"role": "assistant", "content": tok.decode(reply_ids)}, {"role": "user", "content": "More"}]
        cached = chat(base, second)
        hits = metric_value(httpx.get(base + "/metrics").text, "crsm_prefix_cache_hits_total")
    # <|user|> text <|end|> <|assistant|> and the 8 reply tokens, the last one fed again
    assert cached["usage"]["prompt_tokens_details"]["cached_tokens"] == 1 + len(first[0]["content"]) + 2 + 8 - 1
    assert hits == 1
    with running_server(None) as fresh:
        uncached = chat(fresh, second)
    assert uncached["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    a, b = cached["choices"][0]["logprobs"]["content"], uncached["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in a] == [t["token"] for t in b]
    assert all(abs(x["logprob"] - y["logprob"]) < 1e-4 for x, y in zip(a, b))
