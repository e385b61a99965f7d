"""The FastAPI application: lifespan, middleware, error handlers, routers, and the OpenAPI document.

Everything model-side goes through the serving object in ``app.state.serving``
(:class:`server.serving.Serving`); the routes live in :mod:`server.routes`.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from engine.loop.scheduler import Engine
from engine.text.chat import ChatTemplate
from engine.text.tokenizer import Tokenizer
from server.errors import install_error_handlers
from server.limits import LimitsAndErrorCounts
from server.metrics import Metrics
from server.responses import STREAM_MODELS
from server.routes import ROUTERS
from server.serving import Generation, ServerConfig, Serving

__all__ = ["Generation", "ServerConfig", "create_app"]


def create_app(engine: Engine, tokenizer: Tokenizer, chat_template: ChatTemplate, config: ServerConfig,
               metrics: Metrics | None = None, planner=None) -> FastAPI:
    """``planner``: a started-with-the-app pool (``planner.pool.PlannerPool``) the engine posts jobs to, or None."""
    serving = Serving(engine, tokenizer, chat_template, config, metrics, planner)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await serving.startup()
        try:
            yield
        finally:
            await serving.shutdown()

    # The documentation routes are ours (server/routes/docs.py): behind the API keys when set.
    app = FastAPI(title="CRSM serve", version="0.1.0", lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None)
    app.state.serving = serving
    install_error_handlers(app)
    app.add_middleware(LimitsAndErrorCounts, metrics=serving.metrics, config=config)  # see server/limits.py
    for router in ROUTERS:
        app.include_router(router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]  # FastAPI's documented way to own the schema
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's document, with our error shape only (validation errors answer 400, not 422) and the stream
    payload schemas in ``components``."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        _, defs = models_json_schema([(m, "serialization") for m in STREAM_MODELS],
                                     ref_template="#/components/schemas/{model}")
        for name, model_schema in defs.get("$defs", {}).items():
            components.setdefault(name, model_schema)
        _constraints_as_json_schema(components)
        engine = app.state.serving.engine
        _state_model_limits(components, vocab=engine.vocab, max_context=engine.max_context)
        app.openapi_schema = schema
    return app.openapi_schema



def _state_model_limits(components: dict, vocab: int, max_context: int) -> None:
    """Write the limits that depend on the loaded model into the request schemas (the engine enforces them):
    ``max_tokens`` up to the context, ``top_k`` up to the vocabulary, prompt token ids below it."""
    caps = {"max_tokens": max_context, "max_completion_tokens": max_context, "top_k": vocab}
    for name in ("CompletionRequest", "ChatCompletionRequest", "ThinkRequest"):
        properties = components.get(name, {}).get("properties", {})
        for field, maximum in caps.items():
            if field in properties:
                _cap_integers(properties[field], maximum)
        prompt = properties.get("prompt", {})
        for branch in prompt.get("oneOf", prompt.get("anyOf", [prompt])):
            if branch.get("type") == "array" and branch.get("items", {}).get("type") == "integer":
                branch["items"]["maximum"] = vocab - 1


def _cap_integers(node: dict, maximum: int) -> None:
    if node.get("type") == "integer":
        node["maximum"] = min(node.get("maximum", maximum), maximum)
    for branch in node.get("anyOf", []) + node.get("oneOf", []):
        _cap_integers(branch, maximum)


_JSON_SCHEMA_BOUNDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}


def _constraints_as_json_schema(node: object) -> None:
    """pydantic writes the bounds of a validator-wrapped number (:data:`server.schemas.Int`) as raw ``ge``/``le``
    keys, which JSON Schema readers ignore; spell them as JSON Schema does."""
    if isinstance(node, dict):
        if node.get("type") in ("integer", "number"):
            for raw, name in _JSON_SCHEMA_BOUNDS.items():
                if raw in node:
                    node[name] = node.pop(raw)
        for value in node.values():
            _constraints_as_json_schema(value)
    elif isinstance(node, list):
        for value in node:
            _constraints_as_json_schema(value)
