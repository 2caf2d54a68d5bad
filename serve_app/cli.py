"""Small operator commands: ``python -m serve_app.cli <command>``.

- ``wait-ready [--url URL] [--timeout-s N]``: poll ``/ready`` until every model and the cache
  answer, printing progress; exit 1 with the last status on timeout.
- ``demo [--url URL]``: send one prediction per model and print the answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


def _get(url: str, timeout_s: float = 5.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return 0, str(exc)


def wait_ready(url: str, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    started = time.monotonic()
    while time.monotonic() < deadline:
        status, body = _get(f"{url}/ready")
        if status == 200:
            print(f"ready after {time.monotonic() - started:.0f}s: {url}")
            return 0
        if body != last:
            waiting = body if status == 0 else {k: v for k, v in (body or {}).items() if k != "cache"}
            print(f"[{time.monotonic() - started:4.0f}s] not ready yet ({status or 'no answer'}): {waiting}")
            last = body
        time.sleep(1.0)
    print(f"not ready after {timeout_s:.0f}s; see `serve status` and the Ray dashboard", file=sys.stderr)
    return 1


_DEMO_INPUTS = {
    "qa": {"question": "What is Ray Serve?"},
    "classify": {"text": "I love how fast this is."},
    "pipeline": {"document": "Ray Serve is a scalable model serving library built on Ray."},
}


def demo(url: str) -> int:
    status, models = _get(f"{url}/v1/models")
    if status != 200:
        print(f"GET /v1/models failed ({status}): {models}", file=sys.stderr)
        return 1
    for model in models["models"]:
        inputs = _DEMO_INPUTS.get(model["name"]) or {f["name"]: "example" for f in model["inputs"]}
        body = json.dumps({"model": model["name"], "inputs": inputs}).encode()
        req = urllib.request.Request(
            f"{url}/v1/predict", data=body, headers={"content-type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
            print(f"$ curl -X POST {url}/v1/predict -H 'content-type: application/json' -d '{body.decode()}'")
            print(f"  -> {resp.status} X-Cache={resp.headers.get('X-Cache')} {json.dumps(answer['outputs'])[:200]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wait-ready", help="wait until /ready answers 200")
    w.add_argument("--url", default=DEFAULT_URL)
    w.add_argument("--timeout-s", type=float, default=180.0)
    d = sub.add_parser("demo", help="one prediction per model")
    d.add_argument("--url", default=DEFAULT_URL)
    args = parser.parse_args(argv)
    if args.command == "wait-ready":
        return wait_ready(args.url, args.timeout_s)
    return demo(args.url)


if __name__ == "__main__":
    sys.exit(main())
