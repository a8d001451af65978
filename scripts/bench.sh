#!/usr/bin/env bash
# Load benchmark of the gateway against a fast mock upstream, using the shared harness in
# ../shared/bench (closed-loop load with oha, gateway pinned to one core, CPU and memory
# sampled). Prints requests/s, p50/p99 and the latency the gateway adds over calling the mock
# directly, plain and streamed.
#
#   scripts/bench.sh                    # this gateway only
#   scripts/bench.sh portkey litellm    # then the same run for other gateways, and a comparison
#
# Knobs are the harness's (CONCURRENCY, MODES, DURATION, DELAYS, LOADGEN, ...): see
# ../shared/bench/README.md. Defaults here: CONCURRENCY="1 64", MODES="json stream".
# BENCH_CONFIG picks the gateway config (default config/bench.toml: an OpenAI-format provider;
# config/bench-anthropic.toml: an Anthropic-format one, to measure translation).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
bench=${BENCH_DIR:-$root/../shared/bench}
[ -x "$bench/run.sh" ] || { echo "bench harness not found at $bench (set BENCH_DIR)" >&2; exit 2; }

cargo build --release --locked -p gateway-bin
[ -x "$bench/.cache/target/release/mock-upstream" ] || "$bench/setup.sh" mock
if [ "${LOADGEN:-oha}" = oha ] && ! command -v oha >/dev/null && [ ! -x "$bench/.cache/cargo/bin/oha" ]; then
  "$bench/setup.sh" oha
fi

export CONCURRENCY=${CONCURRENCY:-"1 64"}
export MODES=${MODES:-"json stream"}
export RESULTS=${RESULTS:-$root/target/bench/results}
mkdir -p "$root/target/bench" "$RESULTS"
rm -f "$root"/target/bench/usage.db*
export GATEWAY_BENCH_DATABASE_URL="sqlite://$root/target/bench/usage.db"
marker=$(mktemp)

config=${BENCH_CONFIG:-config/bench.toml}
GW_NAME=${GW_NAME:-gateway} \
GW_CMD="$root/target/release/gateway serve --config $root/$config" \
  "$bench/run.sh" url http://127.0.0.1:18080/v1 sk-bench

for other in "$@"; do
  "$bench/run.sh" "$other"
done

if [ $# -gt 0 ]; then
  # This run's results, in the order they were measured (ours first).
  mapfile -t files < <(find "$RESULTS" -name '*.json' -newer "$marker" | sort)
  python3 "$bench/compare.py" "${files[@]}"
fi
rm -f "$marker"
