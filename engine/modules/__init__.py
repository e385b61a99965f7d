from engine.modules.block import Block, make_norm
from engine.modules.mixer import MambaMixer

__all__ = ["Block", "MambaMixer", "make_norm"]
