#!/usr/bin/env bash
# One silo on a Cloud TPU VM slice: create or reuse it, install fedpt, train detached.
#
#   launch/tpu_vm.sh --tpu-name=fedpt-web --zone=us-west4-a --accelerator-type=v5litepod-16 \
#       --config=configs/150m.py --silo=web --storage=gs://bucket/run1 --keys=~/keys \
#       --workdir=gs://web-private/fedpt -- --config.data.corpus=gs://web-private/corpus
#
# Every host of the slice runs the same train.py (gcloud ... ssh --worker=all); jax.distributed
# finds the other hosts itself (--config.distributed.mode=auto). On each host launch/host.sh
# installs Python with uv and runs train.py detached, so it outlives this SSH session.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The silo's key folder on every host, as the remote shell should see it.
# shellcheck disable=SC2016  # $HOME is the VM's, expanded there.
REMOTE_KEYS='"$HOME"/.fedpt-keys'
# shellcheck disable=SC2016
REMOTE_VENV='"$HOME"/fedpt-venv'  # host.sh setup's default --venv.
PREEMPTED=75                 # train.py's exit status after a SIGTERM checkpoint.

usage() {
  cat <<EOF
Usage: $0 --tpu-name=NAME --zone=ZONE --accelerator-type=TYPE --config=FILE --silo=ID \\
    --storage=ROOT --keys=DIR --workdir=DIR [options] [-- TRAIN_ARGS...]

Runs one silo on a TPU VM slice: creates the slice unless it exists, ships this
checkout's HEAD commit, the silo's key and the pinned aggregator.pub (to
~/.fedpt-keys) to every host, and starts train.py on all hosts, detached.

Python: TPU VM images ship Python 3.10 and fedpt needs 3.11+, so every host
gets uv (into ~/.local/bin, from astral.sh), then uv python install VERSION,
a venv in ~/fedpt-venv, and fedpt[tpu] (jax[tpu]) into it (launch/host.sh
setup). The hosts need outbound internet (an external IP or Cloud NAT).

Detached: on each host launch/host.sh start runs train.py under setsid nohup,
so it survives the end of the SSH session; it restarts train.py after exit
$PREEMPTED (preempted after a checkpoint) up to --max-restarts times. Each host
logs to ~/fedpt-logs/<silo>.log; the script prints the command that follows
worker 0's log, and exits once every host has started (unless --wait).

Required:
  --tpu-name=NAME          the TPU VM (reused if it exists)
  --zone=ZONE              e.g. us-west4-a
  --accelerator-type=TYPE  e.g. v5litepod-16, v4-32, v5p-8, v6e-8
  --config=FILE            a config inside this checkout, e.g. configs/150m.py
  --silo=ID                this silo's id in run.json
  --storage=ROOT           the run's storage root, gs://bucket/path
  --keys=DIR               local folder holding silo_<id>.key and aggregator.pub
  --workdir=DIR            the silo's private checkpoints; a gs:// path that every
                           host can write (a VM's disk is lost with the VM)
Options:
  --version=V              TPU software version (default: by accelerator type)
  --project=P              Google Cloud project (default: gcloud's)
  --spot                   create a Spot slice
  --python=VERSION         the hosts' Python, >= 3.11 (default 3.12)
  --no-install             the hosts already have this fedpt in ~/fedpt and its
                           venv in ~/fedpt-venv
  --max-restarts=N         restarts after exit $PREEMPTED (default 3)
  --wait                   stay: print worker 0's log until the silo ends and
                           exit with its status (the silo still survives this
                           script's end or a dropped connection)
  --delete-after           --wait, then delete the slice (even on failure; not
                           when the connection dropped and the silo may run on)
  --dry-run                print each command, shell-quoted, and run nothing
  -h, --help               this help
Arguments after -- go to train.py.
EOF
}

tpu_name="" zone="" accelerator_type="" version="" project="" config="" silo="" storage=""
keys="" workdir="" spot=0 install=1 max_restarts=3 delete_after=0 dry_run=0 trace=1 python=3.12
wait=0
train_args=()
while (($#)); do
  case "$1" in
    --tpu-name=*) tpu_name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator-type=*) accelerator_type="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --silo=*) silo="${1#*=}" ;;
    --storage=*) storage="${1#*=}" ;;
    --keys=*) keys="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --max-restarts=*) max_restarts="${1#*=}" ;;
    --python=*) python="${1#*=}" ;;
    --wait) wait=1 ;;
    --spot) spot=1 ;;
    --no-install) install=0 ;;
    --delete-after) delete_after=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    --tpu-name | --zone | --accelerator-type | --version | --project | --config | --silo | \
      --storage | --keys | --workdir | --max-restarts | --python)
      die "$1 needs a value: write $1=VALUE" ;;
    *) die "unknown argument '$1'. Fix: see $0 --help; train.py flags go after --" ;;
  esac
  shift
done

need --tpu-name "$tpu_name" 'NAME, e.g. --tpu-name=fedpt-web'
need --zone "$zone" 'ZONE, e.g. us-west4-a'
need --accelerator-type "$accelerator_type" 'TYPE, e.g. v5litepod-16'
need --config "$config" 'FILE, e.g. configs/150m.py'
need --silo "$silo" "ID, this silo's id in run.json, e.g. web"
need --storage "$storage" 'gs://bucket/path, the run'"'"'s storage root'
need --keys "$keys" 'DIR, the folder holding silo_<id>.key and aggregator.pub'
need --workdir "$workdir" 'gs://your-private-bucket/path for the silo'"'"'s checkpoints'
[[ "$tpu_name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--tpu-name=$tpu_name is not a valid TPU name. Fix: lowercase letters, digits and '-'"
[[ "$silo" =~ ^[A-Za-z0-9][A-Za-z0-9_-]*$ ]] ||
  die "--silo=$silo is not a silo id. Fix: use letters, digits, '_' and '-' only"
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max-restarts=$max_restarts is not a number"
[[ "$python" =~ ^3\.(1[1-9]|[2-9][0-9])$ ]] ||
  die "--python=$python is not a Python >= 3.11 (fedpt's minimum). Fix: pass e.g. --python=3.12"
((delete_after)) && wait=1
[[ "$config" != /* && -f "$REPO/${config%%:*}" ]] ||
  die "--config=$config is not a file inside $REPO. Fix: pass a path relative to the checkout (it is shipped to the VM), e.g. configs/150m.py"
[[ "$workdir" == *://* ]] ||
  printf 'warning: --workdir=%s is on the VM'"'"'s disk: every host needs the same checkpoint folder, and it is lost with the VM. Prefer gs://\n' "$workdir" >&2
keys="${keys/#\~\//$HOME/}"  # --keys=~/x reaches us unexpanded.
for file in "silo_$silo.key" aggregator.pub; do
  [[ -f "$keys/$file" ]] ||
    die "--keys=$keys has no $file. Fix: make it with scripts/keys.py --keys=$keys --names=silo_$silo, and copy in the aggregator.pub the operator sent"
done
if [[ -z "$version" ]]; then
  case "$accelerator_type" in
    v4-*) version='tpu-ubuntu2204-base' ;;
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) die "no default --version for --accelerator-type=$accelerator_type. Fix: pass --version=V (gcloud compute tpus versions list --zone=$zone)" ;;
  esac
fi

where=("--zone=$zone")
[[ -n "$project" ]] && where+=("--project=$project")
tpu=(gcloud compute tpus tpu-vm)

# Create the slice unless it exists.
create=("${tpu[@]}" create "$tpu_name" "${where[@]}" "--accelerator-type=$accelerator_type"
        "--version=$version")
((spot)) && create+=(--spot)
describe=("${tpu[@]}" describe "$tpu_name" "${where[@]}" --format=value\(state\))
delete=("${tpu[@]}" delete "$tpu_name" "${where[@]}" --quiet)
delete_on_exit() {  # --delete-after: from here on, the slice goes however this script ends.
  if ((delete_after && !dry_run)); then
    trap 'run "${delete[@]}"' EXIT
  fi
}
if ((dry_run)); then
  printf '%s >/dev/null 2>&1 || %s\n' "$(quoted "${describe[@]}")" "$(quoted "${create[@]}")"
elif "${describe[@]}" >/dev/null 2>&1; then
  # Not ours yet: a silo may still run there (the setup below refuses then), so the slice is
  # deleted only once our silo started.
  printf 'reusing TPU VM %s\n' "$tpu_name" >&2
else
  run "${create[@]}"
  delete_on_exit
fi

# Refuse while the silo still runs there, ship the code (HEAD) and keys, install.
host="bash fedpt/launch/host.sh"
files=("$keys/silo_$silo.key" "$keys/aggregator.pub")
setup="{ ! test -f fedpt/launch/host.sh || $host check --name=$silo; }"
setup+=" && mkdir -p -m 700 $REMOTE_KEYS && mv silo_$silo.key aggregator.pub $REMOTE_KEYS/ && chmod 600 $REMOTE_KEYS/silo_$silo.key"
if ((install)); then
  tarball="${TMPDIR:-/tmp}/fedpt-src-$tpu_name.tar.gz"
  if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    [[ -z "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]] ||
      printf 'warning: %s has uncommitted changes; the VM gets its HEAD commit only\n' "$REPO" >&2
    run git -C "$REPO" archive --format=tar.gz --prefix=fedpt/ -o "$tarball" HEAD
  else  # A copy without git history (an unpacked release): ship the files as they are.
    run tar -C "$REPO" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
      --transform='s,^\.,fedpt,' -czf "$tarball" .
  fi
  files=("$tarball" "${files[@]}")
  setup+=" && rm -rf fedpt && tar -xzf $(basename "$tarball") && $host setup --python=$python --extra=tpu"
fi
run "${tpu[@]}" scp "${files[@]}" "$tpu_name:" "${where[@]}" --worker=all
run "${tpu[@]}" ssh "$tpu_name" "${where[@]}" --worker=all "--command=$setup"

# Start train.py on every host, detached; host.sh restarts it after a preemption checkpoint.
train="$(quoted scripts/train.py "--config=$config" "--workdir=$workdir" "--silo=$silo" \
  "--storage=$storage") --keys=$REMOTE_KEYS $(quoted --config.distributed.mode=auto "${train_args[@]}")"
start="cd fedpt && bash launch/host.sh start $(quoted "--name=$silo" "--max-restarts=$max_restarts")"
start+=" -- $REMOTE_VENV/bin/python $train"
run "${tpu[@]}" ssh "$tpu_name" "${where[@]}" --worker=all "--command=$start"
delete_on_exit

# The VM's ~, in single quotes: expanded there.
follow="$(quoted "${tpu[@]}" ssh "$tpu_name" "${where[@]}" --worker=0)"
follow+=" --command='tail -n 50 -F ~/fedpt-logs/$silo.log'"
printf '%s. Follow worker 0 (--worker=N for host N): %s\n' \
  "silo $silo runs detached on every host of $tpu_name, logging to ~/fedpt-logs/$silo.log there" \
  "$follow" >&2
((wait)) || exit 0
wait_cmd=("${tpu[@]}" ssh "$tpu_name" "${where[@]}" --worker=0 "--command=$host wait --name=$silo")
if ((dry_run)); then
  run "${wait_cmd[@]}"
  ((delete_after)) && run "${delete[@]}"
  exit 0
fi
status=0
run "${wait_cmd[@]}" || status=$?
if ((status == 255)); then  # ssh's own failure: the silo may well run on.
  trap - EXIT
  printf '%s (not deleting the slice). Follow it: %s; delete it later: %s\n' \
    "error: lost the connection to $tpu_name; the silo keeps running there" "$follow" \
    "$(quoted "${delete[@]}")" >&2
fi
exit "$status"
