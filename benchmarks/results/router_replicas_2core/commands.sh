cd /work/main
for n in 2 1 2 1; do
  .venv/bin/python -m benchmarks.perf_bench --scenarios hit,zipf --peers '' --router-replicas $n --zipf-rates 300 --out /tmp/mb/rr_$n > /tmp/mb/rr_$n.log 2>&1
  grep -E "hit/closed c=64|zipf/closed c=64" -A1 /tmp/mb/rr_$n.log | grep -- "->" | sed "s/^/[router=$n] /" | cut -c1-260 >> /tmp/mb/rr_summary.txt
done
echo done >> /tmp/mb/rr_summary.txt
