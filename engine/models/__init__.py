"""The networks over the engine's state: the Mamba language model and the planner's networks.

:mod:`engine.models.mamba_lm` is the backbone the engine decodes with;
:mod:`engine.models.planner_net` holds the planner's latent dynamics, policy
and value heads, which read and write the same SSM state (the search that
uses them lives in ``planner/``, the stages that train them in
``engine/train/``).
"""

from engine.models.mamba_lm import MambaLMHeadModel, MixerModel
from engine.models.planner_net import PlannerConfig, PlannerNet, load_planner

__all__ = ["MambaLMHeadModel", "MixerModel", "PlannerConfig", "PlannerNet", "load_planner"]
