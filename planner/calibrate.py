"""Calibrating the planner's confidence: a logistic of the search's own evidence, fitted on held-out problems.

A decision delta lands at full strength when the gate passes, so the gate
must mean something: a stated confidence of p should be right about p of the
time. For each plan made while answering held-out problems, every searched
node's best child gives one example with two features (the best child's
visit share, its value advantage over the node) and a label: "right" when
the chosen token continues the node's text on a path to the verified answer
(the answer's next byte at that node, or the end of the answer once it is
complete). The fit is plain logistic regression (Newton's method, a small L2
penalty), stored as ``calibration`` in the checkpoint's ``planner.json``
(and the manifest updated), which the planner workers read at start.

    python -m planner.calibrate --checkpoint checkpoints/default --problems 200

Reported: the held-out problems' count, the examples, the log loss before
(the uncalibrated formula) and after, and the reliability table (stated vs
observed per confidence bin) on a second half of the examples.
"""

from __future__ import annotations

import json
from pathlib import Path

from planner.tree import Calibration

PLANNER_JSON = "planner.json"
KEY = "calibration"


def load_calibration(checkpoint: str | Path) -> Calibration | None:
    """The calibration stored in ``checkpoint``'s ``planner.json``, or None (uncalibrated)."""
    path = Path(checkpoint) / PLANNER_JSON
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        return Calibration.from_dict(body[KEY]) if KEY in body else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
