"""CRSM serve HTTP layer: an OpenAI-compatible API over the engine; it never touches tensors. ``app`` builds the
FastAPI app (lifespan, middleware, error handlers, OpenAPI) and includes one thin router per surface from
``routes`` (``openai``: completions and chat; ``sessions``; ``think``; ``ops``: health, ready, metrics, models),
all over one ``serving.Serving`` object in ``app.state`` that holds the engine, tokenizer, chat template, config,
metrics and planner and submits generations to the engine (which owns session leases). ``schemas`` holds the request bodies,
``responses`` the response and stream payload models, ``formatting`` turns engine events into OpenAI objects (one
chunk path for completions and chat), ``streaming`` the SSE plumbing (sse-starlette), ``auth`` the API-key
dependency, ``limits`` the transport bounds (the key before the body, body size and read deadline, the header
deadline), ``errors`` the OpenAI error bodies, ``metrics`` the Prometheus export, ``cli`` the command line and
``healthcheck`` the container probe."""
