#!/bin/bash
# The demo federation with and without DP, one run after another (BENCHMARKS.md,
# "Differential privacy"): bash bench/dp_results/run_quality.sh [OUT=/tmp/dpbench]
out=${1:-/tmp/dpbench}
mkdir -p "$out"
dp='--config.privacy.dp.enabled=True'
run() {  # name seed extra-flags...
  local name=$1 seed=$2; shift 2
  timeout 2400 python3 scripts/simulate.py --config=configs/demo.py --workdir="$out/$name" \
      --config.seed="$seed" "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$? $(date +%T)" >> "$out/done.txt"
}
for seed in 0 1; do
  run eps8_s$seed $seed $dp --config.privacy.dp.target_epsilon=8
  run eps2_s$seed $seed $dp --config.privacy.dp.target_epsilon=2
  run nodp_s$seed $seed
done
run cliponly_s0 0 $dp --config.privacy.dp.noise_multiplier=0.0001
