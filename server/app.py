"""The FastAPI application: lifespan, middleware, error handlers, routers, and the OpenAPI document.

Everything model-side goes through the serving object in ``app.state.serving``
(:class:`server.serving.Serving`); the routes live in :mod:`server.routes`.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from engine.chat import ChatTemplate
from engine.scheduler import Engine
from engine.tokenizer import Tokenizer
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
    app.openapi = lambda: _openapi(app)
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
        app.openapi_schema = schema
    return app.openapi_schema

