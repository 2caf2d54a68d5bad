#!/bin/bash
# Call 2: install, then the peers (1,2,4 workers), then ours 1 Router / 1 qa if the time allows.
T0=$SECONDS; D=$(dirname "$0")
COMMON="--duration-s 5 --warmup-s 1 --miss-rates 100,200,400,600,800,1000,1200,1500 --zipf-rates 200,400,800,1200,1600,2000,2500"
bash $D/install.sh > $OUT/install.log 2>&1; rc=$?; tail -25 $OUT/install.log; [ $rc = 0 ] || exit $rc
BENCH_MAX_S=$((580 - (SECONDS - T0))) bash $D/bench.sh peers --no-ours --peers 1,2,4 --scenarios miss,zipf,lm1s $COMMON
left=$((585 - (SECONDS - T0))); echo "left: $left s"
if [ $left -gt 250 ]; then BENCH_MAX_S=$left bash $D/bench.sh ours1x1 --peers '' --router-replicas 1 --qa-replicas 1 --scenarios miss,hit,zipf,lm1s $COMMON; else echo "ours1x1 DEFERRED"; fi
echo "run2 done after $((SECONDS - T0)) s"
