#!/bin/bash
# bench.sh LABEL [perf_bench args...]: run perf_bench from the HEAD snapshot; copy results flat into $OUT.
label=$1; shift
ulimit -n 65536 || true
cd "$(dirname "$0")/snap"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
echo "== $label: python -m benchmarks.perf_bench $* --out /tmp/res/$label  (commit $(cat COMMIT)) at $(date -u +%FT%TZ)"
t0=$SECONDS
timeout -s TERM "${BENCH_MAX_S:-560}" python3 -m benchmarks.perf_bench "$@" --out /tmp/res/$label > "$OUT/${label}.log" 2>&1
rc=$?
tail -40 "$OUT/${label}.log"
for f in perf.json perf.md; do [ -f /tmp/res/$label/$f ] && cp /tmp/res/$label/$f "$OUT/${label}_$f"; done
echo "== $label rc=$rc after $((SECONDS - t0)) s"
