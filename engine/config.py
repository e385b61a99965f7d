"""Model configuration, spelled the way mamba-ssm spells it.

The field names follow mamba-ssm's ``MambaConfig`` so that a mamba-ssm
``config.json`` loads as is; :meth:`MambaConfig.from_hf_dict` maps the names
of Hugging Face's ``MambaConfig`` and ``FalconMambaConfig`` (Falcon-Mamba: the
Mamba-1 mixer with weightless RMS norms on dt, B and C, ``mixer_rms_eps``).
Only Mamba-1 mixers without MLP or attention layers are supported: the
engine's recurrent state is exactly one conv state and one SSM state per
layer, which is what sessions cache.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config describes a model this engine cannot build."""


# Hugging Face model types served, and their causal-LM class names (what config.json's ``architectures`` says).
HF_MODEL_TYPES = ("mamba", "falcon_mamba")
HF_ARCHITECTURES = ("MambaForCausalLM", "FalconMambaForCausalLM")


@dataclass
class MambaConfig:
    d_model: int = 256
    n_layer: int = 4
    vocab_size: int = 260
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    conv_bias: bool = True
    bias: bool = False
    rms_norm: bool = True
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    # Falcon-Mamba: the mixer normalises dt (before dt_proj), B and C with a weightless RMSNorm of this epsilon.
    mixer_rms_eps: float | None = None
    # Initialisation only (kept so training reproduces mamba-ssm's init).
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    # Free-form record of where the config came from; never affects shapes.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.dt_rank != "auto" and (not isinstance(self.dt_rank, int) or self.dt_rank <= 0):
            raise ConfigError(f"dt_rank must be 'auto' or a positive integer, got {self.dt_rank!r}")
        if self.pad_vocab_size_multiple <= 0:
            raise ConfigError("pad_vocab_size_multiple must be positive")
        eps = self.mixer_rms_eps
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1):
            raise ConfigError(f"mixer_rms_eps must be a number in (0, 1) or absent, got {eps!r}")

    # Derived sizes -----------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank_value(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows, rounded up as mamba-ssm does (50277 -> 50280)."""
        m = self.pad_vocab_size_multiple
        return self.vocab_size + (-self.vocab_size) % m

    # Serialisation -----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """mamba-ssm layout: the SSM fields live under ``ssm_cfg``."""
        ssm_keys = ("d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias", "dt_min", "dt_max", "dt_init_floor")
        out: dict[str, Any] = {
            "d_model": self.d_model,
            "d_intermediate": 0,
            "n_layer": self.n_layer,
            "vocab_size": self.vocab_size,
            "ssm_cfg": {"layer": "Mamba1", **{k: getattr(self, k) for k in ssm_keys}},
            "rms_norm": self.rms_norm,
            "norm_epsilon": self.norm_epsilon,
            "residual_in_fp32": self.residual_in_fp32,
            "fused_add_norm": False,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
            "tie_embeddings": self.tie_embeddings,
        }
        if self.mixer_rms_eps is not None:  # only Falcon-Mamba's configs carry it (a Mamba-1 config is unchanged)
            out["mixer_rms_eps"] = self.mixer_rms_eps
        if self.extra:
            out["extra"] = self.extra
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "MambaConfig":
        """Build from a mamba-ssm style dict (ours, or mamba-ssm's own config.json)."""
        raw = dict(raw)
        ssm_cfg = dict(raw.pop("ssm_cfg", None) or {})
        layer = ssm_cfg.pop("layer", "Mamba1")
        if layer != "Mamba1":
            raise ConfigError(f"ssm_cfg.layer {layer!r} is not served (served: 'Mamba1')")
        if d_intermediate := raw.pop("d_intermediate", 0):
            raise ConfigError(f"d_intermediate {d_intermediate!r} (an MLP after each mixer) is not served (served: 0)")
        if attn_layer_idx := raw.pop("attn_layer_idx", None):
            raise ConfigError(f"attn_layer_idx {attn_layer_idx!r} (attention layers: a hybrid) is not served "
                              "(served: none)")
        for ignored in ("crsm_format_version", "attn_cfg", "fused_add_norm", "initializer_cfg", "use_fast_path", "dt_init", "dt_scale", "layer_idx"):
            raw.pop(ignored, None)
            ssm_cfg.pop(ignored, None)
        known = {f.name for f in dataclasses.fields(cls)}
        merged = {**raw, **ssm_cfg}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**merged)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "MambaConfig":
        """Map a Hugging Face ``MambaConfig`` (model_type 'mamba') or ``FalconMambaConfig`` ('falcon_mamba') dict.

        HF does not pad the vocabulary, so the multiple is 1, and always uses
        RMSNorm. Falcon-Mamba adds the mixer's norms (``mixer_rms_eps``).
        """
        model_type = raw.get("model_type")
        if model_type is None and "FalconMambaForCausalLM" in (raw.get("architectures") or []):
            model_type = "falcon_mamba"  # a config that names only its class
        if model_type not in (None, *HF_MODEL_TYPES):
            raise ConfigError(f"config.json: model_type {model_type!r} is not served "
                              f"(served: {', '.join(HF_MODEL_TYPES)})")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError("only the silu activation is supported")
        return cls(
            d_model=raw["hidden_size"],
            n_layer=raw["num_hidden_layers"],
            vocab_size=raw["vocab_size"],
            d_state=raw.get("state_size", 16),
            d_conv=raw.get("conv_kernel", 4),
            expand=raw.get("expand", 2),
            dt_rank=raw.get("time_step_rank", "auto"),
            conv_bias=raw.get("use_conv_bias", True),
            bias=raw.get("use_bias", False),
            rms_norm=True,
            norm_epsilon=raw.get("layer_norm_epsilon", 1e-5),
            residual_in_fp32=raw.get("residual_in_fp32", True),
            pad_vocab_size_multiple=1,
            tie_embeddings=raw.get("tie_word_embeddings", True),
            dt_min=raw.get("time_step_min", 0.001),
            dt_max=raw.get("time_step_max", 0.1),
            dt_init_floor=raw.get("time_step_floor", 1e-4),
            mixer_rms_eps=raw.get("mixer_rms_eps", 1e-6) if model_type == "falcon_mamba" else None,
        )
