#!/bin/bash
# Held-out loss of a federation with and without DP (BENCHMARKS.md, "Differential privacy"),
# one run after another: bash bench/dp_results/run_quality.sh [OUT] [demo|tiny]
# demo: the Quickstart federation as is. tiny: the same federation (4 stdlib silos, 8 rounds
# of H=10, FedAvg) of configs/tiny.py's model, what a 2-core shared machine could finish.
out=${1:-/tmp/dpbench}
size=${2:-demo}
mkdir -p "$out"
# One compilation cache for every run: the DP runs (and seeds) compile the same programs.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$out/jax_cache}
fed=()
if [[ $size == tiny ]]; then
  # As the tests: a tiny model compiles for longer than it runs.
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_llvm_disable_expensive_passes=true"
  fed=(--config.federation.silos="('web','concurrency','text','tools')"
       --config.federation.rounds=8 --config.federation.inner_steps=10
       --config.federation.poll_s=0.2)
fi
dp='--config.privacy.dp.enabled=True'
run() {  # name seed extra-flags...
  local name=$1 seed=$2; shift 2
  timeout 2400 python3 scripts/simulate.py --config="configs/$size.py" --workdir="$out/$name" \
      --config.seed="$seed" "${fed[@]}" "$@" > "$out/$name.log" 2>&1
  echo "$name rc=$? $(date +%T)" >> "$out/done.txt"
}
for seed in 0 1; do
  run nodp_s$seed $seed
  run eps8_s$seed $seed $dp --config.privacy.dp.target_epsilon=8
  run eps2_s$seed $seed $dp --config.privacy.dp.target_epsilon=2
done
# Clipping without noise; rdp: dp_accounting's PLD of so small a sigma needs terabytes.
run cliponly_s0 0 $dp --config.privacy.dp.noise_multiplier=0.0001 --config.privacy.dp.accountant=rdp
