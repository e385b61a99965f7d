from engine.models.mamba_lm import MambaLMHeadModel, MixerModel

__all__ = ["MambaLMHeadModel", "MixerModel"]
