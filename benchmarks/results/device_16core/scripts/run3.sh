#!/bin/bash
# Call 3: ours 4 Routers / 4 qa, then (if deferred) ours 1/1, then ours 2/2 if the time allows.
T0=$SECONDS; D=$(dirname "$0")
COMMON="--duration-s 5 --warmup-s 1 --miss-rates 100,200,400,600,800,1000,1200,1500 --zipf-rates 200,400,800,1200,1600,2000,2500"
BENCH_MAX_S=330 bash $D/bench.sh ours4x4 --peers '' --router-replicas 4 --qa-replicas 4 --scenarios miss,hit,zipf,lm1s $COMMON
shapes="2"; [ -f /tmp/res/ours1x1/perf.json ] || shapes="1 2"; echo "after 4x4: shapes $shapes"
for shape in $shapes; do
  left=$((585 - (SECONDS - T0))); echo "left: $left s"
  [ $left -gt 230 ] || { echo "ours${shape}x${shape} SKIPPED (time)"; continue; }
  BENCH_MAX_S=$left bash $D/bench.sh ours${shape}x${shape} --peers '' --router-replicas $shape --qa-replicas $shape --scenarios miss,hit,zipf,lm1s $COMMON
done
echo "run3 done after $((SECONDS - T0)) s"
