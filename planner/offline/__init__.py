"""Offline tools around the planner, run by hand or by ``make eval``; the server never loads them.

- :mod:`planner.offline.evaluate`: planner off against on, held-out bits per
  byte and task accuracy (``make eval``);
- :mod:`planner.offline.calibrate`: fits the gate's calibration on held-out
  problems and stores it in the checkpoint's ``planner.json`` (read at run
  time by :mod:`planner.calibration`).

They use the runtime planner and the engine (training data and tasks
included); nothing in the runtime planner or the server imports them
(``tests/test_layers.py``).
"""
