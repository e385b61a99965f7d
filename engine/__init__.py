"""CRSM serve engine: the Mamba model, its recurrent state, tokenizer, sampling and checkpoints.

Nothing here imports ``server`` or ``planner``.
"""

from engine.config import ConfigError, MambaConfig
from engine.models import MambaLMHeadModel
from engine.state import MambaState, StateError, StateShape

__all__ = ["ConfigError", "MambaConfig", "MambaLMHeadModel", "MambaState", "StateError", "StateShape"]
