"""Training stages that write the checkpoints the server serves (``python -m engine.train``)."""
