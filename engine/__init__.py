"""CRSM serve engine: the Mamba model, its recurrent state, tokenizer, sampling and checkpoints.

It also holds the planner's networks (:mod:`engine.models.planner_net`:
latent dynamics, policy and value heads over the engine's state) and the
stages that train them (:mod:`engine.train`); the search itself is in
``planner/``. Nothing here depends on ``server`` or ``planner``.
"""

from engine.config import ConfigError, MambaConfig
from engine.models import MambaLMHeadModel
from engine.state import MambaState, StateError, StateShape

__all__ = ["ConfigError", "MambaConfig", "MambaLMHeadModel", "MambaState", "StateError", "StateShape"]
