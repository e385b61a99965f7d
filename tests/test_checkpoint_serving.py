"""What the server does with the checkpoint it is given: verified or not, and a planner that cannot load."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
from safetensors.torch import save_file

from engine.checkpoint import save_checkpoint
from loadtest.process import free_port
from tests.conftest import make_model
from tests.serving import ROOT, running_server, tiny_checkpoint


def test_models_say_whether_the_checkpoint_was_verified(tmp_path):
    with running_server(tiny_checkpoint(tmp_path / "ours")) as url:
        assert httpx.get(url + "/v1/models").json()["data"][0]["verified"] is True
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    model = make_model(d_model=32, n_layer=2, vocab_size=263)
    (foreign / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(foreign / "model.safetensors"))
    with running_server(foreign) as url:
        assert httpx.get(url + "/v1/models").json()["data"][0]["verified"] is False


def test_a_planner_that_cannot_load_stops_the_start_naming_the_file(tmp_path):
    # Listed in the manifest (so the hashes pass) but not a planner: the server must not say ready and loop.
    folder = save_checkpoint(make_model(d_model=32, n_layer=2, vocab_size=263), tmp_path / "c",
                             extra_files={"planner.json": b'{"config": {"n_layer": "two"}}'})
    cmd = [sys.executable, "-m", "server", "--checkpoint", str(folder), "--port", str(free_port()),
           "--planner-workers", "1", "--log-level", "warning"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "planner.json" in done.stderr, done.stderr[-2000:]
    with running_server(folder) as url:  # without a planner the same folder serves
        assert httpx.get(url + "/ready").status_code == 200
