# Shared by the launch/ scripts (sourced, not run): errors, quoting and --dry-run.
# shellcheck shell=bash
# Callers set dry_run (1: print commands only) and may set trace (1: echo each command run).

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "error: $0 needs bash >= 4.4 (this is $BASH_VERSION). Fix: install a newer bash" >&2
  exit 2
fi

die() {
  printf 'error: %s\n' "$1" >&2
  exit 2
}

need() {  # need FLAG VALUE HINT
  [[ -n "$2" ]] || die "$1 is missing. Fix: pass $1=$3 (see --help)"
}

quoted() {  # The command, shell-quoted, on one line.
  local line
  printf -v line '%q ' "$@"
  printf '%s' "${line% }"
}

run() {
  if ((${dry_run:-0})); then
    printf '%s\n' "$(quoted "$@")"
  else
    if ((${trace:-0})); then
      printf '+ %s\n' "$(quoted "$@")" >&2
    fi
    "$@"
  fi
}
