#!/usr/bin/env bash
# Companion of bench/gpu_check.sh, run beforehand on a machine with a package index.
#
# Downloads exactly the Python 3.12 manylinux x86-64 wheels that fedpt needs and the GPU
# machine lacks: the dependency closure of fedpt's runtime packages minus the closure of
# what that machine has preinstalled (jax, flax, optax, orbax-checkpoint, tensorstore,
# absl-py, sentencepiece, etils, numpy, safetensors, transformers, pytest). Both closures
# come from pip's own resolver (`pip install --dry-run --report`), so the folder holds
# every missing dependency and nothing the machine already has; a few tens of MiB.
#
#   bench/gpu_wheels.sh /tmp/fedpt-wheels     # then copy the folder beside the repo
#   bench/gpu_check.sh --wheels=/tmp/fedpt-wheels --out=/tmp/gpu_check
set -euo pipefail

usage="usage: bench/gpu_wheels.sh OUT_DIR [--python-version=3.12] [--platform=x86_64]"
out="${1:-}"
[[ -n "$out" && "$out" != -* ]] || { echo "$usage" >&2; exit 2; }
shift
python_version=3.12
arch=x86_64
for arg in "$@"; do
  case "$arg" in
    --python-version=*) python_version="${arg#*=}" ;;
    --platform=*) arch="${arg#*=}" ;;
    *) echo "gpu_wheels: unknown argument '$arg'. Fix: $usage" >&2; exit 2 ;;
  esac
done
python="${PYTHON:-python3}"

# The GPU machine's preinstalled packages, and what fedpt needs on top of them for its
# trainer, federation (Ed25519 signing, local-bucket storage), data order and plots.
# tensorflow-datasets and gcsfs are left out: imported only for tfds sources and gs://.
preinstalled=(jax flax optax orbax-checkpoint tensorstore absl-py sentencepiece etils numpy
              safetensors transformers pytest)
needed=(ml-collections grain cryptography tensorboard fsspec matplotlib filelock)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
resolve() {  # resolve REPORT PACKAGE...: pip's resolution for the target, nothing installed.
  local report="$1"; shift
  "$python" -m pip install --quiet --dry-run --ignore-installed --only-binary=:all: \
    --implementation cp --python-version "$python_version" \
    --platform "manylinux_2_28_$arch" --platform "manylinux_2_17_$arch" \
    --platform "manylinux2014_$arch" --platform any \
    --target "$tmp/target" --report "$report" "$@" 2> "$tmp/pip.err" || {
      echo "gpu_wheels: pip could not resolve $* for Python $python_version ($arch):" \
           "$(grep -m1 ERROR "$tmp/pip.err" || tail -n1 "$tmp/pip.err"). Fix: run this" \
           "where a package index is reachable" >&2
      exit 2
    }
}
resolve "$tmp/have.json" "${preinstalled[@]}"
resolve "$tmp/all.json" "${preinstalled[@]}" "${needed[@]}"

mapfile -t missing < <("$python" - "$tmp/have.json" "$tmp/all.json" <<'EOF'
import json, re, sys
name = lambda item: re.sub(r'[-_.]+', '-', item['metadata']['name']).lower()
have = {name(i) for i in json.load(open(sys.argv[1]))['install']}
for item in json.load(open(sys.argv[2]))['install']:
  if name(item) not in have:
    print(f"{item['metadata']['name']}=={item['metadata']['version']}")
EOF
)
mkdir -p "$out"
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
  --implementation cp --python-version "$python_version" \
  --platform "manylinux_2_28_$arch" --platform "manylinux_2_17_$arch" \
  --platform "manylinux2014_$arch" --platform any -d "$out" "${missing[@]}" 2> "$tmp/pip.err" || {
    echo "gpu_wheels: pip could not download the wheels:" \
         "$(grep -m1 ERROR "$tmp/pip.err" || tail -n1 "$tmp/pip.err"). Fix: check the index" >&2
    exit 2
  }
printf '%s\n' "${missing[@]}" > "$out/requirements.txt"
echo "gpu_wheels: ${#missing[@]} wheels, $(du -sh "$out" | cut -f1) in $out:" \
     "$(tr '\n' ' ' < "$out/requirements.txt")"
