#!/usr/bin/env bash
# K silos and the aggregator of one federated run on this machine, as separate processes.
#
#   launch/local.sh --config=configs/tiny.py --silos=web,concurrency --workdir=/tmp/fedpt-local \
#       -- --config.federation.rounds=2 --config.federation.inner_steps=2
#   launch/local.sh --config=configs/tiny.py --silo-data=web=/data/web.jsonl,code=/data/code \
#       --workdir=/tmp/fedpt-own [--tokenizer=train] -- --config.federation.rounds=2
#
# Unlike scripts/simulate.py it runs the parties' own commands (keys.py, init_run.py,
# train.py, aggregate.py), so its --dry-run output is what each organisation would type.
set -euo pipefail
invocation=("$0" "$@")  # For the line that says how to resume.

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
# fedpt/data.py STDLIB_GROUPS: a silo named after one reads only that part of the built-in corpus.
STDLIB_GROUPS=" web concurrency text tools core "
POLL_S=1
STOP_GRACE_S=30  # How long the silos get to checkpoint before a SIGKILL.
WATCH_GRACE_S=30  # How long the round lines may lag the parties' end.
PREEMPTED=75  # train.py's exit status after a SIGTERM checkpoint.

usage() {
  cat <<EOF
Usage: $0 --config=FILE --silos=ID,ID,... --workdir=DIR [options] [-- TRAIN_ARGS...]

Runs K silos and the aggregator of one federated run on this machine: makes the
missing keys (keys.py), creates the run unless run.json exists (init_run.py),
starts every silo (train.py --silo) and the aggregator (aggregate.py) in the
background with logs in WORKDIR/logs/, prints one line per round (each silo's
train loss, the global held-out loss, tokens, bytes, seconds: status.py
--follow) and exits non-zero if any party failed (the others are stopped).
Ctrl-C stops every party (each silo checkpoints first) and ends with one line
naming what was stopped and the command that resumes. Running it again resumes.

Required:
  --config=FILE      a configs/*.py file
  --silos=ID,...     silo ids (also --silo=ID, repeatable); an id that is a stdlib
                     group (web concurrency text tools core) reads that group;
                     default with --silo-data: its names
  --workdir=DIR      logs/ and silos/<id>/ (each silo's private checkpoints)
Options:
  --silo-data=ID=PATH,...  each silo's own corpus (repeatable; also --silo_data):
                     a prepared dir (prepare_data.py), a text/JSONL file or a
                     directory of text files; raw ones are tokenised once into
                     WORKDIR/data/<id>/ (scripts/prepare_silos.py) and each silo
                     trains on its own with --config.data.corpus
  --tokenizer=config|train  with --silo-data: config (default) keeps
                     --config.data.tokenizer; train trains one on the silos' text
                     into WORKDIR/tokenizer/sp.model for every party
  --storage=ROOT     the run's storage root, a path or gs://bucket/path
                     (default WORKDIR/bucket)
  --keys=DIR         every party's key folder (default WORKDIR/keys); one machine
                     plays all parties, so one folder holds every secret key
  --dry-run          print each command, shell-quoted, and run nothing
  -h, --help         this help
Arguments after -- (e.g. --config.federation.rounds=2) go to init_run.py and to
every train.py. Environment: PYTHON (default python3).
Exit status: 0 when every party finished, 1 when one failed, 75 when stopped by
a signal or a silo's preemption (run it again to resume), 2 on a bad setting.
EOF
}

config="" workdir="" storage="" keys="" dry_run=0 tokenizer=config
silos=()
silo_data=()  # ID=PATH entries.
train_args=()
while (($#)); do
  case "$1" in
    --config=*) config="${1#*=}" ;;
    --silos=*) IFS=, read -r -a more <<<"${1#*=}"; silos+=("${more[@]}") ;;
    --silo=*) silos+=("${1#*=}") ;;
    --workdir=*) workdir="${1#*=}" ;;
    --storage=*) storage="${1#*=}" ;;
    --keys=*) keys="${1#*=}" ;;
    --silo-data=* | --silo_data=*) IFS=, read -r -a more <<<"${1#*=}"; silo_data+=("${more[@]}") ;;
    --tokenizer=*) tokenizer="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    --config | --silos | --silo | --workdir | --storage | --keys | --silo-data | --silo_data | --tokenizer)
      die "$1 needs a value: write $1=VALUE" ;;
    *) die "unknown argument '$1'. Fix: see $0 --help; train.py flags go after --" ;;
  esac
  shift
done

[[ -n "$config" ]] || die "--config is missing. Fix: pass a config file, e.g. --config=configs/tiny.py"
config="${config/#\~\//$HOME/}"
[[ -f "${config%%:*}" ]] || die "--config=$config is not a file. Fix: pass a configs/*.py file"
[[ "$tokenizer" == config || "$tokenizer" == train ]] ||
  die "--tokenizer=$tokenizer is not config or train. Fix: pass --tokenizer=train or leave it out"
[[ "$tokenizer" == config ]] || ((${#silo_data[@]})) ||
  die "--tokenizer=train needs --silo-data (the text to train on). Fix: add --silo-data=ID=PATH,..."
if ((${#silo_data[@]})) && ((${#silos[@]} == 0)); then  # The silos are the names given.
  for entry in "${silo_data[@]}"; do
    [[ " ${silos[*]} " == *" ${entry%%=*} "* ]] || silos+=("${entry%%=*}")
  done
fi
((${#silos[@]})) || die "--silos is missing. Fix: name the silos, e.g. --silos=web,concurrency"
[[ -n "$workdir" ]] || die "--workdir is missing. Fix: pass a folder for logs and checkpoints, e.g. --workdir=/tmp/fedpt-local"
seen=" "
for id in "${silos[@]}"; do
  [[ "$id" =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ ]] ||
    die "--silos: bad silo id '$id'. Fix: use letters, digits, '_' and '-' only"
  [[ "$seen" != *" $id "* ]] || die "--silos: silo '$id' is named twice. Fix: name each silo once"
  seen+="$id "
done
workdir="${workdir/#\~\//$HOME/}"  # --flag=~/x reaches us unexpanded.
storage="${storage:-$workdir/bucket}"
storage="${storage/#\~\//$HOME/}"
keys="${keys:-$workdir/keys}"
keys="${keys/#\~\//$HOME/}"

silo_tuple="$(printf "'%s'," "${silos[@]}")"  # A Python tuple literal: ('web','text').
((${#silos[@]} > 1)) && silo_tuple="${silo_tuple%,}"
run_args=("--config.federation.silos=(${silo_tuple})")

group_of() {  # Sets `group` to silo $1's data flags: its own corpus, or its built-in group.
  group=()
  local entry path
  if ((${#silo_data[@]})); then
    for entry in "${silo_data[@]}"; do
      [[ "${entry%%=*}" == "$1" ]] && path="${entry#*=}"
    done
    path="${path/#\~\//$HOME/}"
    # fedpt/corpora.py corpus_dir: a prepared dir (meta.json) itself, else WORKDIR/data/ID.
    [[ -f "$path/meta.json" ]] || path="$workdir/data/$1"
    group=("--config.data.corpus=$path")
    [[ "$tokenizer" == config ]] || group+=("--config.data.tokenizer=$workdir/tokenizer/sp.model")
  elif [[ "$STDLIB_GROUPS" == *" $1 "* ]]; then
    group=("--config.data.stdlib_group=$1")
  fi
}

if ((${#silo_data[@]})); then  # Every corpus checked (and raw ones tokenised) before any party starts.
  config_args=()
  for arg in "${train_args[@]}"; do
    [[ "$arg" != --config.* ]] || config_args+=("$arg")
  done
  run "$PYTHON" "$REPO/scripts/prepare_silos.py" "--config=$config" "--workdir=$workdir" \
    "--silo_data=$(IFS=,; printf '%s' "${silo_data[*]}")" "--tokenizer=$tokenizer" \
    "${run_args[@]}" "${config_args[@]}"
fi

run mkdir -p "$workdir/logs"

missing=()
for name in aggregator "${silos[@]/#/silo_}"; do
  [[ -e "$keys/$name.key" ]] || missing+=("$name")
done
if ((${#missing[@]})); then
  names="$(IFS=,; printf '%s' "${missing[*]}")"
  run "$PYTHON" "$REPO/scripts/keys.py" "--keys=$keys" "--names=$names"
fi

# init_run.py loads a corpus too: give it the first silo's (or its group), not all of stdlib.
group_of "${silos[0]}"
init=("$PYTHON" "$REPO/scripts/init_run.py" "--config=$config" "--storage=$storage" "--keys=$keys"
      "${run_args[@]}" "${group[@]}" "${train_args[@]}")
if [[ "$storage" == *://* ]]; then
  if ((dry_run)); then
    printf '# unless %s/run.json exists:\n' "$storage" >&2
    run "${init[@]}"
  elif ! "$PYTHON" -c 'import sys; from etils import epath; sys.exit(0 if epath.Path(sys.argv[1], "run.json").exists() else 1)' "$storage"; then
    run "${init[@]}"
  fi
elif [[ ! -e "$storage/run.json" ]]; then
  run "${init[@]}"
fi

names=()
pids=()
reaped=()  # reaped[i]=1 once party i's exit status was collected: its pid may be reused.
codes=()   # codes[i]: party i's exit status, once reaped.
watcher=""  # status.py --follow: one line per round on stdout; not a party.
# Each party in its own session: a terminal's Ctrl-C reaches this script alone, which stops
# the parties in order (silos checkpoint first), instead of racing them to it.
own_group=()
if command -v setsid >/dev/null 2>&1; then
  own_group=(setsid)
fi

start() {  # start NAME ARGV...: in the background, logging to WORKDIR/logs/NAME.log.
  local name="$1" log="$workdir/logs/$1.log"
  shift
  if ((dry_run)); then
    printf '%s > %s 2>&1 &\n' "$(quoted "$@")" "$(quoted "$log")"
    return
  fi
  printf '$ %s\n' "$(quoted "$@")" >>"$log"
  PYTHONUNBUFFERED=1 ${own_group[@]+"${own_group[@]}"} "$@" >>"$log" 2>&1 </dev/null &
  names+=("$name")
  pids+=("$!")
  reaped+=(0)
  codes+=("")
}

reap() {  # reap I: collect party I's exit status (it has exited).
  local status=0
  wait "${pids[$1]}" || status=$?
  reaped[$1]=1
  codes[$1]=$status
}

signal_live() {  # signal_live SIG: to every party still running; status 1 if none is.
  local i any=1
  for i in "${!pids[@]}"; do
    if ((!reaped[i])) && kill -0 "${pids[i]}" 2>/dev/null; then
      kill "-$1" "${pids[i]}" 2>/dev/null || true
      any=0
    fi
  done
  return "$any"
}

stop_watcher() {
  [[ -n "$watcher" ]] || return 0
  kill -TERM "$watcher" 2>/dev/null || true
  wait "$watcher" 2>/dev/null || true
  watcher=""
}

stop_all() {  # SIGTERM: silos checkpoint and exit 75; SIGKILL whoever is left after the grace.
  local i deadline=$((SECONDS + STOP_GRACE_S))
  stop_watcher
  if signal_live TERM; then
    while ((SECONDS < deadline)) && signal_live 0; do
      sleep 0.2
    done
    signal_live KILL || true
  fi
  for i in "${!pids[@]}"; do
    ((reaped[i])) || reap "$i"
  done
}

stopped_line() {  # What became of each party, and the command that resumes the run.
  local i fate parts=""
  for i in "${!names[@]}"; do
    case "${codes[i]}" in
      0) fate=finished ;;
      "$PREEMPTED") fate="checkpointed, exit $PREEMPTED" ;;
      137) fate="killed after ${STOP_GRACE_S}s, not checkpointed" ;;
      143) fate="stopped by SIGTERM" ;;  # The aggregator: its work is all in the bucket.
      *) fate="exit ${codes[i]}" ;;
    esac
    parts+="${parts:+; }${names[i]} ($fate)"
  done
  printf 'stopped %s. Resume with the same command: %s\n' "$parts" \
    "$(quoted "${invocation[@]}")" >&2
}

on_signal() {
  # A second Ctrl-C is passed on to the silos: they stop at once (exit 130), no checkpoint.
  trap 'signal_live INT || true' INT
  trap '' TERM
  printf 'interrupted: stopping every party (the silos checkpoint first)\n' >&2
  stop_all
  stopped_line
  exit "$PREEMPTED"
}
((dry_run)) || trap on_signal INT TERM

for id in "${silos[@]}"; do
  group_of "$id"
  start "silo_$id" "$PYTHON" "$REPO/scripts/train.py" "--config=$config" \
    "--workdir=$workdir/silos/$id" "--silo=$id" "--storage=$storage" "--keys=$keys" \
    "${run_args[@]}" "${group[@]}" "${train_args[@]}"
done
start aggregator "$PYTHON" "$REPO/scripts/aggregate.py" "--storage=$storage" "--keys=$keys"
# One line per round (each silo's train loss, the global held-out loss, tokens, bytes,
# seconds), the lines simulate.py prints, read from the bucket.
follow=("$PYTHON" "$REPO/scripts/status.py" "--storage=$storage" --follow)
if ((dry_run)); then
  printf '%s &\n' "$(quoted "${follow[@]}")"
  exit 0
fi
PYTHONUNBUFFERED=1 ${own_group[@]+"${own_group[@]}"} "${follow[@]}" </dev/null &
watcher=$!

started="${silos[*]}"
printf 'started silo(s) %s and the aggregator; logs in %s/logs\n' "${started// /, }" "$workdir" >&2
left=${#pids[@]}
while ((left)); do
  for i in "${!pids[@]}"; do
    if ((reaped[i])) || kill -0 "${pids[i]}" 2>/dev/null; then
      continue
    fi
    reap "$i"
    left=$((left - 1))
    status=${codes[i]}
    if ((status == PREEMPTED)); then
      printf '%s checkpointed after a SIGTERM (exit %d); stopping the others\n' \
        "${names[i]}" "$status" >&2
      trap - INT TERM
      stop_all
      stopped_line
      exit "$PREEMPTED"
    elif ((status != 0)); then
      log="$workdir/logs/${names[i]}.log"
      printf 'error: %s exited with status %d; see %s. Its last lines:\n' \
        "${names[i]}" "$status" "$log" >&2
      tail -n 20 "$log" >&2 || true
      trap - INT TERM
      stop_all
      exit 1
    fi
    printf '%s finished\n' "${names[i]}" >&2
  done
  ((left == 0)) || sleep "$POLL_S"
done
deadline=$((SECONDS + WATCH_GRACE_S))  # The last round's line, then the watcher exits.
while ((SECONDS < deadline)) && kill -0 "$watcher" 2>/dev/null; do
  sleep 0.2
done
stop_watcher
printf 'done: every party finished. Ledger: %s\n' \
  "$(quoted "$PYTHON" "$REPO/scripts/status.py" "--storage=$storage")" >&2
