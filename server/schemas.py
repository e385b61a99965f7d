"""Request bodies (pydantic). Field names and ranges follow OpenAI; extensions are marked.

Hostile input is refused here, in one place, with a 400 naming the field:

- every body is strict (:class:`_Request`): no string-to-bool or string-to-number coercion, a bool is not a
  number; an int field (:data:`Int`) takes integers as JSON Schema counts them (``4`` and ``4.0``, not ``4.5``);
  a float field takes ints too (JSON has one number type; the openai client sends ``"temperature": 1``);
  floats must be finite (no ``NaN``/``Infinity``, which Python's JSON parser reads);
- every string the API accepts is :data:`Text`: valid Unicode. JSON may carry an unpaired surrogate
  (``"\\ud800"``), which no tokenizer can encode and no response can echo; it is rejected, not replaced, so
  the server never generates from text the client did not send;
- every number and every list has an upper bound, so absurd values never reach the engine (which still
  checks what depends on the model: ``max_tokens`` against the context, ``top_k`` against the vocabulary);
- no field is ignored: a field a body does not declare is a 400 naming it (``extra="forbid"``; code
  ``unsupported_parameter``), as OpenAI answers an unrecognized argument. The few OpenAI fields accepted for
  compatibility without an effect on the output (``user``, ``store``, ``metadata``, ``response_format`` of type
  ``text``) are declared, and say so in their descriptions (so in ``/openapi.json``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationInfo,
    field_validator,
)

from engine.thinking import ThinkParams
from planner.verifiers import MAX_PATTERN_CHARS, VERIFIERS, VerifierError, compile_pattern

VERIFIER_NAMES = tuple(sorted(VERIFIERS))

MAX_TOKENS = 1 << 31  # max_tokens / max_completion_tokens; the engine then holds them to the context limit
MAX_TOP_K = 1 << 20  # the engine then holds top_k to the vocabulary
MAX_TOKEN_ID = (1 << 31) - 1
MAX_PROMPT_IDS = 1 << 20  # token ids in one prompt (the body limit and the context limit come first in practice)
MAX_STOPS, MAX_STOP_CHARS = 8, 1024
MAX_MESSAGES = 4096
MAX_NAME_CHARS = 256  # model, session_id, user
MAX_METADATA_KEYS, MAX_METADATA_KEY_CHARS = 64, 256  # the store caps the whole at 16 KiB of JSON (413)


def _valid_unicode(value: str) -> str:
    """Refuse unpaired surrogates: JSON can carry them (``"\\ud800"``) but they are not text."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"must be valid Unicode: unpaired surrogate at character {exc.start}") from None
    return value


def _integral(value: Any) -> Any:
    """A float with no fractional part is an integer to JSON Schema (``4.0``); strict validation does the rest.

    (pydantic then writes such a field's bounds as raw ``ge``/``le``: ``server.app`` spells them as JSON Schema.)
    """
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]
"""Every integer the API accepts: an int, or a float with no fractional part (JSON Schema's ``integer``)."""
Text = Annotated[str, AfterValidator(_valid_unicode)]
"""Every string the API accepts: valid Unicode (see the module's docstring)."""
Name = Annotated[Text, StringConstraints(max_length=MAX_NAME_CHARS)]
TokenId = Annotated[Int, Field(ge=0, le=MAX_TOKEN_ID)]
StopText = Annotated[Text, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_PROMPT_IDS)]


def is_union_tag(loc_part: object) -> bool:
    """A branch label of :func:`_shaped` in an error's location (left out of the ``param`` a 400 names)."""
    return isinstance(loc_part, str) and loc_part.startswith("<") and loc_part.endswith(">")


def _shaped(what: str, text: Any = None, strings: Any = None, items: Any = None) -> Any:
    """A union picked by the value's JSON shape (a string, a list of strings, another list), so that an error
    names the one branch the value was meant for (a plain union reports every branch)."""
    branches = {"<string>": text, "<strings>": strings, "<list>": items}

    def shape(value: Any) -> str | None:
        if isinstance(value, str):
            return "<string>" if text is not None else None
        if isinstance(value, list):
            if strings is not None and value and all(isinstance(x, str) for x in value):
                return "<strings>"
            return "<list>" if items is not None else "<strings>" if strings is not None else None
        return None

    members = tuple(Annotated[t, Tag(tag)] for tag, t in branches.items() if t is not None)
    return Annotated[Union[members], Discriminator(shape, custom_error_type="invalid_type",  # noqa: UP007
                                                   custom_error_message=f"Input should be {what}")]


# The fields shaped by _shaped: plain unions for the type checker, the discriminated ones for pydantic.
if TYPE_CHECKING:
    Stops = str | list[str]
    CompletionPrompt = str | list[int]  # as validated: a list of one string is that string (_one_prompt)
    ThinkPrompt = str | list[int]
else:
    Stops = _shaped("a string or a list of strings", text=StopText,
                    strings=Annotated[list[StopText], Field(max_length=MAX_STOPS)])
    CompletionPrompt = _shaped("a string, a list of one string or a list of token ids", text=Text,
                               strings=Annotated[list[Text], Field(min_length=1, max_length=1)], items=TokenIds)
    ThinkPrompt = _shaped("a string or a list of token ids", text=Text, items=TokenIds)


class _Request(BaseModel):
    """Base of every request body: strict types and finite floats (see the module's docstring)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="extension (vLLM): every streamed chunk carries usage "
                                                            "(prompt, completion so far, total)")


_THINK = ThinkParams()  # the engine's defaults are the API's


class ThinkOptions(_Request):
    """Deliberation settings (extension): the ``think`` object, or the top-level fields of ``/think``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={  # the one rule between fields, stated
        "if": {"properties": {"verifier": {"const": "regex"}}, "required": ["verifier"]},
        "then": {"required": ["verifier_pattern"]}})

    deliberation_lag: Int = Field(_THINK.deliberation_lag, ge=0, le=64,
                                  description="tokens between the state a plan reads and the step it lands on")
    simulations: Int = Field(_THINK.simulations, ge=1, le=4096)
    top_k_actions: Int = Field(_THINK.top_k_actions, ge=1, le=64)
    injection_rate: float = Field(_THINK.injection_rate, ge=0.0, le=1.0)
    min_confidence: float = Field(_THINK.min_confidence, ge=0.0, le=1.0)
    plan_every: Int = Field(_THINK.plan_every, ge=1, le=4096)
    time_budget_ms: float = Field(_THINK.time_budget_ms, gt=0.0, le=10000.0)
    max_staleness: Int = Field(_THINK.max_staleness, ge=0, le=256)
    decay: float = Field(_THINK.decay, ge=0.0, le=1.0)
    trust_region: float = Field(_THINK.trust_region, ge=0.0, le=10.0)
    wait: bool = Field(_THINK.wait, description="bounded lag: at apply_at the sequence waits for its plan while the "
                                                "others decode; false: never wait, late deltas land later or go stale")
    delta: Literal["decision", "child"] = Field(_THINK.delta, description="decision: the minimal change making the "
                                                "search's choice win the step it lands on; child: the old best-child "
                                                "state change, blended at injection_rate * confidence")
    verifier: Literal[VERIFIER_NAMES] | None = Field(  # type: ignore[valid-type]
        None, description="the search's reward where a branch ends the answer (a stop string or EOS); its verdict on "
                          "the final answer is reported in usage.think")
    verifier_pattern: Annotated[Text, StringConstraints(min_length=1, max_length=MAX_PATTERN_CHARS)] | None = Field(
        None, validate_default=True, json_schema_extra={"format": "regex"},
        description="the regex verifier's pattern (the whole answer must match it; required with verifier 'regex', "
                    "ignored by the others); refused when it does not compile or backtracks catastrophically")

    @field_validator("verifier_pattern")
    @classmethod
    def _usable_pattern(cls, v: str | None, info: ValidationInfo) -> str | None:
        """The regex verifier's pattern must be there, compile and match in bounded time; the others ignore it."""
        if info.data.get("verifier") != "regex":
            return None
        try:
            compile_pattern(v)
        except VerifierError as exc:
            raise ValueError(str(exc)) from None
        return v


THINK_FIELDS = tuple(ThinkOptions.model_fields)


class ResponseFormatText(_Request):
    """``response_format`` of type ``text``: what the server does anyway. Structured outputs (``json_object``,
    ``json_schema``) are not implemented, so their types are a 400 naming ``response_format.type``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]


# OpenAI fields that change nothing here, accepted so that clients which always send them work (docs/api.md).
NO_EFFECT = "accepted for compatibility; no effect on the output"


class _GenerationFields(_Request):
    model_config = ConfigDict(extra="forbid")

    model: Name | None = None
    max_tokens: Int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(0, ge=-1, le=MAX_TOP_K, description="extension: 0 or -1 means no limit")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="extension")
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: only 0 (use repetition_penalty)")
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0, description="not supported: only 0 (use repetition_penalty)")
    seed: Int | None = Field(None, ge=0, le=2**63 - 1)
    stop: Stops | None = Field(
        None, validate_default=True, description=f"at most {MAX_STOPS} non-empty strings of at most "
                                                 f"{MAX_STOP_CHARS} characters")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Int = Field(1, ge=1, le=1, description="only n=1 is supported")
    session_id: Name | None = Field(None, description="extension: continue this session's cached state")
    ignore_eos: bool = Field(False, description="extension")
    return_tokens_as_token_ids: bool = Field(False, description="extension (vLLM): logprob tokens read token_id:N")
    user: Name | None = Field(None, description=NO_EFFECT)
    store: bool | None = Field(None, description=f"{NO_EFFECT} (nothing is stored for later retrieval)")
    metadata: Annotated[dict[Annotated[Text, StringConstraints(max_length=64)],
                             Annotated[Text, StringConstraints(max_length=512)]],
                        Field(max_length=16)] | None = Field(None, description=f"{NO_EFFECT} (OpenAI's limits: 16 "
                                                                               "keys of 64 characters, values of 512)")
    response_format: ResponseFormatText | None = Field(None, description="only {\"type\": \"text\"}, the default; "
                                                                         "structured outputs are not implemented")
    think: ThinkOptions | None = Field(None, description="extension: deliberate with the planner while generating")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        """One string or a list (bounded by the type), always a list for the engine."""
        return [v] if isinstance(v, str) else list(v or [])


class CompletionRequest(_GenerationFields):
    prompt: CompletionPrompt = Field(..., description="a string, one-element list of strings, or token ids")
    logprobs: Int | None = Field(None, ge=0, le=20)
    echo: Literal[False] = Field(False, description="not supported: only false")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        """A list of one string is that string (the type allows exactly one)."""
        return v[0] if isinstance(v, list) and v and isinstance(v[0], str) else v


class ContentPart(_Request):
    type: Literal["text"]
    text: Text


if TYPE_CHECKING:
    MessageContent = str | list[ContentPart]
else:
    MessageContent = _shaped("a string or a list of content parts", text=Text,
                             items=Annotated[list[ContentPart], Field(max_length=MAX_MESSAGES)])


class ChatMessage(_Request):
    model_config = ConfigDict(extra="forbid")  # an assistant message's tool_calls, a name: refused, never dropped

    role: Literal["system", "user", "assistant"]
    content: MessageContent | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=20)
    max_completion_tokens: Int | None = Field(None, ge=1, le=MAX_TOKENS)


class ThinkRequest(_GenerationFields, ThinkOptions):
    """``POST /think``: a prompt and/or a session, generation parameters and the deliberation fields."""

    model_config = ConfigDict(extra="forbid")

    prompt: ThinkPrompt = Field("", description="text or token ids; may be empty when continuing a session")

    def think_options(self) -> ThinkOptions:
        return ThinkOptions(**{name: getattr(self, name) for name in THINK_FIELDS})


class SessionCreateRequest(_Request):
    model_config = ConfigDict(extra="forbid")

    metadata: Annotated[dict[Annotated[Text, StringConstraints(max_length=MAX_METADATA_KEY_CHARS)], Text],
                        Field(max_length=MAX_METADATA_KEYS)] = Field(
        default_factory=dict, description=f"at most {MAX_METADATA_KEYS} string keys and values, 16 KiB as JSON")
