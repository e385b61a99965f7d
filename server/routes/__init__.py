"""One APIRouter per surface, over the serving object in ``app.state.serving``."""

from server.routes import docs, openai, ops, sessions, think

ROUTERS = (ops.router, sessions.router, openai.router, think.router, docs.router)
