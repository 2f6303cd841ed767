#!/usr/bin/env bash
# Before/after: two or more ringway binaries and nginx, interleaved in each round under the same
# wrk load, as a user runs them (one worker each, a one-thread client, a one-worker nginx origin
# with 64-byte answers, ringway on its default config). Prints per round req/s, CPU per request
# (the proxy process, user + system, from /proc) and p99, then the medians of the ratios to
# nginx taken round by round.
#
#   bash perf/ab.sh CONNS ROUNDS SECONDS BIN [BIN ...]          # keep-alive
#   MODE=close bash perf/ab.sh 64 5 4 old/ringway new/ringway   # a new connection per request
#   W=2 bash perf/ab.sh ...                                       # 2 workers for ringway and nginx
#
# Needs nginx and wrk. Load only ever goes to 127.0.0.1 (ports 18600-18681).
set -euo pipefail
[[ $# -ge 4 ]] || { sed -n 2,10p "$0"; exit 2; }
for t in nginx wrk python3; do command -v $t >/dev/null || { echo "needs $t"; exit 2; }; done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
D=$(mktemp -d /tmp/ringway-ab.XXXXXX); chmod 755 "$D"
. "$(dirname "$0")/lib.sh"
cleanup() { ng_stop; rm -rf "$D"; }
trap cleanup EXIT
mkdir -p "$D/www"
head -c 64 /dev/zero | tr '\0' 'a' > "$D/www/b64"; chmod -R a+rX "$D/www"
{ ng_head origin 1
  echo "  sendfile on; tcp_nopush on; open_file_cache max=64 inactive=600s; default_type application/octet-stream;
  server { listen 127.0.0.1:18600 backlog=4096; root $D/www; location / { } } }"
} > "$D/origin.conf"
{ ng_head proxy "${W:-1}"; ng_upstream 18600
  echo "  server { listen 127.0.0.1:18681 backlog=4096; location / { $NG_PASS proxy_max_temp_file_size 0; } } }"
} > "$D/proxy.conf"
{ rw_head 18680 18600; printf '[[routes]]\npath_prefix = "/"\nupstream = "origin"\n'; } > "$D/ringway.toml"
ng_start origin
ng_start proxy
AB_DIR=$D python3 "$(dirname "$0")/ab.py" "$@"
