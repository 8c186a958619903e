#!/usr/bin/env bash
# The image's entrypoint: `docker run IMAGE SCRIPT [ARGS...]` runs /fedpt/scripts/SCRIPT.
# (The pods that render.py writes name python3 scripts/... themselves.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
scripts="$(cd scripts && printf '%s ' ./*.py)"
scripts="${scripts//.\//}"
script="${1:-}"
if [[ -z "$script" || "$script" == -h || "$script" == --help ]]; then
  printf 'Usage: docker run IMAGE SCRIPT [ARGS...], SCRIPT one of: %s\n' "${scripts% }"
  exit 0
fi
shift
script="${script%.py}.py"
[[ " $scripts" == *" $script "* ]] || {
  printf "error: no script '%s' in /fedpt/scripts. Fix: one of %s\n" "$script" "${scripts% }" >&2
  exit 2
}
exec python3 "scripts/$script" "$@"
