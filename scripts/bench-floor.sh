#!/usr/bin/env bash
# The machine's floor for "latency a proxy adds": nginx, a plain reverse proxy written in C
# that does no auth, routing, parsing or accounting, measured by the same harness, on the same
# cores, against the same mock as scripts/bench.sh measures the gateway. Whatever nginx adds
# at concurrency 1 is the cost of the extra loopback hop and its cross-core wake-ups on this
# machine, which no proxy can go below.
#
#   scripts/bench-floor.sh              # CONCURRENCY="1 64", MODES="json stream"
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
bench=${BENCH_DIR:-$root/../shared/bench}
[ -x "$bench/run.sh" ] || { echo "bench harness not found at $bench (set BENCH_DIR)" >&2; exit 2; }
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || scripts/services.sh
[ -x "$bench/.cache/target/release/mock-upstream" ] || "$bench/setup.sh" mock
if [ "${LOADGEN:-oha}" = oha ] && ! command -v oha >/dev/null && [ ! -x "$bench/.cache/cargo/bin/oha" ]; then
  "$bench/setup.sh" oha
fi
export CONCURRENCY=${CONCURRENCY:-"1 64"}
export MODES=${MODES:-"json stream"}
export RESULTS=${RESULTS:-$root/target/bench/results}
work=$root/target/bench/nginx
mkdir -p "$work" "$RESULTS"
# One worker process, as the gateway gets one core; keep-alive to the mock; no buffering, so
# streams are forwarded as they come, as the gateway forwards them.
cat > "$work/nginx.conf.in" <<CONF
daemon off;
master_process off;
worker_processes 1;
pid $work/nginx.pid;
error_log $work/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/body;
    proxy_temp_path $work/proxy;
    upstream mock { server MOCK_HOST_PORT; keepalive 128; }
    server {
        listen 127.0.0.1:18080;
        location / {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }
    }
}
CONF
nginx=$(command -v nginx || echo /usr/sbin/nginx)
# The harness starts GW_CMD with `exec` and passes the mock's address in MOCK_BASE_URL
# (http://HOST:PORT/v1); /v1 stays in the request path, as it does through the gateway.
cat > "$work/start.sh" <<START
#!/bin/sh
hostport=\$(echo "\$MOCK_BASE_URL" | sed -E 's#^https?://([^/]+).*#\\1#')
sed "s#MOCK_HOST_PORT#\$hostport#" "$work/nginx.conf.in" > "$work/nginx.conf"
exec "$nginx" -p "$work" -c "$work/nginx.conf"
START
chmod +x "$work/start.sh"
GW_NAME=nginx-floor GW_CMD="$work/start.sh" \
  "$bench/run.sh" url http://127.0.0.1:18080/v1 sk-unused
