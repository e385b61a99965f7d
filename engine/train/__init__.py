"""Training stages that write the checkpoints the server serves (``python -m engine.train``).

Data preparation, the backbone, the planner's dynamics and value heads
(:mod:`engine.models.planner_net`), and assembling them into one servable
checkpoint (the checkable task families they train on are :mod:`engine.tasks`). Like the rest of the engine,
these modules use ``engine`` only; the evaluation with a planner in the loop
is ``planner.offline.evaluate``.
"""
