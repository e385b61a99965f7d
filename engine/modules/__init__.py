"""Mamba building blocks with mamba-ssm's parameter names: the residual block and the selective-SSM mixer."""

from engine.modules.block import Block, make_norm
from engine.modules.mixer import MambaMixer

__all__ = ["Block", "MambaMixer", "make_norm"]
