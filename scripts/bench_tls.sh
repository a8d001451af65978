#!/usr/bin/env bash
# The TLS bar: what TLS costs the gateway per request at steady state with keep-alive clients.
#
# Runs the release gateway with the built-in `mock` provider twice, once plain and once with
# `[server.tls]` (a throwaway self-signed certificate), drives each with keep-alive clients at a
# fixed concurrency, and reports the gateway process's CPU time per request (utime + stime from
# /proc/PID/stat over the measured run, divided by the requests served) and the ratio. Runs
# alternate plain/TLS for ROUNDS rounds so drifting background load hits both.
#
# LOADGEN=oha (default): a fixed request RATE for both, so both do the same work per second
#   and time-driven costs (timers, the usage writer) weigh the same per request. oha is
#   installed with cargo into target/bench-tools if it is not on PATH.
# LOADGEN=wrk: as fast as possible (Debian's wrk, installed with apt if absent). TLS then serves
#   fewer requests per second, so time-driven costs are spread over fewer requests and the
#   ratio overstates what TLS itself costs.
#
#   scripts/bench_tls.sh
#   RATE=8000 CONNECTIONS=32 DURATION=20 ROUNDS=5 scripts/bench_tls.sh
#
# The bar (issue 7): TLS adds under 5 % CPU per request.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

LOADGEN=${LOADGEN:-oha}
RATE=${RATE:-4000}
CONNECTIONS=${CONNECTIONS:-16}
THREADS=${THREADS:-2}
DURATION=${DURATION:-15}
WARMUP=${WARMUP:-3}
ROUNDS=${ROUNDS:-3}
PLAIN_PORT=${PLAIN_PORT:-18480}
TLS_PORT=${TLS_PORT:-18443}

if [ "$LOADGEN" = wrk ]; then
  if ! command -v wrk >/dev/null; then
    echo "== installing wrk (Debian package)"
    apt-get update -qq && apt-get install -y -qq wrk
  fi
else
  tools=${CARGO_TARGET_DIR:-$root/target}/bench-tools
  export PATH="$tools/bin:$PATH"
  if ! command -v oha >/dev/null; then
    echo "== installing oha 1.16.0 (cargo install into $tools)"
    CARGO_INSTALL_ROOT="$tools" cargo install --locked oha --version 1.16.0
  fi
fi
command -v openssl >/dev/null || { echo "openssl is needed to make the test certificate" >&2; exit 2; }

cargo build --release --locked -p gateway-bin
target=${CARGO_TARGET_DIR:-$root/target}
gateway=$target/release/gateway

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

key_hash=$(printf %s sk-bench | sha256sum | cut -d" " -f1)
write_config() { # name port tls?
  local name=$1 port=$2 tls=$3
  mkdir -p "$work/$name"
  {
    echo "[server]"
    echo "listen = \"127.0.0.1:$port\""
    echo "admin_listen = \"127.0.0.1:0\""
    if [ "$tls" = tls ]; then
      echo "[server.tls]"
      echo "cert = \"$work/cert.pem\""
      echo "key = \"$work/key.pem\""
    fi
    cat <<EOF
[database]
url = "sqlite://$work/$name/usage.db"
spool_dir = "$work/$name/spool"

[observability]
log_format = "json"
log_level = "info"

[[providers]]
name = "mock"
kind = "mock"

[[models]]
alias = "local"
targets = [{ provider = "mock", model = "mock-1" }]

[[projects]]
name = "bench"
api_keys = [{ id = "bench", sha256 = "$key_hash" }]
EOF
  } > "$work/$name/gateway.toml"
}
write_config plain "$PLAIN_PORT" plain
write_config tls "$TLS_PORT" tls

cat > "$work/chat.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"model":"local","messages":[{"role":"user","content":"hello from the TLS bench"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
EOF

started_pid=
start() { # name url; sets started_pid (not a subshell: the cleanup must know every pid)
  local name=$1 url=$2
  if curl -ksf "$url/readyz" >/dev/null 2>&1; then
    echo "something already answers on $url; set PLAIN_PORT/TLS_PORT" >&2
    exit 1
  fi
  "$gateway" serve --config "$work/$name/gateway.toml" > "$work/$name/log" 2>&1 &
  started_pid=$!
  pids+=("$started_pid")
  for _ in $(seq 100); do
    if ! kill -0 "$started_pid" 2>/dev/null; then break; fi
    if curl -ksf "$url/readyz" >/dev/null 2>&1; then return; fi
    sleep 0.1
  done
  echo "gateway $name did not become ready:" >&2
  cat "$work/$name/log" >&2
  exit 1
}

ticks() { # utime + stime of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat)
  awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"
}

hz=$(getconf CLK_TCK)
start plain "http://127.0.0.1:$PLAIN_PORT"
plain_pid=$started_pid
start tls "https://127.0.0.1:$TLS_PORT"
tls_pid=$started_pid

declare -A total_ticks=([plain]=0 [tls]=0) total_requests=([plain]=0 [tls]=0) total_secs=([plain]=0 [tls]=0)

body='{"model":"local","messages":[{"role":"user","content":"hello from the TLS bench"}]}'

# Drives `url` for `secs` seconds; prints the number of requests answered 200, or fails.
load() { # url secs
  local url=$1 secs=$2 out
  if [ "$LOADGEN" = wrk ]; then
    out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${secs}s" -s "$work/chat.lua" "$url/v1/chat/completions")
    if grep -q "Non-2xx" <<<"$out"; then echo "error responses during the run: $out" >&2; return 1; fi
    awk '/requests in/ { print $1 }' <<<"$out"
  else
    out=$(oha -z "${secs}s" -c "$CONNECTIONS" -q "$RATE" --no-tui --insecure --output-format json \
      -m POST -T application/json -H "Authorization: Bearer sk-bench" -d "$body" "$url/v1/chat/completions")
    python3 -c '
import json, sys
d = json.loads(sys.argv[1])
codes = d["statusCodeDistribution"]
errors = {k: v for k, v in d["errorDistribution"].items() if "deadline" not in k}
if set(codes) - {"200"} or errors:
    sys.exit(f"error responses during the run: {codes} {errors}")
print(codes.get("200", 0))
' "$out"
  fi
}

measure() { # name pid url
  local name=$1 pid=$2 url=$3
  load "$url" "$WARMUP" >/dev/null
  local before after requests
  before=$(ticks "$pid")
  requests=$(load "$url" "$DURATION")
  after=$(ticks "$pid")
  total_ticks[$name]=$(( ${total_ticks[$name]} + after - before ))
  total_requests[$name]=$(( ${total_requests[$name]} + requests ))
  awk -v n="$name" -v t=$((after - before)) -v r="$requests" -v hz="$hz" -v d="$DURATION" \
    'BEGIN { printf "  %-5s %9d requests  %9.0f req/s  %7.2f us CPU/request\n", n, r, r / d, t / hz / r * 1e6 }'
}

if [ "$LOADGEN" = wrk ]; then pace="as fast as possible (wrk, $THREADS threads)"; else pace="$RATE req/s (oha)"; fi
echo "== $ROUNDS rounds of ${DURATION}s, $CONNECTIONS keep-alive connections, $pace"
for round in $(seq "$ROUNDS"); do
  echo "round $round"
  measure plain "$plain_pid" "http://127.0.0.1:$PLAIN_PORT"
  measure tls "$tls_pid" "https://127.0.0.1:$TLS_PORT"
done

awk -v pt="${total_ticks[plain]}" -v pr="${total_requests[plain]}" \
    -v tt="${total_ticks[tls]}" -v tr="${total_requests[tls]}" -v hz="$hz" 'BEGIN {
  plain = pt / hz / pr * 1e6; tls = tt / hz / tr * 1e6
  printf "== CPU per request: plain %.2f us, TLS %.2f us, TLS/plain %.3f (+%.1f %%)\n", plain, tls, tls / plain, (tls / plain - 1) * 100
  if (tls / plain < 1.05) print "== bar met: TLS adds under 5 % CPU per request"; else print "== bar NOT met: TLS adds 5 % or more CPU per request"
}'
