"""Benchmark harness for serve_app (run from the repository root).

- ``benchmarks.loadgen``: the HTTP load generator, always run as its own process.
- ``benchmarks.cluster``: start/stop a local Ray + Serve, the LM simulator and a
  redis-server; ``serve deploy`` generated configs through the real CLI.
- ``benchmarks.report``: machine/commit header, result files, Markdown tables.
- ``benchmarks.cache_bench``: the "Shared cache" scenario
  (``python -m benchmarks.cache_bench --quick``).

Importing any of these modules has no side effects (no processes, no env changes).
"""
