"""``python -m server.healthcheck``: exit 0 when the local server answers ``/ready`` with 200, else 1.

The container's HEALTHCHECK runs this instead of curl, so the slim image needs
no extra package. It probes ``/ready``, not ``/health``: "healthy" is what
compose's ``service_healthy`` and a load balancer act on, so it means the model
is loaded and warmed up (``/ready`` is 503 while the engine thread is down, too).
It reads the port from ``CRSM_PORT`` like the server does; a wildcard bind
address (0.0.0.0, ::) is probed on loopback.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def health_url(environ: dict[str, str] | None = None) -> str:
    """The URL to probe: ``CRSM_HEALTHCHECK_URL`` if set, else ``/ready`` on the server's own host and port."""
    env = os.environ if environ is None else environ
    if env.get("CRSM_HEALTHCHECK_URL"):
        return env["CRSM_HEALTHCHECK_URL"]
    host = env.get("CRSM_HOST", "127.0.0.1")
    host = "127.0.0.1" if host in WILDCARDS else host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{env.get('CRSM_PORT', '8000')}/ready"


def check(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (a local http URL)
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    url = args[0] if args else health_url()
    ok = check(url)
    if not ok:
        print(f"unhealthy: {url}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
