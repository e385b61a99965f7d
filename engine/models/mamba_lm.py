"""Mamba-1 / Mamba-2 language model, weight-compatible with mamba-ssm's ``MambaLMHeadModel``.

Parameter names: ``backbone.embedding``, ``backbone.layers.N.{norm,mixer.*}``,
``backbone.norm_f``, ``lm_head``; ``config.layer`` picks every layer's mixer
(engine/modules/mixer.py, engine/modules/mixer2.py). Three ways to run it:

- :meth:`MambaLMHeadModel.forward`: logits at every position (training, tests);
- :meth:`MambaLMHeadModel.prefill`: a batch of prompts of different lengths,
  optionally continuing cached states; logits of each row's last token;
- :meth:`MambaLMHeadModel.step`: one token per sequence, state in place.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.config import MambaConfig
from engine.modules.block import Block, make_norm
from engine.modules.fused_decode import FusedDecode
from engine.modules.mixer2 import Mamba2Mixer
from engine.ops import cpu_fused
from engine.quant import QuantizedLinear, QuantizedWeight
from engine.state import MambaState, StateShape

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import overload

    class _Blocks(nn.ModuleList):
        """What the type checker sees of ``MixerModel.layers``: an ``nn.ModuleList`` whose every item is a Block
        (torch's ModuleList is not generic)."""

        def __iter__(self) -> Iterator[Block]: ...

        @overload
        def __getitem__(self, idx: slice) -> nn.ModuleList: ...
        @overload
        def __getitem__(self, idx: int) -> Block: ...
        def __getitem__(self, idx: int | slice) -> Block | nn.ModuleList: ...

else:
    _Blocks = nn.ModuleList


class MixerModel(nn.Module):
    def __init__(self, config: MambaConfig, device=None, dtype=None):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, device=device, dtype=dtype)
        self.layers = _Blocks(Block(config, device, dtype) for _ in range(config.n_layer))
        self.norm_f = make_norm(config, device, dtype)


class MambaLMHeadModel(nn.Module):
    lm_head: nn.Linear | QuantizedLinear  # engine/quant.py's quantize_model swaps in a QuantizedLinear

    def __init__(self, config: MambaConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.backbone = MixerModel(config, device, dtype)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False, device=device, dtype=dtype)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        self.fused_decode = FusedDecode()
        self.init_weights()

    def _apply(self, fn, recurse: bool = True):  # .to(), .float(), .cpu(), ...: tensors may move
        self.fused_decode.invalidate()
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """mamba-ssm's initialisation (embeddings N(0, 0.02), out_proj scaled by 1/sqrt(n_layer))."""
        gen_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        try:
            nn.init.normal_(self.backbone.embedding.weight, std=0.02)
            for layer in self.backbone.layers:
                mixer = layer.mixer
                linears = (mixer.in_proj, mixer.out_proj) if isinstance(mixer, Mamba2Mixer) else (
                    mixer.in_proj, mixer.x_proj, mixer.out_proj)
                for lin in linears:
                    assert isinstance(lin, nn.Linear)  # initialised as built: quantize_model runs after loading
                    lin.reset_parameters()
                    if lin.bias is not None:
                        nn.init.zeros_(lin.bias)
                mixer.conv1d.reset_parameters()
                mixer.reset_parameters_like_mamba_ssm()
                mixer.out_proj.weight /= math.sqrt(self.config.n_layer)
            if not self.config.tie_embeddings:
                assert isinstance(self.lm_head, nn.Linear)  # as built: quantize_model runs after loading
                self.lm_head.reset_parameters()
        finally:
            if seed is not None:
                torch.random.set_rng_state(gen_state)

    # State ------------------------------------------------------------
    def state_shape(self) -> StateShape:
        cfg = self.config
        return StateShape(cfg.n_layer, cfg.d_inner, cfg.d_conv, cfg.d_state, conv_dtype=self.dtype, arch=cfg.layer,
                          conv_channels=cfg.conv_channels)

    def allocate_state(self, batch: int) -> MambaState:
        return self.state_shape().zeros(batch, device=self.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.embedding.weight.device

    # Running ----------------------------------------------------------
    def _logits(self, hidden: Tensor) -> Tensor:
        """Logits over the real vocabulary only: padding rows can never be sampled."""
        weight = self.lm_head.weight
        if weight.shape[0] != self.config.vocab_size:
            weight = weight[: self.config.vocab_size]
        if not isinstance(weight, QuantizedWeight):  # a decode step's rows: the fused GEMV (torch's ran at half speed)
            fused = cpu_fused.linear(hidden, weight, None, None)
            if fused is not None:
                return fused
        return F.linear(hidden, weight)

    def _final_norm(self, hidden: Tensor, residual: Tensor) -> Tensor:
        norm_f = self.backbone.norm_f
        return norm_f((hidden + residual).to(norm_f.weight.dtype))

    def forward(
        self,
        input_ids: Tensor,
        state: MambaState | None = None,
        lengths: Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, MambaState]:
        """Run (b, L) token ids, continuing ``state`` (zeros if None); ``state`` is not modified.

        Rows may be right-padded: ``lengths`` (b,) gives each row's real
        length and the returned state is each row's state after its last real
        token. Returns logits (b, L, V), or (b, V) at each row's last token
        with ``last_only``, and the new state.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        b, L = input_ids.shape
        if L == 0:
            raise ValueError("input_ids must hold at least one token per row")
        if lengths is not None:
            lengths = lengths.to(device=input_ids.device, dtype=torch.long)
            if lengths.shape != (b,) or int(lengths.min()) < 1 or int(lengths.max()) > L:
                raise ValueError(f"lengths must be (batch,) values in [1, {L}], got {lengths.tolist()}")
            if bool((lengths == L).all()):
                lengths = None
        if state is not None:
            self.state_shape().check(state)
            if state.batch_size != b:
                raise ValueError(f"state holds {state.batch_size} sequences, input_ids {b}")

        hidden = self.backbone.embedding(input_ids)
        residual: Tensor | None = None
        convs, ssms = [], []
        for i, layer in enumerate(self.backbone.layers):
            conv_in = None if state is None else state.conv[i]
            ssm_in = None if state is None else state.ssm[i]
            hidden, residual, conv, ssm = layer(hidden, residual, conv_in, ssm_in, lengths)
            convs.append(conv)
            ssms.append(ssm)
        assert residual is not None  # n_layer >= 1 (MambaConfig checks it)
        if last_only:
            last = (lengths - 1) if lengths is not None else torch.full((b,), L - 1, device=input_ids.device)
            rows = torch.arange(b, device=input_ids.device)
            hidden, residual = hidden[rows, last], residual[rows, last]
        logits = self._logits(self._final_norm(hidden, residual))
        new_state = MambaState(torch.stack(convs).to(self.dtype), torch.stack(ssms).float())
        return logits, new_state

    def prefill(
        self, input_ids: Tensor, lengths: Tensor | None = None, state: MambaState | None = None
    ) -> tuple[Tensor, MambaState]:
        """Prompts (b, L), right-padded to ``lengths``, from ``state`` or zeros -> (last logits (b, V), new state)."""
        return self.forward(input_ids, state=state, lengths=lengths, last_only=True)

    def step(self, token_ids: Tensor, state: MambaState) -> Tensor:
        """One token per sequence (b,) -> logits (b, V); ``state`` advances in place.

        The fused CPU step (engine/modules/fused_decode.py) runs the layers
        where it can; otherwise the eager layers below.
        """
        hidden = self.backbone.embedding(token_ids)
        normed = self.fused_decode.hidden(self, hidden, state.conv, state.ssm)
        if normed is not None:
            return self._logits(normed)
        residual: Tensor | None = None
        for i, layer in enumerate(self.backbone.layers):
            hidden, residual = layer.step(hidden, residual, state.conv[i], state.ssm[i])
        assert residual is not None  # n_layer >= 1
        return self._logits(self._final_norm(hidden, residual))
