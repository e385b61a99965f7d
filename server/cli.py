"""``python -m server`` / ``crsm-serve``: load a checkpoint and serve it.

Every option can also be set through the environment variable named in its
help (command-line flags win). An option's default is read from the class that
uses it (:func:`options`), so it is written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUANTIZE_MODES = ("none", "bf16", "int8")  # engine.quant.MODES (checked equal by tests/test_quant.py)
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "default"


@dataclass(frozen=True)
class Option:
    flag: str
    type: type
    default: object
    help: str

    @property
    def env(self) -> str:
        return "CRSM_" + self.flag.lstrip("-").replace("-", "_").upper()


def default_of(owner: Callable[..., object], name: str) -> Any:
    """The default of ``name`` where its owner declares it: a dataclass's field or a keyword of a function or class.

    The options below take their defaults from the classes that use them (the engine, the stores, the planner
    pool, the server's config), so each default is written once."""
    if dataclasses.is_dataclass(owner):
        return {f.name: f for f in dataclasses.fields(owner)}[name].default
    return inspect.signature(owner).parameters[name].default


@functools.cache
def options() -> tuple[Option, ...]:
    """Every option of the server. Building the list imports the classes that own the defaults, torch among them:
    call it after :func:`configure_openmp` (OpenMP reads its settings once, when torch loads)."""
    from engine.loop.scheduler import Engine
    from engine.sessions import PrefixCache, open_session_store
    from planner.pool import PlannerPool
    from planner.worker import WorkerSpec
    from server.limits import HEADER_TIMEOUT_SECONDS
    from server.serving import ServerConfig

    return (
        Option("--checkpoint", str, str(DEFAULT_CHECKPOINT),
               "checkpoint folder: ours, a mamba-ssm folder (Mamba1 or Mamba2) or a Hugging Face MambaForCausalLM, "
               "FalconMambaForCausalLM or Mamba2ForCausalLM folder (detected)"),
        Option("--host", str, "127.0.0.1", "interface to bind (0.0.0.0 for all)"),
        Option("--port", int, 8000, "TCP port"),
        Option("--model-name", str, "", "name reported by /v1/models and expected in requests (default: folder name)"),
        Option("--max-running", int, default_of(Engine, "max_running"), "sequences decoded together at most (batch slots)"),
        Option("--max-waiting", int, default_of(Engine, "max_waiting"),
               "requests queued beyond the running ones before answering 429"),
        Option("--prefill-chunk", int, default_of(Engine, "prefill_chunk"),
               "prompt tokens prefilled per engine step, so long prompts do not stall streams"),
        Option("--max-context", int, default_of(Engine, "max_context"),
               "tokens a sequence (session history + prompt + output) may reach"),
        Option("--default-max-tokens", int, default_of(ServerConfig, "default_max_tokens"),
               "max_tokens when a request does not set it"),
        Option("--session-bytes", int, default_of(open_session_store, "max_bytes"),
               "byte budget of cached session states (LRU eviction past it)"),
        Option("--session-ttl", float, default_of(open_session_store, "ttl_seconds"), "seconds an idle session is kept"),
        Option("--session-store", str, "memory",
               "where sessions live: memory (this process), a directory path (survives restarts; one server per "
               "directory) or redis://HOST:PORT/DB (shared by replicas)"),
        Option("--session-lease-seconds", float, default_of(open_session_store, "lease_seconds"),
               "with redis://: a session's lease expires this long after its holder stops renewing it (a replica "
               "that died mid-request frees its session after this)"),
        Option("--state-dtype", str, default_of(open_session_store, "state_dtype"),
               "precision a directory or Redis store keeps each session's SSM state in: float32 or bfloat16 (half "
               "the bytes; widened to float32 on load; greedy agreement after resume in docs/sessions-and-deploy.md)"),
        Option("--prefix-cache-bytes", int, default_of(PrefixCache, "max_bytes"),
               "byte budget of the automatic chat prefix cache"),
        Option("--max-body-bytes", int, default_of(ServerConfig, "max_body_bytes"),
               "largest request body accepted (413 above it), counted as it arrives"),
        Option("--header-timeout", float, HEADER_TIMEOUT_SECONDS,
               "seconds a connection may take to send a request's headers; past it the connection is closed"),
        Option("--body-timeout", float, default_of(ServerConfig, "body_timeout"),
               "seconds a request body may take to arrive whole after its headers; past it 408 and the connection "
               "closed"),
        Option("--sse-ping-seconds", float, default_of(ServerConfig, "sse_ping_seconds"),
               "seconds between keep-alive comments on a quiet SSE stream (a /think waiting on its plan), for proxies"),
        Option("--drain-timeout", float, default_of(ServerConfig, "drain_timeout"),
               "seconds requests in flight may still run after SIGTERM/SIGINT (new ones get 503); then they end with "
               "a final event and the server exits 0; keep it below the container's stop grace period"),
        Option("--api-key", str, "", "comma-separated API keys; when set, requests need 'Authorization: Bearer <key>'"),
        Option("--api-keys-file", str, "", "file with one API key per line (added to --api-key)"),
        Option("--metrics-api-key", str, "", "when set, /metrics needs 'Authorization: Bearer <this key>' "
                                             "(the API keys do not open it)"),
        Option("--dtype", str, "float32", "weights dtype: float32, bfloat16 or float16"),
        Option("--quantize", str, "none",
               "weight-only linear layers over a float32 model: none, bf16 or int8 (per-channel); "
               "state and scan stay float32"),
        Option("--threads", int, 0,
               "torch CPU threads of the engine (0: half the cores the planner workers leave, at least 1; see "
               "docs/performance.md, Contention)"),
        Option("--planner-workers", int, default_of(PlannerPool, "workers"),
               "planner worker processes for requests that think (0: no planner)"),
        Option("--planner-simulator", str, default_of(WorkerSpec, "simulator"),
               "leaf simulator of the search: dynamics (learned), backbone (the model's own step) or auto (the "
               "dynamics when the checkpoint has trained planner weights and it is timed >= 3x cheaper at start-up)"),
        Option("--planner-threads", int, default_of(WorkerSpec, "threads"), "torch threads per planner worker"),
        Option("--planner-nice", int, default_of(WorkerSpec, "nice"),
               "CPU niceness of planner workers, so decoding keeps its core"),
        Option("--planner-max-batch", int, default_of(PlannerPool, "max_batch"),
               "sessions whose trees a worker searches in one batch"),
        Option("--planner-max-pending", int, default_of(PlannerPool, "max_pending"),
               "plan jobs queued at most (the oldest is dropped past it)"),
        Option("--log-level", str, "info", "log level: debug, info, warning, error"),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="CRSM serve: OpenAI-compatible streaming server for Mamba models with cached session states.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for opt in options():
        raw = os.environ.get(opt.env)
        try:
            default = opt.type(raw) if raw is not None else opt.default
        except ValueError:
            parser.error(f"{opt.env}={raw!r} is not a valid {opt.type.__name__} for {opt.flag}")
        parser.add_argument(opt.flag, type=opt.type, default=default, help=f"{opt.help} [env {opt.env}]")
    return parser.parse_args(argv)


def weights_format(args: argparse.Namespace) -> str:
    """What a stored state was computed with besides the checkpoint: the dtype, and the quantization when there is
    one (an int8 replica's states are not a float32 replica's)."""
    return args.dtype if args.quantize == "none" else f"{args.dtype}+{args.quantize}"


def load_api_keys(args: argparse.Namespace) -> frozenset[str]:
    keys = {k.strip() for k in args.api_key.split(",") if k.strip()}
    if args.api_keys_file:
        keys |= {line.strip() for line in Path(args.api_keys_file).read_text().splitlines()
                 if line.strip() and not line.startswith("#")}
    return frozenset(keys)


def build(args: argparse.Namespace):
    """Load the model, start the engine, return (app, engine)."""
    from engine.checkpoint import load_model
    from engine.loop.scheduler import Engine
    from engine.runtime import engine_threads, set_threads
    from engine.sessions import PrefixCache, open_session_store
    from engine.sessions.identity import model_identity
    from engine.text.chat import ChatTemplate
    from server.app import ServerConfig, create_app
    from server.metrics import Metrics

    set_threads(args.threads or engine_threads(args.planner_workers * args.planner_threads))
    loaded = load_model(args.checkpoint, dtype=args.dtype, quantize=args.quantize)
    name = args.model_name or Path(args.checkpoint).resolve().name
    metrics = Metrics(name)
    pool = None
    if args.planner_workers > 0:
        from engine.models import load_planner

        load_planner(args.checkpoint, loaded.model)  # a planner that cannot load stops the start, naming the file
        from planner.pool import PlannerPool
        from planner.worker import WorkerSpec

        spec = WorkerSpec(checkpoint=str(args.checkpoint), simulator=args.planner_simulator,
                          threads=args.planner_threads, nice=args.planner_nice, dtype=args.dtype)
        pool = PlannerPool(spec, workers=args.planner_workers, max_pending=args.planner_max_pending,
                           max_batch=args.planner_max_batch, observer=metrics)
    sessions = open_session_store(
        args.session_store, shape=loaded.model.state_shape(), model_id=model_identity(args.checkpoint, weights_format(args)),
        device=loaded.model.device, max_bytes=args.session_bytes, ttl_seconds=args.session_ttl,
        lease_seconds=args.session_lease_seconds, state_dtype=args.state_dtype)
    engine = Engine(
        loaded.model, loaded.tokenizer, max_running=args.max_running, max_waiting=args.max_waiting,
        prefill_chunk=args.prefill_chunk, max_context=args.max_context, sessions=sessions,
        prefix_cache=PrefixCache(max_bytes=args.prefix_cache_bytes), observer=metrics,
    )
    if pool is not None:
        engine.attach_planner(pool)
    config = ServerConfig(model_name=name, default_max_tokens=args.default_max_tokens,
                          max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout,
                          api_keys=load_api_keys(args), metrics_api_key=args.metrics_api_key.strip(),
                          sse_ping_seconds=args.sse_ping_seconds, drain_timeout=args.drain_timeout,
                          checkpoint_verified=loaded.verified, architecture=loaded.model.config.layer,
                          state_bytes_per_session=loaded.model.state_shape().nbytes_per_sequence)
    app = create_app(engine, loaded.tokenizer, ChatTemplate.for_checkpoint(loaded.tokenizer, args.checkpoint), config,
                     metrics, planner=pool)
    return app, engine


OPENMP_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}


def configure_openmp(environ=os.environ) -> None:
    """OpenMP settings that torch's thread pool reads once, when torch loads: set here, before anything imports
    torch, and inherited by the planner worker processes. A variable the user set is kept.

    Every op of a decode step is a fork-join over the engine's intra-op threads. By default OpenMP's idle
    threads spin; when another process holds one of the cores (a planner worker, another tenant), the thread
    that waits spins out its time slice while the one it waits for is not running, and a step slows down by
    10-40x instead of in proportion. Passive threads sleep and give the core back
    (``loadtest/bench_contention.py``; docs/performance.md, "Contention").
    """
    for name, value in OPENMP_ENVIRONMENT.items():
        environ.setdefault(name, value)


def main(argv: list[str] | None = None) -> int:
    configure_openmp()
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not Path(args.checkpoint).is_dir():
        print(f"error: checkpoint folder {args.checkpoint} does not exist (pass --checkpoint or set CRSM_CHECKPOINT)",
              file=sys.stderr)
        return 2
    if args.planner_simulator not in ("auto", "dynamics", "backbone"):
        print(f"error: --planner-simulator must be auto, dynamics or backbone, not {args.planner_simulator!r}",
              file=sys.stderr)
        return 2
    if "://" in args.session_store and not args.session_store.startswith(("redis://", "rediss://", "unix://")):
        print(f"error: --session-store must be memory, a directory path or redis://HOST:PORT/DB, not "
              f"{args.session_store!r}", file=sys.stderr)
        return 2
    for flag, value in (("--session-lease-seconds", args.session_lease_seconds), ("--session-ttl", args.session_ttl),
                        ("--session-bytes", args.session_bytes)):
        if not 0 < value < math.inf:  # a NaN TTL expired every session on disk; an infinite lease overflowed
            print(f"error: {flag} must be a positive finite number, not {value}", file=sys.stderr)
            return 2
    if args.state_dtype not in ("float32", "bfloat16"):
        print(f"error: --state-dtype must be float32 or bfloat16, not {args.state_dtype!r}", file=sys.stderr)
        return 2
    if args.state_dtype != "float32" and args.session_store == "memory":
        print(f"error: --state-dtype {args.state_dtype} is the precision of a directory or Redis store; the memory "
              "store keeps states as they run (float32)", file=sys.stderr)
        return 2
    if args.threads < 0:
        print(f"error: --threads must be 0 (chosen at start-up) or a positive count, not {args.threads}",
              file=sys.stderr)
        return 2
    if args.quantize not in QUANTIZE_MODES:
        print(f"error: --quantize must be none, bf16 or int8, not {args.quantize!r}", file=sys.stderr)
        return 2
    if args.quantize != "none" and args.dtype != "float32":
        print(f"error: --quantize {args.quantize} runs over a float32 model: drop --dtype {args.dtype}",
              file=sys.stderr)
        return 2
    for flag, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout)):
        if not value > 0:
            print(f"error: {flag} must be a positive number of seconds, not {value}", file=sys.stderr)
            return 2
    if not 0 <= args.drain_timeout < math.inf:
        print(f"error: --drain-timeout must be a number of seconds >= 0, not {args.drain_timeout}", file=sys.stderr)
        return 2
    from engine.checkpoint import CheckpointError
    from engine.sessions import SessionStoreUnavailable
    from engine.sessions.directory import StoreLocked
    from engine.text.chat import ChatTemplateError

    try:
        app, _ = build(args)
    except (CheckpointError, ChatTemplateError, StoreLocked, SessionStoreUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from server.drain import END_GRACE_SECONDS, DrainingServer
    from server.limits import header_timeout_protocol

    serving = app.state.serving
    protocol = header_timeout_protocol(args.header_timeout, lambda: serving.metrics.slow_client("headers"))
    # The drain (server/drain.py) ends every request before uvicorn's own shutdown starts; its graceful timeout
    # only covers responses still writing their last bytes.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, http=protocol,
                            timeout_graceful_shutdown=math.ceil(END_GRACE_SECONDS))
    server = DrainingServer(config, serving.drain, args.drain_timeout)
    server.run()  # a server that started exits from inside (server.drain.exit_now); here it did not start
    return 3  # uvicorn's start-up failure status (e.g. the port is taken)
