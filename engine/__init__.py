"""CRSM serve engine: the Mamba model, its recurrent state, and the loop that serves it.

Its layout follows the architecture:

- the model: :mod:`engine.models` built from :mod:`engine.modules` (a mixer
  per family) and :mod:`engine.ops` (scans, convs, the fused CPU kernels,
  mamba-ssm's kernels on CUDA); :mod:`engine.config`, :mod:`engine.quant`;
- its state, what a session caches: :mod:`engine.state`;
- checkpoints: :mod:`engine.checkpoint` (the verified format, foreign folders)
  and the converter :mod:`engine.convert`;
- the loop: :mod:`engine.loop` (one thread, continuous batching) and its
  public faces :mod:`engine.requests` (requests, handles, events),
  :mod:`engine.sampling` and :mod:`engine.thinking` (what a planner exchanges
  with the loop);
- text: :mod:`engine.text` (tokenizers, chat templates, stop strings);
- sessions: :mod:`engine.sessions` (stores, the record format, the prefix cache);
- the checkable task families the verifiers and the training share:
  :mod:`engine.tasks`;
- training: :mod:`engine.train`, the stages that write the checkpoints
  (never loaded by the server).

Nothing here imports ``server`` or ``planner``. The names below are the
public faces; :class:`Engine` (and the request types) load the loop on first
use, so importing a light module such as :mod:`engine.config` does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.config import ConfigError, MambaConfig
from engine.models import MambaLMHeadModel
from engine.state import MambaState, StateError, StateShape

if TYPE_CHECKING:
    from engine.loop.scheduler import Engine
    from engine.requests import FinishEvent, GenerationRequest, RequestHandle, TokenEvent
    from engine.sampling import SamplingParams

_LAZY = {
    "Engine": "engine.loop.scheduler",
    "FinishEvent": "engine.requests",
    "GenerationRequest": "engine.requests",
    "RequestHandle": "engine.requests",
    "TokenEvent": "engine.requests",
    "SamplingParams": "engine.sampling",
}

__all__ = ["ConfigError", "Engine", "FinishEvent", "GenerationRequest", "MambaConfig", "MambaLMHeadModel",
           "MambaState", "RequestHandle", "SamplingParams", "StateError", "StateShape", "TokenEvent"]


def __getattr__(name: str) -> object:
    """``engine.Engine`` and the request types, imported when first asked for."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
