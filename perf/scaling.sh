#!/usr/bin/env bash
# Per-core scaling: ringway and nginx side by side with workers 1..N (issue 14), 64-byte
# keep-alive responses, 256 connections. For each target, efficiency(n) = req/s with n workers
# divided by (n x req/s with 1 worker); the goal is at least 0.75.
#
#   bash perf/scaling.sh [max_workers (default: nproc)] [more perf/bench.py options]
#   bash perf/scaling.sh 16 --wrk-threads 8 --rounds 3
#
# The load generator and the origin share the machine with the proxy, so on a machine with few
# cores the figure mostly measures them; it is meant for machines with many cores (give wrk
# enough threads). Load only ever goes to 127.0.0.1.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
max="${1:-$(nproc)}"
[ "$#" -gt 0 ] && shift
workers="$(seq -s, 1 "$max")"
results="$(mktemp -d /tmp/ringway-scaling.XXXXXX)"
trap 'rm -rf "$results"' EXIT
bash "$here/run.sh" --targets ringway,nginx --bodies 64B --conns 256 --modes keepalive \
    --workers "$workers" --idle-conns 0 --results "$results" "$@" >&2
python3 - "$results" <<'PY'
import glob, json, sys
path = sorted(glob.glob(sys.argv[1] + "/*/results.json"))[-1]
data = json.load(open(path))
rps = {}
for sc in data["scenarios"]:
    for target, s in sc["summary"].items():
        rps.setdefault(target, {})[sc["workers"]] = s["rps"]
print("| target | workers | req/s | efficiency |")
print("|---|---:|---:|---:|")
for target, by_n in rps.items():
    one = by_n.get(1)
    for n in sorted(by_n):
        eff = by_n[n] / (n * one) if one else float("nan")
        print(f"| {target} | {n} | {by_n[n]:,.0f} | {eff:.2f} |")
PY
