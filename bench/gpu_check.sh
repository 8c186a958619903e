#!/usr/bin/env bash
# The prepared check for the first GPU machine fedpt gets: at most 8 minutes, one results
# file. See bench/gpu_check.py for the stages (env, tests, federation, throughput).
#
# The machine has no network and lacks some of fedpt's packages, so first, anywhere with a
# package index:   bench/gpu_wheels.sh /tmp/fedpt-wheels    (a few tens of MiB)
# then on the GPU: bench/gpu_check.sh --wheels=/tmp/fedpt-wheels --out=/tmp/gpu_check
# and on a CPU, every stage at tiny sizes (CI runs this): bench/gpu_check.sh --dry-run --out=DIR
#
# --wheels installs them with pip --no-index --no-deps into <out>/site (on PYTHONPATH);
# fedpt itself runs from this checkout, not installed.
set -euo pipefail

usage="usage: bench/gpu_check.sh --out=DIR [--wheels=DIR] [--dry-run] [--budget-s=480]"
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="" wheels="" dry_run="" budget=480
for arg in "$@"; do
  case "$arg" in
    --out=*) out="${arg#*=}" ;;
    --wheels=*) wheels="${arg#*=}" ;;
    --dry-run) dry_run="--dry_run" ;;
    --budget-s=*) budget="${arg#*=}" ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$arg'. Fix: $usage" >&2; exit 2 ;;
  esac
done
[[ -n "$out" ]] || { echo "gpu_check: --out is required. Fix: $usage" >&2; exit 2; }
[[ "$budget" =~ ^[0-9]+$ ]] || {
  echo "gpu_check: --budget-s=$budget is not a whole number of seconds. Fix: e.g. --budget-s=480" >&2
  exit 2; }
mkdir -p "$out"
out="$(cd "$out" && pwd)"
python="${PYTHON:-python3}"

if [[ -n "$wheels" ]]; then
  if [[ ! -f "$wheels/requirements.txt" ]]; then
    echo "gpu_check: $wheels has no requirements.txt. Fix: make the folder with" \
         "bench/gpu_wheels.sh $wheels on a machine with a package index" >&2
    exit 2
  fi
  echo "gpu_check: installing $(wc -l < "$wheels/requirements.txt") wheels into $out/site"
  "$python" -m pip install --quiet --no-index --no-deps --find-links "$wheels" \
    --target "$out/site" --upgrade -r "$wheels/requirements.txt"
  export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

missing="$("$python" - <<'EOF'
import importlib.util
mods = ['jax', 'flax', 'optax', 'orbax.checkpoint', 'ml_collections', 'absl', 'sentencepiece',
        'grain', 'cryptography', 'tensorboard', 'fsspec', 'matplotlib', 'pytest', 'filelock']
print(' '.join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
)"
if [[ -n "$missing" ]]; then
  echo "gpu_check: missing Python modules: $missing. Fix: bench/gpu_wheels.sh DIR where a" \
       "package index is reachable, then rerun with --wheels=DIR" >&2
  exit 2
fi
cd "$repo"
exec "$python" bench/gpu_check.py --out="$out" --budget_s="$budget" $dry_run
