"""loadtest/bench_engine.py runs end to end on both shapes (a few tokens, one round) and writes its report.

The 130M shape has a 50,280-token vocabulary: the loader refuses such a folder without its tokenizer.json, which
broke the benchmark once; this runs it. Timings are recorded, never asserted.
"""

from __future__ import annotations

import json

import pytest

from loadtest import bench_engine


@pytest.mark.parametrize("shape", ["default", "130m"])
def test_bench_engine_runs_and_reports_ratios(tmp_path, shape):
    out = tmp_path / "bench.json"
    bench_engine.main(["--shape", shape, "--quantize", "none,int8", "--measures", "decode_b1,prefill_512",
                       "--decode-tokens", "2", "--repeats", "1", "--no-llama", "--out", str(out)]
                      + (["--no-hf"] if shape == "130m" else []))
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {"decode_b1", "prefill_512"}
    for measure in results:
        assert results[measure]["ours_none"]["tok_s"] > 0
        assert "vs_ours_none" in results[measure]["ours_int8"]
        if shape == "default":
            assert "vs_hf" in results[measure]["ours_none"]
    cost = report["cost_per_token"]["ours_none"]
    assert cost["prefill_flops"] < cost["flops"]  # prefill's logits are at the last token only
    if shape == "default":
        assert report["checks"]["greedy_tokens_equal_hf"]
