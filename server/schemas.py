"""Request bodies (pydantic). Field names and ranges follow OpenAI; extensions are marked."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.thinking import ThinkParams


class StreamOptions(BaseModel):
    include_usage: bool = False


_THINK = ThinkParams()  # the engine's defaults are the API's


class ThinkOptions(BaseModel):
    """Deliberation settings (extension): the ``think`` object, or the top-level fields of ``/think``."""

    model_config = ConfigDict(extra="forbid")

    deliberation_lag: int = Field(_THINK.deliberation_lag, ge=0, le=64,
                                  description="tokens between the state a plan reads and the step it lands on")
    simulations: int = Field(_THINK.simulations, ge=1, le=4096)
    top_k_actions: int = Field(_THINK.top_k_actions, ge=1, le=64)
    injection_rate: float = Field(_THINK.injection_rate, ge=0.0, le=1.0)
    min_confidence: float = Field(_THINK.min_confidence, ge=0.0, le=1.0)
    plan_every: int = Field(_THINK.plan_every, ge=1, le=4096)
    time_budget_ms: float = Field(_THINK.time_budget_ms, gt=0.0, le=10000.0)
    max_staleness: int = Field(_THINK.max_staleness, ge=0, le=256)
    decay: float = Field(_THINK.decay, ge=0.0, le=1.0)
    trust_region: float = Field(_THINK.trust_region, ge=0.0, le=10.0)
    wait: bool = Field(_THINK.wait, description="bounded lag: at apply_at the sequence waits for its plan while the "
                                                "others decode; false: never wait, late deltas land later or go stale")


THINK_FIELDS = tuple(ThinkOptions.model_fields)


class _GenerationFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="extension: 0 or -1 means no limit")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="extension")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    session_id: str | None = Field(None, description="extension: continue this session's cached state")
    ignore_eos: bool = Field(False, description="extension")
    return_tokens_as_token_ids: bool = Field(False, description="extension (vLLM): logprob tokens read token_id:N")
    user: str | None = None
    think: ThinkOptions | None = Field(None, description="extension: deliberate with the planner while generating")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 8:
            raise ValueError("at most 8 stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops


class CompletionRequest(_GenerationFields):
    prompt: str | list[int] | list[str] = Field(..., description="a string, one-element list of strings, or token ids")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[int] | list[str]) -> str | list[int]:
        if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
            return v[0]
        return v


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)


class ThinkRequest(_GenerationFields, ThinkOptions):
    """``POST /think``: a prompt and/or a session, generation parameters and the deliberation fields."""

    model_config = ConfigDict(extra="ignore")

    prompt: str | list[int] = Field("", description="text or token ids; may be empty when continuing a session")

    def think_options(self) -> ThinkOptions:
        return ThinkOptions(**{name: getattr(self, name) for name in THINK_FIELDS})


class SessionCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metadata: dict[str, str] = Field(default_factory=dict)
