#!/bin/bash
# Call 1: machine facts, versions of the packages we do NOT carry, stage part 1 of the wheel bundle.
set -x
nproc; lscpu | grep -E "Model name|^CPU\(s\)|Thread|Socket|MHz" ; free -g; uname -a; cat /proc/loadavg; df -h /tmp | tail -1
ulimit -n; which python3 xz tar redis-server haproxy; python3 -V
python3 -c "import sys; print(sys.executable, sys.prefix)"
SP=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); echo "site-packages: $SP"
touch "$SP/.wtest" && rm "$SP/.wtest" && echo "venv writable"
python3 - <<'PY'
from importlib.metadata import version, PackageNotFoundError
from packaging.specifiers import SpecifierSet
need = {"numpy": ">=1.25", "matplotlib": ">=3.8,<4", "pillow": ">=9", "fonttools": ">=4.28.2", "kiwisolver": ">=1.3.1",
        "contourpy": ">=1.0.1", "uvloop": ">=0.15.1", "hf-xet": ">=1.6.0,<2", "tokenizers": ">=0.21.0,<1",
        "tiktoken": ">=0.8.0,<1", "huggingface-hub": ">=0.34.0,<2", "cycler": ">=0.10", "pyparsing": ">=3"}
for n, spec in need.items():
    try:
        v = version(n)
    except PackageNotFoundError:
        v = None
    ok = v is not None and SpecifierSet(spec).contains(v, prereleases=True)
    print(f"SKIPCHECK {n} device={v} need{spec} -> {'OK' if ok else 'NOT SATISFIED'}")
for n in ("aiohttp", "grpcio", "protobuf", "pydantic", "fastapi", "uvicorn", "starlette", "ray", "dspy", "redis", "httpx", "anyio", "pyyaml", "msgpack", "click"):
    try:
        print("DEVICE", n, version(n))
    except PackageNotFoundError:
        print("DEVICE", n, "-")
PY
mkdir -p /tmp/whl /tmp/stored && cp .whl1/part00 /tmp/whl/ && ls -la /tmp/whl
# Install the wheels that are complete in the first half of the xz stream now (the rest in call 2).
xz -dc /tmp/whl/part00 2>/dev/null | tar -x -C /tmp/stored 2>/dev/null
good=(); for w in /tmp/stored/*.whl; do python3 -c "import sys, zipfile; sys.exit(0 if zipfile.ZipFile(sys.argv[1]).testzip() is None else 1)" "$w" 2>/dev/null && good+=("$w") || { echo "incomplete: $w"; rm -f "$w"; }; done
echo "complete wheels in part 1: ${#good[@]}"
time python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check "${good[@]}" 2>&1 | tail -5
echo "probe done"
