"""``/health`` (liveness), ``/ready`` (model loaded), ``/metrics`` (Prometheus), ``/v1/models``."""

from __future__ import annotations

from fastapi import Depends
from fastapi.responses import JSONResponse, Response

from server.auth import Owner, metrics_access
from server.errors import error_body, error_responses
from server.responses import Health, ModelList, Ready
from server.routes.router import Router
from server.serving import ServingDep

router = Router(tags=["ops"])
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/health", response_model=Health, responses=error_responses(503))
async def health(srv: ServingDep):
    """200 while the engine thread runs, else 503."""
    if not srv.engine.alive:
        return JSONResponse(error_body(503, "engine thread is not running"), status_code=503)
    return Health()


@router.get("/ready", response_model=Ready, responses=error_responses(503))
async def ready(srv: ServingDep):
    """200 once the model is loaded and warmed up, else 503 (also while draining on SIGTERM: take it out)."""
    if srv.drain.draining:
        return JSONResponse(error_body(503, "server is shutting down", code="draining"), status_code=503)
    if not (srv.engine.alive and srv.engine.ready.is_set()):
        return JSONResponse(error_body(503, "model is loading or warming up"), status_code=503)
    return Ready(model=srv.config.model_name)


@router.get("/metrics", response_class=Response, dependencies=[Depends(metrics_access)],
            responses={200: {"content": {PROMETHEUS: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}, **error_responses(401)})
async def metrics(srv: ServingDep) -> Response:
    return Response(srv.metrics.render(), media_type=PROMETHEUS)


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401))
async def models(owner: Owner, srv: ServingDep):
    return srv.models()
