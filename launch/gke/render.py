#!/usr/bin/env python3
r"""Renders and applies a silo's JobSet, or the aggregator's Job, on GKE.

  python3 launch/gke/render.py --config=configs/150m.py --silo=web \
      --storage=gs://bucket/run1 --keys=/private/keys --workdir=gs://web-private/fedpt \
      --image=us-docker.pkg.dev/my-project/fedpt/fedpt:0.1 --namespace=fedpt \
      --num-hosts=4 --tpu-type=tpu-v5-lite-podslice --tpu-topology=4x4 --dry-run
  python3 scripts/plan.py --config=configs/150m.py --format=json > plan.json
  python3 launch/gke/render.py --role=aggregator --storage=gs://bucket/run1 \
      --keys=/ops/keys --image=... --namespace=fedpt --plan=plan.json

The party's secret key goes into a Secret with `kubectl create secret`, straight
from the key folder, so it never appears in the rendered YAML or in the dry-run
output; the pods mount it read-only. Stdlib only: this runs on an admin's laptop.
"""
import argparse
import json
import pathlib
import re
import shlex
import string
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
KEYS_PATH = '/var/run/fedpt/keys'  # Where pods see the key Secret.
COORDINATOR_PORT = 8476  # jax.distributed's coordinator, on pod 0 of the silo.
DNS_LABEL = re.compile(r'[a-z0-9]([-a-z0-9]*[a-z0-9])?')
LABEL_VALUE = re.compile(r'[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?')
TOPOLOGY = re.compile(r'[1-9][0-9]*(x[1-9][0-9]*){1,2}')
QUANTITY = re.compile(r'[0-9]+(\.[0-9]+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?')
MAX_NAME = 40  # Pod hostnames are <name>-silo-0-<i>: keep them under 63 characters.
IMAGE_GID = 1000  # launch/gke/Dockerfile's non-root user: the pods' fsGroup, to read the keys.


class UsageError(ValueError):
  """A missing or invalid setting; the message names the flag and the fix."""


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog='launch/gke/render.py', description=__doc__.split('\n\n', 1)[0],
      epilog='Arguments after -- go to train.py (silo) or aggregate.py (aggregator).',
      formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
  p.add_argument('--role', choices=('silo', 'aggregator'), default='silo')
  p.add_argument('--config', help='silo: a config inside the image, e.g. configs/150m.py')
  p.add_argument('--silo', help="silo: this silo's id in run.json")
  p.add_argument('--storage', help="the run's storage root, gs://bucket/path")
  p.add_argument('--keys', help='local key folder: silo_<id>.key (silo) or aggregator.key '
                 '(aggregator), and aggregator.pub; copied into the Secret')
  p.add_argument('--workdir', help="silo: its private checkpoints, a gs:// path")
  p.add_argument('--image', help='container image with fedpt at --repo-dir')
  p.add_argument('--namespace', default='default')
  p.add_argument('--name', help='JobSet/Job name (default fedpt-<silo> or fedpt-aggregator)')
  p.add_argument('--num-hosts', type=int, default=1, help='silo: pods (hosts) in the slice')
  p.add_argument('--tpu-type', help='silo: e.g. tpu-v5-lite-podslice (node selector)')
  p.add_argument('--tpu-topology', help='silo: e.g. 4x4 (node selector)')
  p.add_argument('--tpu-chips-per-host', type=int, default=4, help='silo: google.com/tpu')
  p.add_argument('--gpus', type=int, help='silo: nvidia.com/gpu per host')
  p.add_argument('--gpu-type', help='silo: e.g. nvidia-h100-80gb (node selector)')
  p.add_argument('--cpus', default='4', help='aggregator: CPU request')
  p.add_argument('--memory', help='aggregator: memory request and limit (default: from --plan)')
  p.add_argument('--plan', help='aggregator: `scripts/plan.py --config=... --num_shards=n '
                 '--format=json` output; sizes the memory of this --shard from it')
  p.add_argument('--shard', help='aggregator: i/n, one of n aggregation shards')
  p.add_argument('--service-account', help='Kubernetes service account (Workload Identity '
                 'for gs://)')
  p.add_argument('--repo-dir', default='/fedpt', help='the fedpt checkout inside the image')
  p.add_argument('--max-restarts', type=int, default=3,
                 help='restarts after failures other than a preemption (exit 75)')
  p.add_argument('--dry-run', action='store_true',
                 help='print the kubectl commands and the YAML; run nothing')
  return p


def _need(args, *names):
  hints = {
      'config': 'a config inside the image, e.g. --config=configs/150m.py',
      'silo': "this silo's id in run.json, e.g. --silo=web",
      'storage': "the run's storage root, e.g. --storage=gs://bucket/run1",
      'keys': 'the local folder holding the key files, e.g. --keys=~/keys',
      'workdir': "a gs:// path for the silo's checkpoints, e.g. --workdir=gs://mine/web",
      'image': 'the container image, e.g. --image=us-docker.pkg.dev/p/fedpt/fedpt:0.1',
  }
  for name in names:
    if not getattr(args, name):
      raise UsageError(f'--{name} is missing. Fix: pass {hints[name]}')


def _check(ok: bool, flag: str, value, fix: str):
  if not ok:
    raise UsageError(f'--{flag}={value} is invalid. Fix: {fix}')


def _dns_label(flag: str, value: str, max_len: int = 63):
  _check(bool(DNS_LABEL.fullmatch(value)) and len(value) <= max_len, flag, value,
         f'a DNS-1123 label of at most {max_len} characters: lowercase letters, digits and '
         "'-', starting and ending with a letter or digit")


def validate(args) -> None:
  """Every setting, before anything is rendered or run."""
  _need(args, 'storage', 'keys', 'image')
  if args.role == 'silo':
    _need(args, 'config', 'silo', 'workdir')
    _check(bool(LABEL_VALUE.fullmatch(args.silo)) and len(args.silo) <= 63, 'silo', args.silo,
           "letters, digits, '-', '_' and '.' (it is a label value)")
    args.name = args.name or f'fedpt-{args.silo}'
    _check(args.num_hosts >= 1, 'num-hosts', args.num_hosts, 'a positive number of hosts')
    if args.tpu_type or args.tpu_topology:
      _check(not args.gpus and not args.gpu_type, 'gpus', args.gpus,
             'give either --tpu-type/--tpu-topology or --gpus/--gpu-type')
      _check(bool(args.tpu_type and DNS_LABEL.fullmatch(args.tpu_type)), 'tpu-type',
             args.tpu_type, 'pass the GKE accelerator name, e.g. --tpu-type=tpu-v5-lite-podslice')
      _check(bool(args.tpu_topology and TOPOLOGY.fullmatch(args.tpu_topology)),
             'tpu-topology', args.tpu_topology, 'pass the slice topology, e.g. --tpu-topology=4x4')
      _check(args.tpu_chips_per_host >= 1, 'tpu-chips-per-host', args.tpu_chips_per_host,
             'a positive number of chips')
      chips = 1
      for n in args.tpu_topology.split('x'):
        chips *= int(n)
      _check(chips == args.num_hosts * args.tpu_chips_per_host, 'num-hosts', args.num_hosts,
             f'topology {args.tpu_topology} has {chips} chips: with '
             f'{args.tpu_chips_per_host} per host (--tpu-chips-per-host) that is '
             f'--num-hosts={max(chips // args.tpu_chips_per_host, 1)}')
    if args.gpus is not None:
      _check(args.gpus >= 1, 'gpus', args.gpus, 'a positive number of GPUs per host')
    if args.gpu_type:
      _dns_label('gpu-type', args.gpu_type)
    if not args.workdir.startswith('gs://'):
      print(f'warning: --workdir={args.workdir} is not gs://: a pod\'s disk is lost with the '
            'pod, and the silo restarts from scratch', file=sys.stderr)
  else:
    if args.shard:
      m = re.fullmatch(r'([0-9]+)/([1-9][0-9]*)', args.shard)
      _check(bool(m) and int(m.group(1)) < int(m.group(2)), 'shard', args.shard,
             'i/n with 0 <= i < n, e.g. --shard=0/2')
    suffix = f'-{args.shard.replace("/", "-of-")}' if args.shard else ''
    args.name = args.name or f'fedpt-aggregator{suffix}'
    _check(bool(QUANTITY.fullmatch(args.cpus)), 'cpus', args.cpus, 'a quantity, e.g. 4')
    if args.memory is None:
      args.memory = planned_memory(args)
    _check(bool(QUANTITY.fullmatch(args.memory)), 'memory', args.memory, 'a quantity, e.g. 16Gi')
  _dns_label('name', args.name, MAX_NAME)
  _dns_label('namespace', args.namespace)
  if args.service_account:
    _dns_label('service-account', args.service_account)
  _check(not re.search(r'\s', args.image), 'image', args.image, 'an image reference, no spaces')
  _check(args.repo_dir.startswith('/'), 'repo-dir', args.repo_dir, 'an absolute path')
  _check(args.max_restarts >= 0, 'max-restarts', args.max_restarts, 'a number >= 0')
  keys = pathlib.Path(args.keys).expanduser()
  for file in key_files(args):
    if not (keys / file).is_file():
      raise UsageError(
          f'--keys={args.keys} has no {file}. Fix: make it with scripts/keys.py '
          f'--keys={args.keys} --names={key_files(args)[0][:-len(".key")]}, and copy in the '
          'aggregator.pub the operator sent')


def planned_memory(args) -> str:
  """The aggregator's memory for its shard from plan.py's JSON: the planned peak + 10%, in Gi."""
  fix = ('run python3 scripts/plan.py --config=<the run\'s config> --num_shards=<n> '
         '--format=json > plan.json and pass --plan=plan.json, or pass --memory')
  if not args.plan:
    raise UsageError(f'--plan is missing: the aggregator\'s memory comes from the plan of its '
                     f'model, outer optimizer and silos. Fix: {fix}')
  try:
    aggregator = json.loads(pathlib.Path(args.plan).expanduser().read_text())['aggregator']
    shards = {s['shard']: int(s['total']) for s in aggregator['shards']}
    num_shards = int(aggregator['num_shards'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UsageError(f'--plan={args.plan} is not a plan.py JSON with an aggregator section '
                     f'({type(e).__name__}: {e}). Fix: {fix}') from None
  index, count = (int(x) for x in args.shard.split('/')) if args.shard else (0, 1)
  if count != num_shards or index not in shards:
    raise UsageError(f'--plan={args.plan} plans {num_shards} aggregation shard(s), not the '
                     f'{count} of --shard={args.shard or "0/1"}. Fix: rerun plan.py with '
                     f'--num_shards={count}, or pass the matching --shard')
  gib = -(-shards[index] * 11 // 10 // 2**30)
  return f'{max(gib, 1)}Gi'


def key_files(args) -> list[str]:
  """What the party's Secret holds: its secret key and the pinned aggregator.pub."""
  own = 'aggregator.key' if args.role == 'aggregator' else f'silo_{args.silo}.key'
  return [own, 'aggregator.pub']


def _yaml_list(items) -> str:
  """A flow sequence of JSON strings: valid YAML, whatever the characters."""
  return '[' + ', '.join(json.dumps(str(item)) for item in items) + ']'


def _block(lines, indent: int) -> str:
  """Optional YAML lines, indented to sit where the template's placeholder is."""
  return '\n'.join(' ' * indent + line for line in lines)


def _literal(arg: str) -> str:
  """Kubernetes expands $(VAR) in args; $$( keeps a user's text as written."""
  return arg.replace('$(', '$$(')


def train_args(args, extra) -> list[str]:
  """train.py's arguments; a multi-host silo also gets its jax.distributed settings."""
  out = [_literal(a) for a in (f'--config={args.config}', f'--workdir={args.workdir}',
                               f'--silo={args.silo}', f'--storage={args.storage}')]
  out.append(f'--keys={KEYS_PATH}')
  if args.num_hosts > 1:
    coordinator = f'{args.name}-silo-0-0.{args.name}:{COORDINATOR_PORT}'
    out += ['--config.distributed.mode=explicit',
            f'--config.distributed.coordinator_address={coordinator}',
            f'--config.distributed.num_processes={args.num_hosts}',
            # Kubernetes substitutes $(VAR) in args from the container's env.
            '--config.distributed.process_id=$(JOB_COMPLETION_INDEX)']
  return out + [_literal(a) for a in extra]


def secret_name(args) -> str:
  return f'{args.name}-key'


def render(args, extra=()) -> str:
  """The YAML of the silo's JobSet or the aggregator's Job."""
  pod, annotations = [], []
  if args.service_account:
    pod.append(f'serviceAccountName: {json.dumps(args.service_account)}')
  if args.role == 'silo':
    selector = {}
    limits = {}
    if args.tpu_type:
      selector = {'cloud.google.com/gke-tpu-accelerator': args.tpu_type,
                  'cloud.google.com/gke-tpu-topology': args.tpu_topology}
      limits = {'google.com/tpu': args.tpu_chips_per_host}
      # Every pod of the slice in one node pool: one TPU slice per silo.
      annotations = ['annotations:',
                     '  alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool']
    elif args.gpus or args.gpu_type:
      if args.gpu_type:
        selector = {'cloud.google.com/gke-accelerator': args.gpu_type}
      limits = {'nvidia.com/gpu': args.gpus or 1}
    if selector:
      pod += ['nodeSelector:'] + [f'  {k}: {json.dumps(v)}' for k, v in selector.items()]
    resources = (['resources:', '  limits:'] + [f'    {k}: {v}' for k, v in limits.items()]
                 if limits else [])
    template, indent, arguments = 'silo-jobset.yaml.tmpl', 12, train_args(args, extra)
  else:
    resources = ['resources:', '  requests:', f'    cpu: "{args.cpus}"',
                 f'    memory: "{args.memory}"', '  limits:', f'    memory: "{args.memory}"']
    arguments = [_literal(f'--storage={args.storage}'), f'--keys={KEYS_PATH}']
    if args.shard:
      arguments.append(f'--shard={args.shard}')
    arguments += [_literal(a) for a in extra]
    template, indent = 'aggregator-job.yaml.tmpl', 6
  text = string.Template((HERE / template).read_text()).substitute(
      # Strings as JSON: valid YAML scalars that stay strings (a silo named 123, say).
      name=json.dumps(args.name), namespace=json.dumps(args.namespace),
      silo=json.dumps(args.silo or ''), image=json.dumps(args.image),
      repo_dir=json.dumps(args.repo_dir), keys_path=json.dumps(KEYS_PATH),
      secret=json.dumps(secret_name(args)), num_hosts=args.num_hosts, fs_group=IMAGE_GID,
      max_restarts=args.max_restarts, args=_yaml_list(arguments),
      pod_extras=_block(pod, indent), resources=_block(resources, indent + 2),
      annotations=_block(annotations, 2))
  return '\n'.join(line for line in text.splitlines() if line.strip()) + '\n'


def commands(args) -> list[list[str]]:
  """kubectl create secret (idempotent via apply), then kubectl apply of the YAML."""
  keys = pathlib.Path(args.keys).expanduser()
  secret = ['kubectl', 'create', 'secret', 'generic', secret_name(args),
            f'--namespace={args.namespace}',
            *[f'--from-file={f}={keys / f}' for f in key_files(args)],
            '--dry-run=client', '--output=yaml']
  return [secret, ['kubectl', 'apply', '-f', '-'], ['kubectl', 'apply', '-f', '-']]


def main(argv) -> int:
  if '--' in argv:
    cut = argv.index('--')
    argv, extra = argv[:cut], argv[cut + 1:]
  else:
    extra = []
  args = _parser().parse_args(argv)
  try:
    validate(args)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  yaml_text = render(args, extra)
  create, apply_secret, apply = commands(args)
  q = shlex.join
  if args.dry_run:
    print(f'{q(create)} | {q(apply_secret)}')
    print(f"{q(apply)} <<'EOF'\n{yaml_text}EOF")
    return 0
  try:
    print(f'+ {q(create)} | {q(apply_secret)}', file=sys.stderr)
    secret_yaml = subprocess.run(create, check=True, stdout=subprocess.PIPE, text=True).stdout
    subprocess.run(apply_secret, input=secret_yaml, check=True, text=True)
    print(f'+ {q(apply)} <<EOF (the YAML that --dry-run prints)', file=sys.stderr)
    subprocess.run(apply, input=yaml_text, check=True, text=True)
  except FileNotFoundError:
    print('error: kubectl not found. Fix: install it and point it at the cluster '
          '(gcloud container clusters get-credentials ...), or use --dry-run', file=sys.stderr)
    return 2
  except subprocess.CalledProcessError as e:
    print(f'error: {q(e.cmd)} exited with status {e.returncode} (its output is above)',
          file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
