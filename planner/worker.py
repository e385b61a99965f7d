"""The planner worker process: loads the checkpoint, keeps trees, answers plan calls.

A separate process, not a thread: the search's Python loop would otherwise
hold the GIL against the engine thread, a crash (even a segfault) takes only
the worker down, and a hung search can be killed. It runs at a lower CPU
priority (``nice``) with few torch threads, so decoding keeps its core.

Messages over the pipe (pickled; a job's state travels as :meth:`engine.state.MambaState.to_bytes`,
the one state serialisation, checked against the model's shape on arrival; other tensors as numpy arrays):

- parent -> worker: ``("plan", [job wire dicts], [request ids to forget])``,
  ``("stop",)``;
- worker -> parent: ``("ready", info)`` once loaded, then per plan call
  ``("done", [result wire dicts])`` or ``("error", message)``.
"""

from __future__ import annotations

import logging
import os
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import torch

from engine.state import MambaState, StateShape
from engine.thinking import PlanJob, StateDelta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    checkpoint: str
    simulator: str = "auto"  # "auto", "dynamics" or "backbone"
    threads: int = 1
    nice: int = 10
    max_trees: int = 256
    dtype: str = "float32"


# Wire format ------------------------------------------------------------------
def job_to_wire(job: PlanJob) -> dict[str, Any]:
    return {"request_id": job.request_id, "planned_at": job.planned_at, "tokens": job.tokens, "params": job.params,
            "state": job.state.to_bytes(), "logits": job.root_logits.float().numpy(), "prompt": job.prompt,
            "answer_start": job.answer_start, "stop": job.stop}


def job_from_wire(wire: dict[str, Any], shape: StateShape) -> PlanJob:
    state = MambaState.from_bytes(wire["state"], shape)
    return PlanJob(wire["request_id"], wire["planned_at"], state, torch.from_numpy(wire["logits"]), wire["tokens"],
                   wire["params"], wire["prompt"], wire["answer_start"], tuple(wire["stop"]))


def delta_to_wire(delta: StateDelta) -> dict[str, Any]:
    return {**delta.__dict__, "changes": delta.changes.numpy()}


def delta_from_wire(wire: dict[str, Any]) -> StateDelta:
    return StateDelta(**{**wire, "changes": torch.from_numpy(np.ascontiguousarray(wire["changes"]))})


# The process ----------------------------------------------------------------
def load_planner_for(spec: WorkerSpec):
    """(Planner, info, the model's state shape) for a worker, from the checkpoint."""
    from engine.checkpoint import load_model
    from engine.models.planner_net import load_planner
    from engine.text.tokenizer import load_tokenizer
    from planner.calibration import load_calibration
    from planner.planner import Planner
    from planner.simulators import choose_simulator, make_simulator

    model = load_model(spec.checkpoint, dtype=spec.dtype).model
    loaded = load_planner(spec.checkpoint, model)
    with torch.inference_mode():
        kind, timing = choose_simulator(spec.simulator, model, loaded.net, loaded.trained)
    calibration = load_calibration(spec.checkpoint)
    planner = Planner(make_simulator(kind, model, loaded.net), max_trees=spec.max_trees, model=model,
                      calibration=calibration, tokenizer=load_tokenizer(spec.checkpoint))
    info = {"simulator": kind, "trained": loaded.trained, "calibrated": calibration is not None, "pid": os.getpid(),
            **timing}
    return planner, info, model.state_shape()


def set_up_worker(spec: WorkerSpec) -> None:
    """Lower the worker's CPU priority and set its torch threads, so that decoding keeps its cores.

    OpenMP's wait policy comes from the environment the process was started with (the server sets it before
    torch loads, see ``server.cli.configure_openmp``; a spawned worker inherits it): a worker's idle threads
    then sleep instead of spinning on the cores the engine decodes on.
    """
    try:
        os.nice(spec.nice)
    except OSError:
        pass
    torch.set_num_threads(max(1, spec.threads))
    # A worker holds its own copy of the model already; oneDNN's packed prefill weights would add another 70%
    # of it (engine/ops/packed_linear.py) for forwards of a few tokens. CRSM_PREFILL_PACKED=1 asks for them.
    from engine.ops.packed_linear import ENV_SWITCH

    os.environ.setdefault(ENV_SWITCH, "0")


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Entry point of a worker process."""
    set_up_worker(spec)
    planner, info, shape = load_planner_for(spec)
    try:
        conn.send(("ready", info))
    except OSError:  # the server stopped while this worker was still loading: nobody is waiting for it
        return
    serve(conn, planner, shape)


def serve(conn: Connection, planner, shape: StateShape) -> None:
    """Answer plan calls until told to stop or the parent goes away."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message[0] == "stop":
            return
        _, jobs, forget = message
        for request_id in forget:
            planner.forget(request_id)
        try:
            deltas = planner.run([job_from_wire(w, shape) for w in jobs])
            reply: tuple[str, list[dict[str, Any]] | str] = ("done", [delta_to_wire(d) for d in deltas])
        except Exception as exc:  # a failing search is reported, the worker lives on
            log.warning("planner search failed: %s", traceback.format_exc())
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return
