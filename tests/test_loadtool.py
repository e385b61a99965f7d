"""A real load tool against a live server: NVIDIA's aiperf, from its own venv (``make loadtool`` makes
``.venv-loadtool/``; it pins dependencies the project's venv must not get). A few seconds of streamed completions
on loopback: no errors, and the tool's TTFT and ITL agree with the server's own histograms.

Offline: the tokenizer is a byte-level ``tokenizer.json`` made here with ``tokenizers`` (the server's model is
byte-level too), laid out as a local Hugging Face cache entry with ``HF_HUB_OFFLINE=1`` (aiperf 0.13 resolves
even a local folder through the hub cache when offline).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.serving import ROOT, metric_value, running_server

AIPERF = ROOT / ".venv-loadtool" / "bin" / "aiperf"
REQUESTS = 48

pytestmark = pytest.mark.skipif(not AIPERF.exists(), reason="no .venv-loadtool (make loadtool creates it)")


def byte_tokenizer_cache(hub: Path, repo: str = "crsm/bytes") -> str:
    """A byte-level BPE (256 tokens, no merges) as the hub cache entry ``repo``; returns the repo id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    commit = "0" * 40
    entry = hub / ("models--" + repo.replace("/", "--"))
    snapshot = entry / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    tok.save(str(snapshot / "tokenizer.json"))
    (snapshot / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return repo


def histogram_means(url: str, since: dict | None = None) -> dict:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for name in ("crsm_time_to_first_token_seconds", "crsm_inter_token_latency_seconds"):
        s, c = metric_value(text, name + "_sum"), metric_value(text, name + "_count")
        out[name] = (s, c)
    if since is not None:
        out = {k: ((s - since[k][0]) / (c - since[k][1])) for k, (s, c) in out.items()}
    return out


def test_aiperf_streams_without_errors_and_agrees_with_server_metrics(tmp_path):
    repo = byte_tokenizer_cache(tmp_path / "hub")
    # The default checkpoint: its prefill and steps take long enough that HTTP overhead is not the whole TTFT.
    with running_server(None, "--max-running", "8") as url:
        before = histogram_means(url)
        art = tmp_path / "aiperf"
        cmd = [str(AIPERF), "profile", "--model", "tiny", "--url", url, "--endpoint-type", "completions",
               "--streaming", "--tokenizer", repo, "--use-server-token-count",
               "--synthetic-input-tokens-mean", "128", "--synthetic-input-tokens-stddev", "0",
               "--output-tokens-mean", "32", "--output-tokens-stddev", "0", "--extra-inputs", "ignore_eos:true",
               "--concurrency", "4", "--request-count", str(REQUESTS), "--random-seed", "1",
               "--workers-max", "2", "--record-processors", "1", "--no-server-metrics", "--ui-type", "none",
               "--request-timeout-seconds", "60", "--artifact-dir", str(art)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
               "HF_HOME": str(tmp_path / "hf"), "NO_COLOR": "1"}
        run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
        server = histogram_means(url, since=before)
    report = json.loads((art / "profile_export_aiperf.json").read_text())
    assert report["request_count"]["avg"] == REQUESTS and not report.get("error_summary"), report.get("error_summary")
    assert report["was_cancelled"] is False
    tool_ttft = report["time_to_first_token"]["avg"] / 1000
    tool_itl = report["inter_token_latency"]["avg"] / 1000
    server_ttft = server["crsm_time_to_first_token_seconds"]
    server_itl = server["crsm_inter_token_latency_seconds"]
    figures = f"TTFT tool {tool_ttft * 1e3:.2f} ms server {server_ttft * 1e3:.2f} ms; " \
              f"ITL tool {tool_itl * 1e3:.3f} ms server {server_itl * 1e3:.3f} ms"
    print(figures)
    # The same requests seen from both ends; a generous factor, never a timing bound.
    assert 0.5 <= tool_ttft / server_ttft <= 2.0, figures
    assert 0.5 <= tool_itl / server_itl <= 2.0, figures
