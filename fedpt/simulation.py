"""A whole federation on one machine: init, one OS process per silo, the aggregator shards.

The processes are the real entry points (scripts/train.py --silo, scripts/
aggregate.py --shard) talking only through the bucket, exactly as separate
organisations would; the simulator merely starts them and reads the bucket to
report progress. Children get the same config as the caller: the config file
plus the command-line overrides that turn its `get_config()` into the caller's
ConfigDict (`config_overrides`).
"""
import ctypes
import functools
import json
import os
import signal
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags

from fedpt import aggregator
from fedpt import config as config_lib
from fedpt import contribution as contribution_lib
from fedpt import corpora
from fedpt import data as data_lib
from fedpt import errors
from fedpt import evaluation
from fedpt import ledger
from fedpt import member_gain
from fedpt import protocol
from fedpt import records
from fedpt import signing
from fedpt import storage as storage_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_GRACE_S = 60.0  # How long a round's line waits for the silos' held-out losses.
STOP_GRACE_S = 30.0  # SIGTERM lets a silo checkpoint (exit 75) before we SIGKILL it.


class SimulationError(errors.UserError, RuntimeError):
  """A child process failed; the message names it and shows the end of its log."""


# -- the config, as command-line overrides ----------------------------------------


def load_config_file(config_file: str, overrides=()):
  """What scripts/*.py --config=config_file <overrides> would see."""
  argv = ['simulate', f'--config={config_file}', *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=values, lock_config=False,
                                  sys_argv=argv)
  values(argv)
  return values.config


def config_overrides(config, config_file: str) -> list[str]:
  """`--config.x=v` flags that turn `config_file`'s get_config() into `config`.

  Checked by loading them back, so a value that does not survive the command
  line fails here and not in a child.
  """
  want = config_lib.flat(config.copy_and_resolve_references())
  have = config_lib.flat(load_config_file(config_file).copy_and_resolve_references())
  unknown = sorted(set(want) - set(have))
  if unknown:
    raise config_lib.ConfigError(unknown[0], f'is not in {config_file}',
                                 'add it to the config file instead')
  overrides = [f'--config.{k}={v if isinstance(v, str) else repr(config_lib.as_tuples(v))}'
               for k, v in sorted(want.items()) if have[k] != v]
  back = config_lib.flat(load_config_file(config_file, overrides).copy_and_resolve_references())
  for key, value in want.items():
    if back[key] != value:
      raise config_lib.ConfigError(
          key, f'{value!r} does not survive the command line (reads back as {back[key]!r})',
          f'set it in {config_file} instead')
  return overrides


# -- child processes ---------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
  """In a child, before exec: SIGTERM it when the simulator dies, however it dies (kill -9).

  SIGTERM, not SIGKILL: a silo then checkpoints and exits 75, and a rerun resumes.
  Linux's parent-death signal; elsewhere children outlive a killed simulator.
  """
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG.
  except (OSError, AttributeError):
    return
  if os.getppid() != parent_pid:  # The simulator died before prctl took effect.
    os._exit(75)  # pylint: disable=protected-access


class _Children:
  """Started processes by name, each logging to <workdir>/logs/<name>.log."""

  def __init__(self, log_dir: str):
    self.log_dir = log_dir
    os.makedirs(log_dir, exist_ok=True)
    self.procs: dict[str, subprocess.Popen] = {}

  def log_path(self, name: str) -> str:
    return os.path.join(self.log_dir, f'{name}.log')

  def start(self, name: str, argv: list[str], env: dict | None = None) -> None:
    """Starts `argv` as `name`; `env` replaces variables of ours (a value None drops one)."""
    env = {k: v for k, v in {**os.environ, 'PYTHONUNBUFFERED': '1', **(env or {})}.items()
           if v is not None}
    with open(self.log_path(name), 'ab') as log:
      log.write(f'$ {" ".join(argv)}\n'.encode())
      log.flush()
      self.procs[name] = subprocess.Popen(
          argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
          env=env,
          preexec_fn=functools.partial(_die_with_parent, os.getpid()))

  def check(self) -> bool:
    """True once every child exited 0; raises if one failed."""
    for name, proc in self.procs.items():
      code = proc.poll()
      if code not in (None, 0):
        self.stop()
        raise SimulationError(
            f'{name} exited with status {code}; see {self.log_path(name)}. Its last lines:\n'
            + _tail(self.log_path(name)))
    return all(p.poll() == 0 for p in self.procs.values())

  def finished(self, prefix: str) -> bool:
    return all(p.poll() is not None for n, p in self.procs.items() if n.startswith(prefix))

  def stop(self) -> None:
    running = [p for p in self.procs.values() if p.poll() is None]
    for p in running:
      p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in running:
      try:
        p.wait(timeout=max(deadline - time.monotonic(), 0.1))
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def _tail(path: str, lines: int = 20) -> str:
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      return ''.join(f.readlines()[-lines:]).rstrip()
  except OSError as e:
    return f'(cannot read the log: {e})'


# -- the run --------------------------------------------------------------------------


def _resume_config(store, config, typed):
  """(the run at the storage root, `config` with its contract) if this config may resume it.

  As for a silo: the config file's values give way to run.json, typed ones that
  disagree are refused; `typed` None (an in-process call) counts every field as typed.
  """
  run = store.read_run()
  protocol.check_run(run)
  typed = set(records.contract(config)) if typed is None else set(typed)
  config, adopted = protocol.adopt_run_config(run, config, None, typed)
  return run, config, adopted


def resolved_config(config, storage_root: str, typed=None, silo_data=None):
  """The run's config as `simulate` would start or resume it (run.json's over a new one's).

  Reads only (--print_config shows it); raw --silo_data would still be tokenised,
  which sets data.corpus and data.tokenizer.
  """
  if silo_data:
    config, typed = _silos_of(config, corpora.parse(silo_data), typed)
  store = storage_lib.RunStorage(storage_root)
  if store.exists(store.run_path):
    config = _resume_config(store, config, typed)[1]
  return protocol.federated_config(config)


def _silo_group_override(config, silo_id: str) -> list[str]:
  """On the built-in corpus, a silo named after a stdlib group reads only that group.

  The group is tokenised here, once, so the silo processes do not all tokenise at
  start-up while competing for the same cores.
  """
  if config.data.corpus == 'stdlib' and silo_id in data_lib.STDLIB_GROUPS:
    data_lib.default_corpus_dir(silo_id)
    return [f'--config.data.stdlib_group={silo_id}']
  return []


def _silos_of(config, silo_data, typed):
  """(config, typed): the silos are --silo_data's names unless federation.silos was typed."""
  config = config.copy_and_resolve_references()
  typed = set(records.contract(config)) if typed is None else set(typed)
  if 'federation.silos' not in typed:
    config.federation.silos = tuple(silo_data)
    typed.add('federation.silos')  # A resumed run with other silos is refused, not adopted.
  return config, typed


def _corpus_override(overrides, corpus_dir):
  """The silo's own corpus in place of the shared one in `overrides`."""
  own = [o for o in overrides if not o.startswith(('--config.data.corpus=',
                                                    '--config.data.stdlib_group='))]
  return own + [f'--config.data.corpus={corpus_dir}']


def _init_config(config):
  """init_run builds a model and loads a corpus; use a silo's group, not all of stdlib."""
  config = config.copy_and_resolve_references()
  groups = [s for s in config.federation.silos if s in data_lib.STDLIB_GROUPS]
  if config.data.corpus == 'stdlib' and groups:
    config.data.stdlib_group = groups[0]
  return config


def _make_keys(keys_dir: str, silo_ids) -> None:
  """The aggregator's and every silo's key pair, keeping any that already exist."""
  names = [signing.AGGREGATOR] + [signing.silo_key_name(s) for s in silo_ids]
  missing = [n for n in names if not os.path.exists(os.path.join(keys_dir, f'{n}.key'))]
  signing.generate_named(keys_dir, missing)


def _exit_on_sigterm():
  """SIGTERM to the simulator stops its children too (they checkpoint and exit 75)."""
  def handler(signum, frame):
    del frame
    raise SystemExit(128 + signum)
  try:
    return signal.signal(signal.SIGTERM, handler)
  except ValueError:  # Not the main thread: leave signals alone.
    return None


def _line(rec: dict) -> str:
  losses = ' '.join(f'{s} {v:.3f}' for s, v in rec['train_loss_by_silo'].items())
  seconds = '-' if rec['seconds'] is None else f"{rec['seconds']:.1f}s"
  fmt = ledger._fmt_loss  # pylint: disable=protected-access
  extra = ''
  if rec['rejected'] or rec['missing']:
    extra = f" | rejected {[e['silo'] for e in rec['rejected']]} missing {rec['missing']}"
  return (f"round {rec['round']:>3} | train {losses} | global held-out "
          f"{fmt(rec['base_eval_loss'])} -> {fmt(rec['eval_loss'])} | "
          f"{rec['tokens']:,} tokens | {rec['bytes'] / 1e6:.1f} MB | {seconds}{extra}")


class RoundWatcher:
  """Reads a run's finished rounds from the bucket as they appear and logs one line each.

  The one home of the per-round progress lines: `simulate` and `follow` (status.py
  --follow, which launch/local.sh runs) both print them.
  """

  def __init__(self, store, run: dict, log=print):
    self.store, self.run, self.log = store, run, log
    self.total = run['federation']['rounds']
    self.silos = protocol.silo_ids(run)
    self.model_nbytes = ledger.global_nbytes(store, store.latest_global_round())
    self.already_done = store.latest_global_round() or 0  # Rounds before we watched: no time.
    self.records: list[dict] = []
    self._seen_at: dict[int, float] = {}
    self._last_at = time.monotonic()

  @property
  def done(self) -> bool:
    return len(self.records) >= self.total

  def poll(self, silos_finished: bool = False) -> list[dict]:
    """The rounds finished since the last call, logged; each waits up to EVAL_GRACE_S for
    the silos' held-out losses of its global model, unless the silos have all exited."""
    new = []
    r = len(self.records)
    while r < self.total and self.store.global_shard_metas(r + 1) is not None:
      now = time.monotonic()
      self._seen_at.setdefault(r, now)
      evals = ledger.eval_losses(self.store, self.run, r + 1)
      if (len(evals) < len(self.silos) and not silos_finished
          and now - self._seen_at[r] < EVAL_GRACE_S):
        break  # Give the silos a moment to load and evaluate the new global model.
      rec = ledger.round_record(self.store, self.run, r, self.model_nbytes)
      rec['seconds'] = None if r < self.already_done else self._seen_at[r] - self._last_at
      self._last_at = self._seen_at[r]
      self.records.append(rec)
      new.append(rec)
      self.log(_line(rec))
      r += 1
    return new


def follow(storage_root: str, log=print) -> list[dict]:
  """Logs each round of the run at `storage_root` as it finishes, until the last one."""
  store = storage_lib.RunStorage(storage_root)
  run = store.read_run()
  protocol.check_run(run)
  watcher = RoundWatcher(store, run, log)
  while True:
    watcher.poll()
    if watcher.done:
      return watcher.records
    time.sleep(run['federation']['poll_s'])


def _check_contribution(config) -> None:
  """Every silo here runs `config`'s contribution.mode: refused before any process starts,
  in the silos' own words (`contribution.unsupported`)."""
  mode, fed = config.contribution.mode, config.federation
  problem = mode != 'none' and contribution_lib.unsupported(
      {'silos': [{'id': s} for s in fed.silos], 'federation': fed.to_dict()}, mode)
  if problem:
    raise config_lib.ConfigError('contribution.mode', f'{mode!r}: {problem[0]}', problem[1])


def simulate(config, config_file: str, storage_root: str, workdir: str,
             log=print, typed=None, silo_data=None, tokenizer: str = 'config',
             text_field: str = 'text', on_bad_text: str = 'error',
             baselines: bool = False, link: str | None = None) -> dict:
  """Runs (or resumes) the federated run `config` with every party as its own process.

  Args:
    config: the resolved config (e.g. FLAGS.config).
    config_file: the file `config` came from; children get it plus overrides.
    storage_root: the bucket; a new run is created unless an unfinished one is there.
    workdir: logs/, silos/<id>/ (private checkpoints), keys/ and rounds.jsonl. Every
      party's Ed25519 key pair is made in keys/ (one machine plays all parties, so
      one folder holds every secret; real parties each keep their own).
    log: where progress lines go.
    typed: the fields set on the command line (`cli.config_overrides`); resuming a
      run, the others take run.json's values. None: every field of `config`.
    silo_data: each silo's own corpus, ['NAME=PATH,...', ...] (`corpora.parse`);
      the silos are these names unless federation.silos is typed. Raw sources
      are tokenised into <workdir>/data/<silo>/ before any process starts.
    tokenizer, text_field, on_bad_text: with silo_data, the run's tokenizer
      ('config': data.tokenizer; 'train': trained on the silos' text) and how
      raw sources are read (`corpora.prepare`).
    baselines: then train each silo's isolated baseline (`train_baselines`) and
      print the member-gain report (`member_gain.member_gain`).
    link: each silo's own simulated link to the bucket, e.g. '100MB/s,50ms'
      (`storage.Link`; FEDPT_LINK in the silo processes). The aggregators sit by the
      bucket and get none; None leaves the silos whatever FEDPT_LINK they inherit.

  Returns:
    A summary with one record per round (also in <workdir>/rounds.jsonl).
  """
  started = time.monotonic()
  if link is not None:
    link = storage_lib.Link.parse(link, '--link')
    link = link.spec if link else 'none'
  config_file = os.path.abspath(config_file)
  if not storage_lib.is_remote(storage_root):
    storage_root = os.path.abspath(storage_root)
  workdir = os.path.abspath(workdir)
  if silo_data:
    silo_data = corpora.parse(silo_data)
    config, typed = _silos_of(config, silo_data, typed)
    corpora.check(silo_data, config.federation.silos, tokenizer=tokenizer)
  store = storage_lib.RunStorage(storage_root)
  keys_dir = os.path.join(workdir, 'keys')
  resuming = store.exists(store.run_path)
  if resuming:
    run, config, adopted = _resume_config(store, config, typed)
    if adopted:
      log(f'resuming with run.json\'s values: {config_lib.describe(adopted, "run.json")}')
  corpus_by_silo = {}
  if silo_data:
    corpus_by_silo, tokenizer_path = corpora.prepare(
        config, silo_data, workdir, tokenizer=tokenizer, text_field=text_field,
        on_bad_text=on_bad_text, run_tokenizer_sha256=run['tokenizer_sha256'] if resuming
        else None, log=log)
    config = config.copy_and_resolve_references()
    config.data.tokenizer = tokenizer_path
    config.data.corpus = corpus_by_silo[config.federation.silos[0]]  # For init_run's model.
  overrides = config_overrides(config, config_file)
  config = protocol.federated_config(config)
  protocol.validate_federation(config)
  _check_contribution(config)
  if resuming:
    if (store.latest_global_round() or 0) >= run['federation']['rounds']:
      log(f'run {run["run_id"]} at {storage_root} is finished ({run["federation"]["rounds"]} '
          f'rounds); nothing to do. Ledger: python3 scripts/status.py --storage={storage_root}')
      return _and_baselines(baselines, {
          'run_id': run['run_id'], 'storage': storage_root, 'workdir': workdir,
          'finished': True, 'rounds': [], 'final_eval_by_silo': ledger.eval_losses(
              store, run, run['federation']['rounds']), 'wall_s': time.monotonic() - started},
          config_file, overrides, config, log)
    log(f'resuming run {run["run_id"]} at {storage_root} from global round '
        f'{store.latest_global_round()}')
  else:
    _make_keys(keys_dir, config.federation.silos)
    run = aggregator.init_run(_init_config(config), storage_root, keys_dir=keys_dir)
    log(f'created run {run["run_id"]} at {storage_root} (signed; keys in {keys_dir})')
  keys_flag = [f'--keys={keys_dir}'] if run.get('public_keys') else []
  silos = [s['id'] for s in run['silos']]
  fed = run['federation']
  total = fed['rounds']

  children = _Children(os.path.join(workdir, 'logs'))
  scripts = os.path.join(REPO, 'scripts')
  previous_handler = _exit_on_sigterm()
  try:
    for silo_id in silos:
      children.start(f'silo_{silo_id}', [
          sys.executable, os.path.join(scripts, 'train.py'), f'--config={config_file}',
          *(_corpus_override(overrides, corpus_by_silo[silo_id]) if corpus_by_silo else
            [*overrides, *_silo_group_override(config, silo_id)]), f'--silo={silo_id}',
          f'--storage={storage_root}', f'--workdir={os.path.join(workdir, "silos", silo_id)}',
          *keys_flag], env={storage_lib.LINK_ENV: link} if link else None)
    for shard in range(fed['num_shards']):
      children.start(f'aggregator_{shard}_of_{fed["num_shards"]}', [
          sys.executable, os.path.join(scripts, 'aggregate.py'), f'--storage={storage_root}',
          f'--shard={shard}/{fed["num_shards"]}', *keys_flag], env={storage_lib.LINK_ENV: None})
    log(f'{len(silos)} silos {silos} and {fed["num_shards"]} aggregator process(es) '
        f'started; logs in {children.log_dir}'
        + (f'; each silo\'s link to the bucket: {link}' if link else ''))

    watcher = RoundWatcher(store, run, log)
    with open(os.path.join(workdir, 'rounds.jsonl'), 'w', encoding='utf-8') as out:
      while True:
        all_exited_ok = children.check()
        for rec in watcher.poll(silos_finished=children.finished('silo_')):
          out.write(json.dumps(rec) + '\n')
          out.flush()
        if all_exited_ok:
          if not watcher.done:
            raise SimulationError(
                f'every process exited but only {len(watcher.records)} of {total} rounds '
                f'completed; see the logs in {children.log_dir}')
          break
        time.sleep(fed['poll_s'])
  finally:
    children.stop()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)

  rounds = watcher.records
  final = ledger.eval_losses(store, run, total)
  plots = evaluation.write_plots(store, workdir, config_name=config.name)
  summary = {
      'run_id': run['run_id'], 'storage': storage_root, 'workdir': workdir,
      'rounds': rounds,
      'initial_eval_loss': rounds[0]['base_eval_loss'] if rounds else None,
      'final_eval_loss': rounds[-1]['eval_loss'] if rounds else None,
      'final_eval_by_silo': final,
      'plots': plots,
      'total_tokens': sum(rec['tokens'] for rec in rounds),
      'total_bytes': sum(rec['bytes'] for rec in rounds),
      'wall_s': time.monotonic() - started,
  }
  fmt = ledger._fmt_loss  # pylint: disable=protected-access
  log(f"done: global held-out loss {fmt(summary['initial_eval_loss'])} -> "
      f"{fmt(summary['final_eval_loss'])} over {total} rounds; "
      f"{summary['total_tokens']:,} tokens, {summary['total_bytes'] / 1e6:.1f} MB exchanged, "
      f"{summary['wall_s']:.0f}s")
  log('final held-out loss per silo: ' + ', '.join(f'{s} {v:.3f}' for s, v in final.items()))
  log(f'ledger: python3 scripts/status.py --storage={storage_root}')
  return _and_baselines(baselines, summary, config_file, overrides, config, log)


# -- isolated baselines and the member question ------------------------------------------------


def _and_baselines(wanted: bool, summary: dict, config_file, overrides, config, log) -> dict:
  if not wanted:
    return summary
  summary['baselines'] = train_baselines(config_file, overrides, config, summary['storage'],
                                         summary['workdir'], log)
  run = storage_lib.RunStorage(summary['storage']).read_run()
  members = member_gain.members_from_workdir(summary['workdir'], protocol.silo_ids(run))
  summary['member_gain'] = member_gain.member_gain(
      summary['storage'], members, os.path.join(summary['workdir'], 'member_gain'), log=log)
  return summary


def baseline_command(config_file: str, overrides: list[str], config, storage_root: str,
                     workdir: str, silo_id: str) -> tuple[list[str], int]:
  """(train.py argv, steps) of silo `silo_id`'s isolated baseline in <workdir>/baselines/<id>.

  The silo's own recorded config (its corpus, batch, inner optimizer), a plain run
  of `member_gain.baseline_steps` steps in the silo's data order (--data_order_of),
  starting from the same initial model (config.seed) as the run's round 0.
  """
  run = storage_lib.RunStorage(storage_root).read_run()
  steps = member_gain.baseline_steps(run, silo_id, config)
  silo_config = member_gain.silo_config(workdir, silo_id)
  if silo_config is None:  # The silo never started: what it would have run with.
    own = overrides + _silo_group_override(config, silo_id)
  else:
    own = config_overrides(silo_config, config_file)
  return [sys.executable, os.path.join(REPO, 'scripts', 'train.py'), f'--config={config_file}',
          *own, f'--config.train.steps={steps}', f'--data_order_of={silo_id}',
          f'--workdir={member_gain.baseline_dir(workdir, silo_id)}'], steps


def train_baselines(config_file: str, overrides: list[str], config, storage_root: str,
                    workdir: str, log=print) -> dict[str, dict]:
  """Trains every silo's isolated baseline, one process at a time; resumes those started.

  Returns silo -> {'workdir', 'steps'}. A finished baseline is not started again.
  """
  run = storage_lib.RunStorage(storage_root).read_run()
  children = _Children(os.path.join(workdir, 'logs'))
  out = {}
  previous_handler = _exit_on_sigterm()
  try:
    for silo_id in protocol.silo_ids(run):
      argv, steps = baseline_command(config_file, overrides, config, storage_root, workdir,
                                     silo_id)
      directory = member_gain.baseline_dir(workdir, silo_id)
      out[silo_id] = {'workdir': directory, 'steps': steps}
      if _baseline_done(directory, steps):
        log(f'baseline {silo_id}: already trained ({steps} steps) in {directory}')
        continue
      log(f'baseline {silo_id}: training alone on its own corpus for {steps} steps (its inner '
          f'steps in the run), in {directory}')
      started = time.monotonic()
      children.start(f'baseline_{silo_id}', argv)
      while not children.check():
        time.sleep(0.5)
      log(f'baseline {silo_id}: done in {time.monotonic() - started:.0f}s')
  finally:
    children.stop()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
  return out


def _baseline_done(directory: str, steps: int) -> bool:
  try:
    return member_gain.checkpoint_step(directory) >= steps
  except errors.UserError:  # No checkpoint yet.
    return False
