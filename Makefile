# serve_app: the README's two quickstart commands are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= serve_config.yaml
RAY_HEAD_ARGS ?= --head --num-cpus 2 --dashboard-host 127.0.0.1 --dashboard-port 8265 --metrics-export-port 8080 --disable-usage-stats
# Serve's serving mode for `make run` (serve_app/serve_mode.py): fast = throughput-optimized with
# HAProxy (shipped); proxy = Serve's Python proxy. Read when Ray starts: `make stop` first to switch.
SERVE_MODE ?= fast
SERVE_ENV_fast := RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1
SERVE_ENV_proxy :=
export RAY_USAGE_STATS_ENABLED := 0
# Ray 2.60 turns token auth on for a cluster `ray start` brings up once ~/.ray/auth_token exists
# (any earlier `ray.init()` on this machine writes it), and `serve deploy` then fails with
# AuthenticationError unless every ray/serve process agrees on the mode. The cluster `make run`
# starts listens on 127.0.0.1: auth off by default; `make run RAY_AUTH_MODE=token` to turn it on.
RAY_AUTH_MODE ?= disabled
export RAY_AUTH_MODE
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: install install-test redis-server promtool wrk run deploy status stop test test-unit test-integration clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The integration tests start their own redis-server: install Debian's package if missing.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; }

# The monitoring tests check the Prometheus rules with promtool: install Debian's package if missing
# (on a systemd machine the package would also start a Prometheus service: switch it off).
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  echo "installing promtool (Debian package prometheus)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; \
	  if [ -d /run/systemd/system ]; then $$SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true; fi; }

# benchmarks/ingress_floor.py also drives wrk (a C load generator) when it is installed.
wrk:
	@command -v wrk >/dev/null 2>&1 || { \
	  echo "installing wrk (Debian package)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk; }

## make run: install, start a local Ray head (dashboard :8265, metrics :8080), deploy CONFIG,
## wait until ready and show one prediction per model. Offline: the LM simulator answers.
run: install
	@case "$(SERVE_MODE)" in fast|proxy) ;; *) echo "SERVE_MODE must be fast or proxy, not '$(SERVE_MODE)'" >&2; exit 2;; esac
	@$(BIN)/ray status >/dev/null 2>&1 || env $(SERVE_ENV_$(SERVE_MODE)) $(BIN)/ray start $(RAY_HEAD_ARGS)
	$(BIN)/serve deploy $(CONFIG)
	$(BIN)/python -m serve_app.cli wait-ready --timeout-s 300
	$(BIN)/python -m serve_app.cli demo
	@echo "Serving on http://127.0.0.1:8000 (Ray dashboard: http://127.0.0.1:8265). Stop with: make stop"

deploy: install
	$(BIN)/serve deploy $(CONFIG)

status:
	$(BIN)/serve status

stop:
	-$(BIN)/serve shutdown -y
	-$(BIN)/ray stop

## make test: install what the tests need (venv, redis-server) and run unit + integration tests.
test: install-test redis-server promtool
	$(BIN)/python -m pytest tests -q -rs

test-unit: install-test promtool
	$(BIN)/python -m pytest tests/unit -q

test-integration: install-test redis-server
	$(BIN)/python -m pytest tests/integration -q -rs

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
