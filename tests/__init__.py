"""pytest suite: unit tests per module, integration tests against a real uvicorn on 127.0.0.1
(``tests.serving``), property tests (hypothesis), and the real Prometheus, promtool and hadolint.
"""
