"""Model configuration, spelled the way mamba-ssm spells it.

The field names follow mamba-ssm's ``MambaConfig`` so that a mamba-ssm
``config.json`` loads as is; :meth:`MambaConfig.from_hf_dict` maps the names
of Hugging Face's ``MambaConfig``, ``FalconMambaConfig`` (Falcon-Mamba: the
Mamba-1 mixer with weightless RMS norms on dt, B and C, ``mixer_rms_eps``) and
``Mamba2Config``. ``layer`` names the mixer of every layer: ``"Mamba1"`` (the
selective scan, a (d_state,) state per channel) or ``"Mamba2"`` (SSD: heads of
``headdim`` channels with a scalar decay per head, B and C shared by
``ngroups`` groups of heads). Models without MLP or attention layers only:
every layer's recurrent state is one conv window and one SSM state, which is
what sessions cache.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config describes a model this engine cannot build."""


# Hugging Face model types served, and their causal-LM class names (what config.json's ``architectures`` says).
HF_MODEL_TYPES = ("mamba", "falcon_mamba", "mamba2")
HF_ARCHITECTURES = ("MambaForCausalLM", "FalconMambaForCausalLM", "Mamba2ForCausalLM")
LAYERS = ("Mamba1", "Mamba2")  # the mixers served (mamba-ssm's ssm_cfg.layer)
# mamba-ssm's defaults that differ between the two mixers (a mamba2-130m config.json names none of them).
_LAYER_DEFAULTS: dict[str, dict[str, Any]] = {"Mamba1": {"d_state": 16}, "Mamba2": {"d_state": 128}}
_MAMBA2_ONLY = ("headdim", "ngroups", "chunk_size", "dt_limit", "norm_before_gate")


@dataclass
class MambaConfig:
    d_model: int = 256
    n_layer: int = 4
    vocab_size: int = 260
    d_state: int = 0  # 0: the mixer's default (Mamba1 16, Mamba2 128, as in mamba-ssm)
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
    layer: str = "Mamba1"
    # Mamba-2 only: channels per head, groups sharing B and C, the SSD scan's chunk, the clamp of dt after its
    # softplus, and whether the gated RMSNorm before out_proj normalises before gating (mamba-ssm: after).
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    dt_limit: tuple[float, float] = (0.0, math.inf)
    norm_before_gate: bool = False
    # Initialisation only (kept so training reproduces mamba-ssm's init).
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    # Free-form record of where the config came from; never affects shapes.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layer not in LAYERS:
            raise ConfigError(f"ssm_cfg.layer {self.layer!r} is not served (served: {', '.join(LAYERS)})")
        if self.d_state == 0:
            self.d_state = _LAYER_DEFAULTS[self.layer]["d_state"]
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
        if self.layer == "Mamba2":
            self._check_mamba2()

    def _check_mamba2(self) -> None:
        for name in ("headdim", "ngroups", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.d_inner % self.headdim:
            raise ConfigError(f"headdim {self.headdim} does not divide d_inner {self.d_inner} (expand * d_model)")
        if self.nheads % self.ngroups:
            raise ConfigError(f"ngroups {self.ngroups} does not divide the {self.nheads} heads")
        if self.mixer_rms_eps is not None:
            raise ConfigError("mixer_rms_eps (Falcon-Mamba's norms) is a Mamba1 field, not served with Mamba2")
        try:
            low, high = (float(v) for v in self.dt_limit)
        except (TypeError, ValueError):
            raise ConfigError(f"dt_limit must be two numbers (min, max), got {self.dt_limit!r}") from None
        if not 0.0 <= low < high:
            raise ConfigError(f"dt_limit must satisfy 0 <= min < max, got {self.dt_limit!r}")
        self.dt_limit = (low, high)

    # Derived sizes -----------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        """Mamba-2 heads (d_inner / headdim)."""
        return self.d_inner // self.headdim

    @property
    def conv_channels(self) -> int:
        """Channels of the causal conv and of its cached window: x (Mamba-1); x, B and C (Mamba-2)."""
        return self.d_inner + (2 * self.ngroups * self.d_state if self.layer == "Mamba2" else 0)

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
        ssm_keys: tuple[str, ...]
        if self.layer == "Mamba2":
            ssm_keys = ("d_state", "d_conv", "expand", *_MAMBA2_ONLY, "conv_bias", "bias", "dt_min", "dt_max",
                        "dt_init_floor")
        else:
            ssm_keys = ("d_state", "d_conv", "expand", "dt_rank", "conv_bias", "bias", "dt_min", "dt_max",
                        "dt_init_floor")
        ssm_cfg = {"layer": self.layer, **{k: getattr(self, k) for k in ssm_keys}}
        if self.layer == "Mamba2":  # JSON has no infinity: an unbounded dt_limit is written as mamba-ssm's default
            ssm_cfg["dt_limit"] = [self.dt_limit[0], None if math.isinf(self.dt_limit[1]) else self.dt_limit[1]]
        out: dict[str, Any] = {
            "d_model": self.d_model,
            "d_intermediate": 0,
            "n_layer": self.n_layer,
            "vocab_size": self.vocab_size,
            "ssm_cfg": ssm_cfg,
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
        if layer not in LAYERS:
            raise ConfigError(f"ssm_cfg.layer {layer!r} is not served (served: {', '.join(LAYERS)})")
        if layer == "Mamba2":
            _refuse_mamba2_options(ssm_cfg)
            if isinstance(limit := ssm_cfg.get("dt_limit"), (list, tuple)):
                ssm_cfg["dt_limit"] = tuple(_json_number(v) for v in limit)
        if d_intermediate := raw.pop("d_intermediate", 0):
            raise ConfigError(f"d_intermediate {d_intermediate!r} (an MLP after each mixer) is not served (served: 0)")
        if attn_layer_idx := raw.pop("attn_layer_idx", None):
            raise ConfigError(f"attn_layer_idx {attn_layer_idx!r} (attention layers: a hybrid) is not served "
                              "(served: none)")
        for ignored in ("crsm_format_version", "attn_cfg", "fused_add_norm", "initializer_cfg", "use_fast_path",
                        "dt_init", "dt_scale", "layer_idx", "use_mem_eff_path", "A_init_range", "conv_init",
                        "process_group", "sequence_parallel"):
            raw.pop(ignored, None)
            ssm_cfg.pop(ignored, None)
        known = {f.name for f in dataclasses.fields(cls)}
        merged = {**raw, **ssm_cfg}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(layer=layer, **merged)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "MambaConfig":
        """Map a Hugging Face ``MambaConfig`` (model_type 'mamba'), ``FalconMambaConfig`` ('falcon_mamba') or
        ``Mamba2Config`` ('mamba2') dict. Falcon-Mamba adds the mixer's norms (``mixer_rms_eps``)."""
        model_type = raw.get("model_type")
        if model_type is None:  # a config that names only its class
            by_class = dict(zip(HF_ARCHITECTURES, HF_MODEL_TYPES, strict=True))
            model_type = next((by_class[a] for a in raw.get("architectures") or [] if a in by_class), None)
        if model_type not in (None, *HF_MODEL_TYPES):
            raise ConfigError(f"config.json: model_type {model_type!r} is not served "
                              f"(served: {', '.join(HF_MODEL_TYPES)})")
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: hidden_act {raw.get('hidden_act')!r} is not served (served: silu)")
        if model_type == "mamba2":
            return cls._from_hf_mamba2(raw)
        return cls(
            d_model=raw["hidden_size"],
            d_state=raw.get("state_size", 16),
            expand=raw.get("expand", 2),
            dt_rank=raw.get("time_step_rank", "auto"),
            mixer_rms_eps=raw.get("mixer_rms_eps", 1e-6) if model_type == "falcon_mamba" else None,
            **_hf_shared_fields(raw, tie_default=True),
        )

    @classmethod
    def _from_hf_mamba2(cls, raw: dict[str, Any]) -> "MambaConfig":
        """transformers' ``Mamba2Config``: heads of ``head_dim``; its gated norm uses ``layer_norm_epsilon``; its
        defaults (untied head, 8 groups) are transformers', not mamba-ssm's."""
        d_model, expand, head_dim = raw["hidden_size"], raw.get("expand", 2), raw.get("head_dim", 64)
        heads = raw.get("num_heads")
        if heads is not None and heads * head_dim != expand * d_model:
            raise ConfigError(f"config.json: num_heads {heads} is not served with head_dim {head_dim} (served: "
                              f"num_heads x head_dim = expand x hidden_size = {expand * d_model})")
        if raw.get("rms_norm", True) is not True:
            raise ConfigError(f"config.json: rms_norm {raw.get('rms_norm')!r} (a Mamba2 without its gated norm) is "
                              "not served (served: true)")
        limit = [_json_number(v) for v in raw.get("time_step_limit", (0.0, math.inf))]
        return cls(
            layer="Mamba2",
            d_model=d_model,
            d_state=raw.get("state_size", 128),
            expand=expand,
            headdim=head_dim,
            ngroups=raw.get("n_groups", 8),
            chunk_size=raw.get("chunk_size", 256),
            dt_limit=tuple(limit),
            **_hf_shared_fields(raw, tie_default=False),
        )


def _hf_shared_fields(raw: dict[str, Any], tie_default: bool) -> dict[str, Any]:
    """The fields every Hugging Face Mamba config spells alike. HF does not pad the vocabulary (multiple 1) and
    always uses RMSNorm; the tied head's default differs by family (Mamba-1 tied, Mamba-2 not)."""
    return dict(
        n_layer=raw["num_hidden_layers"],
        vocab_size=raw["vocab_size"],
        d_conv=raw.get("conv_kernel", 4),
        conv_bias=raw.get("use_conv_bias", True),
        bias=raw.get("use_bias", False),
        rms_norm=True,
        norm_epsilon=raw.get("layer_norm_epsilon", 1e-5),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        pad_vocab_size_multiple=1,
        tie_embeddings=raw.get("tie_word_embeddings", tie_default),
        dt_min=raw.get("time_step_min", 0.001),
        dt_max=raw.get("time_step_max", 0.1),
        dt_init_floor=raw.get("time_step_floor", 1e-4),
    )


def _json_number(value: Any) -> Any:
    """A number as config.json spells it: plain, ``null`` (unbounded), ``Infinity`` (Python's json) or
    transformers' ``{"__float__": "Infinity"}``."""
    if value is None:
        return math.inf
    if isinstance(value, dict) and set(value) == {"__float__"}:
        try:
            return float(value["__float__"])
        except (TypeError, ValueError):
            return value
    return value


def _refuse_mamba2_options(ssm_cfg: dict[str, Any]) -> None:
    """mamba-ssm ``Mamba2`` options whose layers this engine cannot build: refused naming field and value."""
    refusals = {
        "d_ssm": lambda v: v is None,  # a partial SSM (the rest an MLP gate) changes in_proj's layout
        "D_has_hdim": lambda v: not v,
        "rmsnorm": lambda v: v,
    }
    for name, served in refusals.items():
        if name in ssm_cfg and not served(ssm_cfg[name]):
            raise ConfigError(f"ssm_cfg.{name} {ssm_cfg[name]!r} is not served (served: "
                              f"{ {'d_ssm': 'null', 'D_has_hdim': 'false', 'rmsnorm': 'true'}[name]})")
        ssm_cfg.pop(name, None)
