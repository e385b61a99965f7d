"""Schemathesis over every operation of a live server's ``/openapi.json``: generated requests, every check.

    python -m loadtest.fuzz --url http://127.0.0.1:8000 --examples 200

Each operation gets ``examples`` valid (positive) and ``examples`` invalid (negative) requests from a fixed
seed; every built-in check runs on every response (no 5xx, status codes, content types, headers and bodies
conform to the document, invalid data rejected, valid data accepted, ...). Failures are collected, not
raised, so one run reports all of them with the request that caused each (as curl).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import requests


@dataclass
class FuzzReport:
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    server_errors: int = 0
    timeouts: int = 0
    operations: list[str] = field(default_factory=list)
    # one entry per distinct (operation, check) failure: {"operation", "check", "title", "curl", "status"}
    failures: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["statuses"] = {str(k): v for k, v in sorted(self.statuses.items())}
        return d


def _failure_entries(exc: BaseException) -> list:
    """The schemathesis ``Failure`` objects inside an exception raised by ``validate_response``."""
    from schemathesis.core.failures import Failure, FailureGroup

    if isinstance(exc, FailureGroup):
        out = []
        for e in exc.exceptions:
            out.extend(_failure_entries(e))
        return out
    if isinstance(exc, Failure):
        return [exc]
    return []


def _error_param(response) -> str | None:
    """``error.param`` (and ``code``) of an OpenAI error body, else None."""
    try:
        error = response.json()["error"]
        return f"{error.get('param')}/{error.get('code')}"
    except Exception:
        return None


def _record(report: FuzzReport, seen: set, label: str, mode, case, response, exc: BaseException,
            headers: dict | None) -> None:
    """Add the failures of one response, one entry per cause (a refusal naming another field is another one)."""
    param = _error_param(response)
    for f in _failure_entries(exc) or [exc]:
        title = getattr(f, "title", type(f).__name__)
        key = (label, title, str(mode), response.status_code, param)
        if key in seen:
            continue
        seen.add(key)
        report.failures.append({
            "operation": label, "mode": mode.value, "check": title,
            "message": (getattr(f, "message", "") or str(f))[:500],
            "status": response.status_code, "param": param,
            "response": response.text[:300],
            "curl": case.as_curl_command(headers=headers)[:2000],
        })


def fuzz(url: str, *, examples: int = 50, seed: int = 0, timeout: float = 20.0, deadline: float = 600.0,
         headers: dict | None = None) -> FuzzReport:
    """Fuzz every operation of ``url``'s document; ``examples`` per operation and generation mode.

    Bounded: ``timeout`` per request, and no new request after ``deadline`` seconds.
    """
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.core.failures import FailureGroup

    schema = schemathesis.openapi.from_url(url + "/openapi.json", timeout=timeout, headers=headers)
    report = FuzzReport()
    seen_failures: set[tuple] = set()
    end = time.monotonic() + deadline
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        report.operations.append(operation.label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                      phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @hypothesis.seed(seed)
            @given(case=operation.as_strategy(generation_mode=mode))
            def one(case) -> None:
                if time.monotonic() > end:
                    return
                report.requests += 1
                try:
                    response = case.call(base_url=url, session=session, headers=headers, timeout=timeout)
                except requests.Timeout:
                    report.timeouts += 1
                    return
                report.statuses[response.status_code] += 1
                if response.status_code >= 500:
                    report.server_errors += 1
                try:
                    case.validate_response(response, headers=headers)
                except (Exception, FailureGroup) as exc:  # schemathesis raises its failures as one group
                    _record(report, seen_failures, operation.label, mode, case, response, exc, headers)

            try:
                one()
            except hypothesis.errors.Unsatisfiable:  # nothing to generate (no negative form of a bare GET)
                pass
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--examples", type=int, default=50, help="per operation and generation mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline", type=float, default=600.0)
    a = p.parse_args(argv)
    print(json.dumps(fuzz(a.url, examples=a.examples, seed=a.seed, deadline=a.deadline).as_dict(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
