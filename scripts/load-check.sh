#!/usr/bin/env bash
# Run the README's test command (`make test`) RUNS times in a row while one core is kept busy, and
# report how many passed and how long each took. Not part of the default run: use it before you stop.
#
#   bash scripts/load-check.sh [RUNS]        (default 3; `make load-check RUNS=10`)
#
# The background load is one busy Python process per LOAD_CORES (default 1), each ended by its PID
# when this script exits and bounded by `timeout` in any case; each suite run is bounded too.
# Logs: results/load-check/<time>/run-<n>.log. Exit status: 0 only when every run passed.
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
cores=${LOAD_CORES:-1}
per_run=${RUN_TIMEOUT:-1200}
case "$runs$cores" in *[!0-9]*) echo "usage: $0 [RUNS] (a whole number; LOAD_CORES likewise)" >&2; exit 2;; esac

out="results/load-check/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
make -s .venv/.installed >/dev/null

load_pids=()
stop_load() {
  for pid in "${load_pids[@]}"; do kill "$pid" 2>/dev/null; done
  wait 2>/dev/null
}
trap stop_load EXIT INT TERM
for _ in $(seq "$cores"); do
  timeout $((runs * per_run + 60)) python3 -c 'while True: pass' &
  load_pids+=("$!")
done
echo "load: ${#load_pids[@]} busy process(es) (pids ${load_pids[*]}) on $(nproc) cores"

passed=0
for n in $(seq "$runs"); do
  started=$SECONDS
  if timeout "$per_run" make test >"$out/run-$n.log" 2>&1; then
    verdict=passed; passed=$((passed + 1))
  else
    verdict=FAILED
  fi
  took=$((SECONDS - started))
  summary=$(grep -E "^[0-9]+ (passed|failed)|[0-9]+ (passed|failed).* in " "$out/run-$n.log" | tail -n 1)
  printf 'run %d/%d: %s in %d s  (%s)\n' "$n" "$runs" "$verdict" "$took" "${summary:-no pytest summary}" \
    | tee -a "$out/summary.txt"
  if [ "$verdict" = FAILED ]; then
    grep -E "^(FAILED|ERROR) " "$out/run-$n.log" | tee -a "$out/summary.txt"
  fi
done
echo "$passed of $runs runs passed with $cores core(s) busy; logs in $out" | tee -a "$out/summary.txt"
[ "$passed" -eq "$runs" ]
