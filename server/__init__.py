"""CRSM serve HTTP layer: OpenAI-compatible API over the engine. Never touches tensors."""
