"""The gate's calibration as the runtime reads it: ``planner.json`` beside the checkpoint's weights.

The planner workers load it at start (:func:`load_calibration`); it is
fitted offline on held-out problems by :mod:`planner.offline.calibrate`,
which writes it under the same name and key.
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
