"""Run the simulator standalone: ``python -m serve_app.lmsim --port 8100 --latency-ms 50``.

Prints one line with the base URL once the socket is bound (``--port 0`` picks a free port),
then serves with uvicorn: one worker, warning-level logs, no access log (it costs throughput).
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence

from serve_app.lmsim.app import build_sim_app
from serve_app.lmsim.core import KnobError, Knobs, SimCore, validate_knobs

_EPILOG = """knobs (also settable at run time: PUT /admin/knobs with a JSON partial, optional "model"):
  latency-ms      fixed delay before every answer (default 0)
  jitter-ms       extra uniform delay in [0, jitter-ms] (default 0)
  error-rate      probability (0..1) of an HTTP error reply with status error-status
  error-status    429, 500, 503 or 529 (default 500); retry-after-s adds Retry-After to 429/503
  hang-rate       probability (0..1) that a call never answers until the client disconnects,
                  or until hang-s (default 3600) elapses (then 504)
  malformed-rate  probability (0..1) of a 200 reply whose content lacks the DSPy field markers
  seed            seeds the per-model outcome/jitter draws (answers themselves are always
                  deterministic functions of the prompt's inputs)
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """CLI flags: --host, --port, --models, --ledger-size, plus one flag per knob."""
    defaults = Knobs()
    p = argparse.ArgumentParser(
        prog="python -m serve_app.lmsim",
        description="OpenAI-compatible LM simulator (POST /v1/chat/completions) for offline DSPy tests.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8100, help="bind port; 0 picks a free one (default 8100)")
    p.add_argument("--models", default="sim-model", help="comma-separated names for GET /v1/models")
    p.add_argument("--ledger-size", type=int, default=100_000, help="ledger entries kept (default 100000)")
    p.add_argument("--latency-ms", type=float, default=defaults.latency_ms)
    p.add_argument("--jitter-ms", type=float, default=defaults.jitter_ms)
    p.add_argument("--error-rate", type=float, default=defaults.error_rate)
    p.add_argument("--error-status", type=int, default=defaults.error_status, choices=(429, 500, 503, 529))
    p.add_argument("--retry-after-s", type=float, default=defaults.retry_after_s)
    p.add_argument("--hang-rate", type=float, default=defaults.hang_rate)
    p.add_argument("--hang-s", type=float, default=defaults.hang_s)
    p.add_argument("--malformed-rate", type=float, default=defaults.malformed_rate)
    p.add_argument("--seed", type=int, default=defaults.seed)
    return p.parse_args(argv)


def knobs_from_args(args: argparse.Namespace) -> Knobs:
    """Validated knobs from parsed flags (raises KnobError)."""
    return validate_knobs({name: getattr(args, name) for name in Knobs.model_fields})


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    args = parse_args(argv)
    try:
        knobs = knobs_from_args(args)
    except KnobError as exc:
        print(f"lmsim: {exc}", file=sys.stderr)
        return 2
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    core = SimCore(knobs, ledger_size=args.ledger_size, models=models or ("sim-model",))
    # Bind first so the printed URL is real even with --port 0, then hand the socket to uvicorn.
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    print(f"lmsim listening on http://{host}:{port}/v1", flush=True)
    config = uvicorn.Config(build_sim_app(core), log_level="warning", access_log=False, workers=1)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
