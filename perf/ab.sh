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
cleanup() {
  for f in "$D"/*/nginx.pid; do [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null || true; done
  rm -rf "$D"
}
trap cleanup EXIT
mkdir -p "$D/www" "$D/origin" "$D/proxy"
head -c 64 /dev/zero | tr '\0' 'a' > "$D/www/b64"; chmod -R a+rX "$D/www"
common() { # $1 dir, $2 workers
  echo "worker_processes $2; daemon on; pid $1/nginx.pid; error_log $1/error.log warn;
worker_rlimit_nofile 20000; events { worker_connections 10000; }
http { access_log off; keepalive_timeout 75s; keepalive_requests 1000000; tcp_nodelay on;
  client_body_temp_path $1/cb; proxy_temp_path $1/pt; fastcgi_temp_path $1/ft; uwsgi_temp_path $1/ut; scgi_temp_path $1/st;"
}
{ common "$D/origin" 1
  echo "  sendfile on; tcp_nopush on; open_file_cache max=64 inactive=600s; default_type application/octet-stream;
  server { listen 127.0.0.1:18600 backlog=4096; root $D/www; location / { } } }"
} > "$D/origin/nginx.conf"
{ common "$D/proxy" "${W:-1}"
  echo "  upstream origin { server 127.0.0.1:18600; keepalive 512; keepalive_requests 1000000; keepalive_timeout 60s; }
  server { listen 127.0.0.1:18681 backlog=4096;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_max_temp_file_size 0; } } }"
} > "$D/proxy/nginx.conf"
cat > "$D/ringway.toml" <<TOML
[server]
workers = 1
[[listeners]]
address = "127.0.0.1:18680"
backlog = 4096
[upstreams.origin]
endpoints = [{ address = "127.0.0.1:18600" }]
[[routes]]
path_prefix = "/"
upstream = "origin"
TOML
nginx -p "$D/origin" -c "$D/origin/nginx.conf" -e "$D/origin/error.log"
nginx -p "$D/proxy" -c "$D/proxy/nginx.conf" -e "$D/proxy/error.log"
AB_DIR=$D python3 "$(dirname "$0")/ab.py" "$@"
