"""Client-side load generators and benchmarks; each writes JSON and compares against a baseline run beside it.

``bench_engine`` (the engine against Hugging Face transformers, same weights),
``bench_serving`` (streams over HTTP against the in-process engine, resumed
sessions), ``bench_planner`` (planner on against off), ``run`` (a closed- or
open-loop load with TTFT/TPOT/ITL/E2E percentiles), ``mixed`` (every kind of
request, for the dashboard), plus helpers to start a loopback server
(``process``) and a local Prometheus (``prometheus``, ``dashboard_png``).
Traffic goes to loopback only, bounded in count and time.
"""
