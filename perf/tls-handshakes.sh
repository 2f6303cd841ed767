#!/usr/bin/env bash
# TLS handshakes per second: ringway vs nginx, one worker each, the same ECDSA P-256
# certificate, the same client (`openssl s_time`, one process), loopback only.
#
#   bash perf/tls-handshakes.sh              # 10 s per measurement
#   SECONDS_EACH=5 bash perf/tls-handshakes.sh
#   NO_BUILD=1 bash perf/tls-handshakes.sh   # use target/release/ringway as it is
#
# For each of TLS 1.3 and TLS 1.2: full handshakes (`-new`: a new session each time) and
# resumed ones (`-reuse`). s_time opens a connection, handshakes, and closes; no request is
# sent. The client runs on the same machine and costs CPU too (key exchange), so the figures
# compare the two servers under one client; they are not either server's ceiling.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$repo"
secs="${SECONDS_EACH:-10}"
export PATH="$PATH:/usr/sbin:/sbin"
for t in openssl nginx; do
    command -v "$t" >/dev/null || { echo "needs $t" >&2; exit 1; }
done
[ "${NO_BUILD:-0}" = 1 ] || cargo build --release -q

work="$(mktemp -d /tmp/ringway-tls-perf.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$work/key.pem" -out "$work/cert.pem" -days 2 -subj /CN=bench.test \
    -addext "subjectAltName=DNS:bench.test" 2>/dev/null

cat >"$work/ringway.toml" <<EOF
[server]
workers = 1
[[listeners]]
address = "127.0.0.1:18443"
tls = { certificates = [{ cert = "$work/cert.pem", key = "$work/key.pem" }] }
[[routes]]
direct = { status = 200, body = "ok" }
EOF
RINGWAY_LOG=warn target/release/ringway run -c "$work/ringway.toml" &
pids+=($!)

mkdir -p "$work/nginx/logs"
cat >"$work/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $work/nginx/nginx.pid;
error_log $work/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    ssl_session_cache shared:SSL:10m;
    ssl_session_tickets on;
    server {
        listen 127.0.0.1:18444 ssl;
        ssl_certificate $work/cert.pem;
        ssl_certificate_key $work/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / { return 200 "ok"; }
    }
}
EOF
nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" &
pids+=($!)
sleep 1

rate() { # port, version flag, -new|-reuse: handshakes per wall-clock second
    local t0 t1 n
    t0=$(date +%s.%N)
    n=$(openssl s_time -connect "127.0.0.1:$1" "$2" "$3" -time "$secs" 2>/dev/null |
        awk '/connections in [0-9.]+s;/ { print $1; exit }')
    t1=$(date +%s.%N)
    awk -v n="${n:-0}" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", n / (b - a) }'
}

printf '%-10s %-8s %14s %14s\n' "version" "mode" "ringway" "nginx"
for v in -tls1_3 -tls1_2; do
    for m in -new -reuse; do
        printf '%-10s %-8s %14s %14s\n' "${v#-}" "${m#-}" "$(rate 18443 "$v" "$m")" "$(rate 18444 "$v" "$m")"
    done
done
echo "(handshakes per wall-clock second, one s_time client process, $secs s each)"
