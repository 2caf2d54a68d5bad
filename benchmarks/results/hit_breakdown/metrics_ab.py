"""Per-hit cost of the three metric calls a near-cache hit makes, old vs new metrics.py, alternated.

    .venv/bin/python benchmarks/results/metrics_memo/metrics_ab.py    # from the repository root (~20 s)

"before" is serve_app/metrics.py of commit 0ae53a4 (read with git show), "after" the working tree's.
Ray's own metric record is replaced by a no-op in both: this times our layer only.
"""
import importlib.util, os, statistics, subprocess, sys, tempfile, time
old_src = subprocess.run(["git", "show", "0ae53a4:serve_app/metrics.py"], capture_output=True, text=True, check=True).stdout
OLD = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
OLD.write(old_src)
OLD.close()
def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); return m
mods = {"before (0ae53a4)": load(OLD.name, "m_old"), "after": load("serve_app/metrics.py", "m_new")}
class FakeMetric:
    def observe(self, v, tags=None): pass
    def inc(self, v, tags=None): pass
    def set(self, v, tags=None): pass
def make(m):
    sink = m.RaySink(flush_s=3600); sink._metric = lambda name: FakeMetric(); sink._thread = object()
    c = m.Counters(sink=sink)
    def hit():
        c.inc("cache_ops", tier="near", op="get", result="hit")
        c.inc("predictions", model="qa", variant="default", outcome="ok", cache="HIT-MEMORY")
        c.observe("prediction_latency_ms", 0.3, model="qa", variant="default")
    return hit
fns = {k: make(m) for k, m in mods.items()}
res = {k: [] for k in fns}
N = 50000
for rnd in range(7):
    for k, fn in fns.items():
        t0 = time.process_time()
        for _ in range(N): fn()
        res[k].append((time.process_time() - t0) / N * 1e6)

for k, v in res.items():
    print(f"{k}: median {statistics.median(v):.2f} us per hit (3 metric calls, Ray's record excluded); rounds {[round(x,2) for x in v]}")
os.unlink(OLD.name)
