#!/usr/bin/env bash
# What launch/tpu_vm.sh runs on every host of a slice, from the shipped checkout (~/fedpt).
#
#   bash fedpt/launch/host.sh setup --python=3.12 --extra=tpu
#   bash fedpt/launch/host.sh start --name=web --max-restarts=3 -- ~/fedpt-venv/bin/python ...
#   bash fedpt/launch/host.sh wait --name=web
#
# `start` detaches a supervisor with setsid + nohup rather than tmux or systemd-run: nothing to
# install, no sudo, and no `loginctl enable-linger` (a systemd --user unit dies with the user's
# last session without it). setsid puts the supervisor in a session of its own, with no
# controlling terminal, so the end of the SSH session that started it sends it no SIGHUP;
# its stdin/stdout/stderr leave the SSH channel, so `gcloud ... ssh` returns at once.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREEMPTED=75  # train.py's exit status after a SIGTERM checkpoint.
UV_INSTALLER=https://astral.sh/uv/install.sh

usage() {
  cat <<EOF
Usage: $0 setup [--python=3.12] [--extra=tpu] [--venv=DIR]
       $0 start --name=ID [--max-restarts=N] [--logs=DIR] -- COMMAND...
       $0 wait --name=ID [--logs=DIR]
       $0 check --name=ID [--logs=DIR]

setup   gets Python (TPU VM images ship 3.10; fedpt needs 3.11+) with uv, not
        the system's: installs uv into ~/.local/bin unless it is on PATH (from
        $UV_INSTALLER), then uv python install VERSION, a venv at DIR
        (default ~/fedpt-venv) and fedpt[EXTRA] from this checkout into it
        (pip install -e; extras: tpu, cuda12, or none).
start   runs COMMAND detached from this shell (setsid nohup): it survives the
        SSH session. Its output goes to LOGS/ID.log (LOGS default ~/fedpt-logs);
        it runs again after exit $PREEMPTED (preempted after a checkpoint), up to N
        times (default 3); the supervisor's pid is in LOGS/ID.pid and the last
        exit status in LOGS/ID.exit. Refused while ID already runs.
wait    prints LOGS/ID.log as it grows until the supervisor ends, then exits
        with COMMAND's last exit status.
check   status 2 with one line if ID runs here now, else 0.
EOF
}

mode="${1:-}"
[[ "$mode" == -h || "$mode" == --help ]] && { usage; exit 0; }
[[ "$mode" =~ ^(setup|start|wait|check|_supervise)$ ]] ||
  die "the first argument must be setup, start, wait or check, not '$mode'. Fix: see $0 --help"
shift
name="" python=3.12 extra=tpu venv="$HOME/fedpt-venv" logs="$HOME/fedpt-logs" max_restarts=3
command=()
while (($#)); do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --extra=*) extra="${1#*=}" ;;
    --venv=*) venv="${1#*=}" ;;
    --logs=*) logs="${1#*=}" ;;
    --max-restarts=*) max_restarts="${1#*=}" ;;
    -h | --help) usage; exit 0 ;;
    --) shift; command=("$@"); break ;;
    *) die "unknown argument '$1'. Fix: see $0 --help" ;;
  esac
  shift
done
[[ "$python" =~ ^3\.(1[1-9]|[2-9][0-9])$ ]] ||
  die "--python=$python is not a Python >= 3.11. Fix: pass e.g. --python=3.12"
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max-restarts=$max_restarts is not a number"
if [[ "$mode" != setup ]]; then
  need --name "$name" 'ID, the silo id'
  [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ ]] ||
    die "--name=$name is not a silo id. Fix: use letters, digits, '_' and '-' only"
fi
log="$logs/$name.log" pid_file="$logs/$name.pid" exit_file="$logs/$name.exit"

supervisor_pid() {  # Prints the live supervisor's pid; status 1 if none runs.
  local pid
  pid="$(cat "$pid_file" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # A pid file that outlived a reboot may name another process now.
  grep -q 'host.sh' "/proc/$pid/cmdline" 2>/dev/null || return 1
  printf '%s' "$pid"
}

case "$mode" in
  setup)
    trace=1
    uv="$(command -v uv || printf '%s' "$HOME/.local/bin/uv")"
    if [[ ! -x "$uv" ]]; then
      curl -LsSf "$UV_INSTALLER" | env UV_INSTALL_DIR="$HOME/.local/bin" UV_NO_MODIFY_PATH=1 sh
    fi
    run "$uv" python install "$python"
    # A venv of another Python (an earlier --python) is replaced, not reused.
    if [[ ! -x "$venv/bin/python$python" ]]; then
      run rm -rf "$venv"
      run "$uv" venv "--python=$python" "$venv"
    fi
    target="$REPO"
    [[ -z "$extra" ]] || target+="[$extra]"
    run "$uv" pip install "--python=$venv/bin/python" -e "$target"
    run "$venv/bin/python" -c \
      'import sys, fedpt, jax; print("fedpt ready: Python", sys.version.split()[0], "jax", jax.__version__)'
    ;;
  check)
    if pid="$(supervisor_pid)"; then
      die "silo $name already runs on $(hostname) (supervisor pid $pid). Fix: wait for it (tail -f $log) or stop it (kill $pid), then run again"
    fi
    ;;
  start)
    ((${#command[@]})) || die "start needs the command after --. Fix: $0 start --name=$name -- COMMAND..."
    if pid="$(supervisor_pid)"; then
      die "silo $name already runs on $(hostname) (supervisor pid $pid). Fix: wait for it (tail -f $log) or stop it (kill $pid), then run again"
    fi
    mkdir -p "$logs"
    rm -f "$exit_file" "$pid_file"
    setsid nohup bash "${BASH_SOURCE[0]}" _supervise "--name=$name" "--logs=$logs" \
      "--max-restarts=$max_restarts" -- "${command[@]}" >>"$log" 2>&1 </dev/null &
    for _ in $(seq 50); do  # The supervisor writes its own pid (setsid may fork).
      [[ -s "$pid_file" || -s "$exit_file" ]] && break
      sleep 0.1
    done
    printf 'started silo %s on %s (detached); log: %s\n' "$name" "$(hostname)" "$log"
    ;;
  wait)
    [[ -e "$pid_file" || -e "$exit_file" ]] ||
      die "silo $name was never started here ($pid_file is missing). Fix: start it with launch/tpu_vm.sh"
    if pid="$(supervisor_pid)"; then
      tail -n 50 -F --pid="$pid" "$log" 2>/dev/null
    else
      tail -n 50 "$log"
    fi
    status="$(cat "$exit_file" 2>/dev/null)" ||
      die "silo $name's supervisor ended without recording an exit status (killed?); see $log"
    exit "$status"
    ;;
  _supervise)  # Detached: run the command, again after a preemption checkpoint.
    printf '%s' "$$" >"$pid_file"
    stop=0 child=""
    trap 'stop=1; [[ -z "$child" ]] || kill -TERM "$child" 2>/dev/null || true' TERM INT
    restarts=0
    while :; do
      printf '[host.sh %s] $ %s\n' "$(date -u +%FT%TZ)" "$(quoted "${command[@]}")"
      "${command[@]}" &
      child=$!
      while :; do  # A trapped signal interrupts `wait`; wait again for the real status.
        status=0
        wait "$child" || status=$?
        if ((status <= 128)) || ! kill -0 "$child" 2>/dev/null; then
          break
        fi
      done
      child=""
      ((status == PREEMPTED && !stop && restarts < max_restarts)) || break
      restarts=$((restarts + 1))
      printf '[host.sh] silo %s exited %d (preempted, checkpointed): restart %d of %d\n' \
        "$name" "$status" "$restarts" "$max_restarts"
    done
    printf '[host.sh %s] silo %s exited %d\n' "$(date -u +%FT%TZ)" "$name" "$status"
    printf '%s\n' "$status" >"$exit_file.tmp"
    mv "$exit_file.tmp" "$exit_file"
    rm -f "$pid_file"
    exit "$status"
    ;;
esac
