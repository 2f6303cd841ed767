#!/usr/bin/env bash
# What rate limits cost: ringway's CPU per request with no limit, a local limit and a Redis
# limit (each high enough never to refuse), against one nginx origin, in one run, with nginx
# proxying the same origin as the reference. Prints µs of proxy CPU per request (from
# /proc/PID/stat) and req/s for each, A B C D in turn for several rounds.
#
#   bash perf/limits.sh [rounds=3] [seconds=5]
#
# Needs nginx, redis-server and wrk (apt-get install -y nginx redis-server wrk) and a release
# build (cargo build --release; RINGWAY_BIN=path/to/ringway runs another). Traffic stays on 127.0.0.1.
set -euo pipefail
rounds="${1:-3}"
secs="${2:-5}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${RINGWAY_BIN:-$repo/target/release/ringway}"
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
export PATH="$PATH:/usr/sbin:/sbin"
D="$(mktemp -d /tmp/ringway-limits.XXXXXX)"
. "$repo/perf/lib.sh"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; ng_stop; rm -rf "$D"; }
trap cleanup EXIT

origin=18181
redis_port=18179
{ ng_head origin 1; echo "  server { listen 127.0.0.1:$origin; location / { return 200 \"ok\"; } } }"; } > "$D/origin.conf"
{ ng_head proxy 1; ng_upstream $origin 256; echo "  server { listen 127.0.0.1:18190; location / { $NG_PASS } } }"; } > "$D/proxy.conf"
ng_start origin
ng_start proxy
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!)

gw() { # name port limits-toml backend-toml
  { rw_head "$2" $origin; printf '%s\n[[routes]]\nname = "all"\nupstream = "origin"\n%s\n' "$4" "$3"; } > "$D/$1.toml"
  RINGWAY_LOG=warn "$bin" run -c "$D/$1.toml" & pids+=($!)
  eval "pid_$1=$!"
}
lim='rate_limits = [{ key = "client_ip", rate = 100000000, per = "1s" }]'
gw off 18191 "" ""
gw local 18192 "$lim" ""
gw redis 18193 "$lim" "[rate_limiting]
backend = \"redis\"
[rate_limiting.redis]
address = \"127.0.0.1:$redis_port\""
wait_200 http://127.0.0.1:18190/ http://127.0.0.1:18191/ http://127.0.0.1:18192/ http://127.0.0.1:18193/
pid_nginx=$(pgrep -P "$(cat "$D/proxy.pid")" | head -1)  # its one worker

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
run() { # label pid port
  local t0 t1 out rps
  t0=$(cpu_ticks "$2")
  out=$(wrk -t1 -c64 -d"${secs}s" "http://127.0.0.1:$3/" 2>&1)
  t1=$(cpu_ticks "$2")
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  awk -v l="$1" -v d=$((t1 - t0)) -v hz="$hz" -v r="$rps" -v s="$secs" \
    'BEGIN { printf "%-14s %10.0f req/s %8.2f us CPU/req\n", l, r, d / hz * 1e6 / (r * s) }'
}
for r in $(seq 1 "$rounds"); do
  echo "round $r"
  run "nginx" "$pid_nginx" 18190
  run "ringway-off" "$pid_off" 18191
  run "ringway-local" "$pid_local" 18192
  run "ringway-redis" "$pid_redis" 18193
done
echo "redis: $(redis-cli -p "$redis_port" INFO commandstats | grep -E 'cmdstat_evalsha' || echo 'no EVALSHA')"
