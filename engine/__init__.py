"""CRSM serve engine: the Mamba model, its recurrent state, and the loop that serves it.

The model (:mod:`engine.models`, built from :mod:`engine.modules` and
:mod:`engine.ops`), its state (:mod:`engine.state`), tokenizers, sampling and
checkpoints; the serving loop (:mod:`engine.scheduler`, one thread doing
continuous batching) with its public request types (:mod:`engine.requests`),
the sequences in flight (:mod:`engine.sequence`), the decode batch
(:mod:`engine.batch`), the session store and prefix cache
(:mod:`engine.sessions`), and the planner's side of the loop: plans out,
deltas in (:mod:`engine.thinking`, :mod:`engine.deliberation`,
:mod:`engine.injection`). It also holds the planner's networks
(:mod:`engine.models.planner_net`) and the stages that train the checkpoints
(:mod:`engine.train`). Nothing here imports ``server`` or ``planner``.
"""

from engine.config import ConfigError, MambaConfig
from engine.models import MambaLMHeadModel
from engine.state import MambaState, StateError, StateShape

__all__ = ["ConfigError", "MambaConfig", "MambaLMHeadModel", "MambaState", "StateError", "StateShape"]
