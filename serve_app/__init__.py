"""serve_app: serve DSPy programs on Ray Serve with caching, circuit breakers, per-model
autoscaling and cost accounting."""

import os

# litellm fetches its price map from the internet on first use (5 s timeout) unless told to
# use the copy it ships; serving must work offline, so default to the local copy. This only
# sets a default: an operator's explicit value wins.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

__version__ = "0.1.0"
