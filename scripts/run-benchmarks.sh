#!/usr/bin/env bash
# Run every benchmark once, bounded, and keep the output in bench/out/<time>/ (numbers in the README
# come from these files). Each script measures its own baseline in the same run and prints ratios.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
out="bench/out/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
status=0
run() {
  local name=$1; shift
  echo "== $name: $*" | tee "$out/$name.txt"
  if ! timeout 600 "$PY" "$@" 2>&1 | tee -a "$out/$name.txt"; then
    echo "!! $name failed" | tee -a "$out/$name.txt"; status=1
  fi
}
run transport_rtt    -m bench.transport_rtt
run server_overhead  -m bench.server_overhead
run offload          -m bench.offload_bench
run offload_trace    -m bench.offload_trace
run codec            -m bench.codec_bench
run decision         -m bench.decision_bench
run des              -m bench.des_bench
[ -f bench/vision_bench.py ] && run vision -m bench.vision_bench
run emulation        -m bench.emulation_bench
echo "outputs in $out"
exit $status
