"""One APIRouter per surface, over the serving object in ``app.state.serving``."""

from server.routes import openai, ops, sessions, think

ROUTERS = (ops.router, sessions.router, openai.router, think.router)
