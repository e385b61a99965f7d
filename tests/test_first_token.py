"""A prompt's first token leaves when it exists, not with the second; TTFT and ITL are timed at sending.

The checks are orderings, not timings: the engine's first decode step after a
prefill is held until the caller (the engine API, or a client reading SSE
frames one by one over a real uvicorn) has received token 1. Before the fix
token 1 sat in the outbox until that step had run, so the gate could only
give up (bounded wait) and the test fails.
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
import uvicorn

from engine.loop.scheduler import Engine
from engine.requests import FinishEvent, GenerationRequest, TokenEvent
from engine.sampling import SamplingParams
from engine.text.chat import ChatTemplate
from engine.text.tokenizer import ByteTokenizer
from loadtest.process import free_port
from server.app import ServerConfig, create_app
from server.metrics import Metrics
from server.serving import Generation, Serving
from tests.conftest import make_model

TOK = ByteTokenizer()
GATE_TIMEOUT_S = 10.0  # bounds a failing run; a passing one is released as soon as token 1 arrives


class FirstStepGate:
    """Wraps ``model.step``: the first call after :meth:`arm` waits until :meth:`release` (or the timeout)."""

    def __init__(self, model):
        self._step = model.step
        self._armed = False
        self._seen = threading.Event()
        self.released_by_caller: bool | None = None

    def arm(self) -> None:
        self._armed = True

    def release(self) -> None:
        self._seen.set()

    def __call__(self, *args, **kwargs):
        if self._armed:
            self._armed = False
            self.released_by_caller = self._seen.wait(GATE_TIMEOUT_S)
        return self._step(*args, **kwargs)


@pytest.fixture
def gated_model(monkeypatch):
    model = make_model(seed=3, vocab_size=TOK.vocab_size)
    gate = FirstStepGate(model)
    monkeypatch.setattr(model, "step", gate)
    return model, gate


def test_engine_delivers_token_one_before_running_the_next_step(gated_model):
    model, gate = gated_model

    async def main():
        engine = Engine(model, TOK)
        engine.start()
        await asyncio.to_thread(engine.wait_ready, 60)
        gate.arm()  # after the warm-up's own step
        try:
            handle = engine.submit(GenerationRequest(prompt_ids=TOK.encode("hello"), max_tokens=4, ignore_eos=True,
                                                     params=SamplingParams(temperature=0)))
            batches = []
            async for batch in handle.batches():
                if not batches:
                    gate.release()
                batches.append(batch)
            return batches
        finally:
            engine.shutdown()

    batches = asyncio.run(main())
    assert gate.released_by_caller is True, "token 1 did not reach the caller before the next decode step ran"
    assert [type(e) for e in batches[0]] == [TokenEvent]
    events = [e for b in batches for e in b]
    assert sum(isinstance(e, TokenEvent) for e in events) == 4 and isinstance(events[-1], FinishEvent)


@pytest.fixture
def in_process_server(gated_model):
    """A real uvicorn on loopback in a thread, serving an engine over the gated model."""
    model, gate = gated_model
    engine = Engine(model, TOK)
    app = create_app(engine, TOK, ChatTemplate(TOK), ServerConfig(model_name="tiny"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn-test")
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        engine.wait_ready(60)
        for _ in range(600):
            if server.started:
                break
            threading.Event().wait(0.05)
        assert server.started
        yield url, gate
    finally:
        server.should_exit = True
        thread.join(30)


def test_sse_client_reads_token_one_before_token_two_is_computed(in_process_server):
    url, gate = in_process_server
    gate.arm()
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0, "return_tokens_as_token_ids": True}  # logprobs: a frame per token
    tokens = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[len("data: "):])["choices"][0]
            tokens += choice["logprobs"]["tokens"] if choice.get("logprobs") else []
            if tokens:
                gate.release()  # the client holds token 1: only now may the engine compute token 2
    assert gate.released_by_caller is True, "the first SSE frame waited for the second token"
    assert len(tokens) == 4


def test_ttft_and_itl_are_timed_when_sent_not_when_sampled():
    engine = Engine(make_model(seed=3, vocab_size=TOK.vocab_size), TOK)
    serving = Serving(engine, TOK, ChatTemplate(TOK), ServerConfig(model_name="tiny"), Metrics("tiny"))
    handle = type("Handle", (), {"submitted": 100.0})()
    gen = Generation(handle, None, None, False)
    last = [0.0]
    sampled = [TokenEvent(token_id=1, text="a", logprob=0.0, top_logprobs=None, time=100.01),
               TokenEvent(token_id=2, text="b", logprob=0.0, top_logprobs=None, time=100.02)]
    serving.observe(gen, sampled[0], last, now=100.5)  # sent 0.49 s after it was sampled
    serving.observe(gen, sampled[1], last, now=100.75)
    registry = serving.metrics.registry
    labels = {"model_name": "tiny"}
    assert registry.get_sample_value("crsm_time_to_first_token_seconds_sum", labels) == pytest.approx(0.5)
    assert registry.get_sample_value("crsm_inter_token_latency_seconds_sum", labels) == pytest.approx(0.25)
