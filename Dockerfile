# serve_app on Ray 2.60: the image of every Ray pod (head and workers) of the KubeRay RayService.
#   docker build -t serve-app:0.1.0 .
# The base is pinned to the Ray version the package requires (pyproject: ray[serve]>=2.60,<2.61);
# in production pin its digest too: --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311@sha256:<digest>.
# No secret is baked in: provider keys and Redis URLs arrive at run time from Kubernetes Secrets.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311
FROM ${RAY_IMAGE}

ENV LITELLM_LOCAL_MODEL_COST_MAP=True \
    DSPY_CACHEDIR=/tmp/dspy_cache \
    RAY_USAGE_STATS_ENABLED=0 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The image's user `ray` (uid 1000, gid 100) owns the app; the pods run read-only as that user.
WORKDIR /home/ray/app
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 serve_app ./serve_app
COPY --chown=1000:100 configs ./configs
COPY --chown=1000:100 serve_config.yaml ./

# Installed in place (-e): program states in configs/ resolve against the project root, whatever
# directory a Ray worker runs in. `import` at build time fails the build on a broken install.
USER 1000:100
RUN python -m pip install --no-cache-dir -e . \
 && python -c "import serve_app.app, serve_app.lmsim; print('serve_app ok')"
