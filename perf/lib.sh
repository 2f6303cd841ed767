# Sourced by the perf/ scripts (`. "$(dirname "$0")/lib.sh"`): the nginx and ringway config
# pieces they share, so that every comparison runs nginx with the same settings and a change to
# them is made once. Every function writes under $D, the calling script's temporary directory.

# ng_head NAME [WORKERS] [DAEMON]: an nginx config from its first line to inside `http {`: pid and
# error log named after NAME, no access log, long keep-alive, temp paths under $D. DAEMON "off"
# runs one process without a master (for callgrind).
ng_head() {
  local name=$1 workers=${2:-1} daemon=${3:-on}
  echo "worker_processes $workers; daemon $daemon; master_process $daemon; pid $D/$name.pid; error_log $D/$name.err warn;
worker_rlimit_nofile 20000; events { worker_connections 10000; }
http { access_log off; keepalive_timeout 75s; keepalive_requests 1000000; tcp_nodelay on;
  client_body_temp_path $D/$name-cb; proxy_temp_path $D/$name-p; fastcgi_temp_path $D/$name-f;
  uwsgi_temp_path $D/$name-u; scgi_temp_path $D/$name-s;"
}

# ng_upstream ORIGIN_PORT [KEEPALIVE=512]: the upstream group `origin`, its idle connections kept.
ng_upstream() {
  echo "  upstream origin { server 127.0.0.1:$1; keepalive ${2:-512}; keepalive_requests 1000000; keepalive_timeout 60s; }"
}

# The directives of a location that proxies to `origin` over keep-alive HTTP/1.1.
NG_PASS='proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection "";'

# ng_start NAME: starts nginx on $D/NAME.conf.
ng_start() { nginx -p "$D" -c "$D/$1.conf" -e "$D/$1.err"; }

# ng_stop: stops every nginx started with a pid file in $D.
ng_stop() {
  local f
  for f in "$D"/*.pid; do [[ -f $f ]] && kill "$(cat "$f")" 2>/dev/null || true; done
}

# rw_head PORT ORIGIN_PORT [WORKERS=1]: the start of a ringway config: one listener on PORT and the
# upstream group `origin`; routes follow.
rw_head() {
  printf '[server]\nworkers = %s\n[[listeners]]\naddress = "127.0.0.1:%s"\nbacklog = 4096\n[upstreams.origin]\nendpoints = [{ address = "127.0.0.1:%s" }]\n' \
    "${3:-1}" "$1" "$2"
}

# cache_configs ORIGIN_PORT GW_PORT BUDGET: what perf/cache.sh and perf/cache-instr.sh share: an
# nginx origin ($D/origin.conf) answering 1 KiB with `Cache-Control: max-age=3600` (under /ns/
# `no-store`), and a ringway config ($D/ringway.toml) with the same route without a cache under
# /plain/ and with one elsewhere, the store bounded by BUDGET.
cache_configs() {
  local body
  body=$(printf '%01023d' 0)
  { ng_head origin 1
    echo "  server { listen 127.0.0.1:$1 backlog=4096; default_type text/plain;
      location / { add_header Cache-Control \"max-age=3600\"; return 200 \"$body\n\"; }
      location /ns/ { add_header Cache-Control \"no-store\"; return 200 \"$body\n\"; } } }"
  } > "$D/origin.conf"
  { rw_head "$2" "$1"
    printf '[cache]\nmax_bytes_per_worker = "%s"\n' "$3"
    printf '[[routes]]\npath_prefix = "/plain/"\nupstream = "origin"\n'
    printf '[[routes]]\npath_prefix = "/"\nupstream = "origin"\ncache = {}\n'
  } > "$D/ringway.toml"
}

# wait_200 URL...: waits (at most 10 s each) until every URL answers 200; exits 1 naming the first
# that does not.
wait_200() {
  local u code
  for u in "$@"; do
    code=000
    for _ in $(seq 100); do
      code=$(curl -s -o /dev/null -w '%{http_code}' "$u" || true)
      [[ $code == 200 ]] && break
      sleep 0.1
    done
    [[ $code == 200 ]] || { echo "$u answered $code"; exit 1; }
  done
}

# Writes to $1 a wrk script that asks for a new URL each request: $PREFIX (default /m/), then
# "$ROUND-" when ROUND is set, then the request's number (each wrk run counts from 1).
unique_lua() {
  cat > "$1" <<'EOF'
local n = 0
local round = os.getenv("ROUND")
local prefix = (os.getenv("PREFIX") or "/m/") .. (round and (round .. "-") or "")
request = function()
  n = n + 1
  return wrk.format("GET", prefix .. n)
end
EOF
}
