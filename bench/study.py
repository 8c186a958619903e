r"""The DiLoCo study: which of the DiLoCo family's claims hold at small scale with fedpt.

Every federated run is a real fedpt federation: `init_run`, one `run_silo` thread
per silo and `run_aggregator`, talking only through a local-directory bucket
(the code behind scripts/init_run.py, train.py --silo and aggregate.py; threads
instead of processes so that one CPU box compiles once). Central baselines are
the plain `Trainer`. Every method spends the same tokens unless the question is
about tokens (K sweep), and every final model is scored by one evaluator on the
same fixed windows of each domain's `val` split and of their union.

Silos hold whole stdlib domains (web, concurrency, text, tools: non-IID). The
other partitions of the same documents are cut by a salted document hash, so the
train/val split of every document is the same in all of them:
  domains4  one domain per silo               domains2  web+concurrency, text+tools
  domains8  each domain halved                iid4      the union dealt into 4 shards
  domains1  all four domains in one silo

Questions 1-6 are the issue's; 7 (outer lr, momentum and rounds) chose the defaults;
8 is the long horizon (does every member gain? isolated silos, data-parallel, FedAvg,
DiLoCo, SCAFFOLD, FedProx, each personalised), with its own --out and --steps; 9 screens
SCAFFOLD's server step, inner lr and H; 10 asks what overlapped rounds (federation.overlap)
and a compressed downlink cost in loss and save in wall-clock time (with --link); 11 what
each upload format (fp32, int8/4/2, top 1% and 3% at 2 bits) costs in held-out loss at equal
tokens, with AdamW and Muon inside, whole-model rounds and P=4 fragments (Streaming DiLoCo);
--muon_probe first tries Muon's lr. --report_only rewrites the tables mid-study.

Results go to --out/results.json after every run, so an interrupted study
resumes where it stopped; --out/study.md and --out/*.png are rewritten from it.
--link=10MB/s,50ms gives each silo thread its own simulated wide-area link to the
bucket (`storage.Link`; the aggregator gets none) and is part of the setup.

  python bench/study.py --out=bench/study   # all 58 runs: ~60 min on 2 CPU cores
  python bench/study.py --out=/tmp/s --seeds=0 --questions=1 --steps=40 --base_h=10
  python bench/study.py --out=bench/study_4k --questions=8 --steps=4000 --base_h=100 \
      --h_values=10,25,100,250 --personal_steps=100   # ~8 h on 2 CPU cores
  python bench/study.py --out=bench/study_overlap --questions=10 --link=10MB/s,50ms
  python bench/study.py --out=bench/study_bytes --questions=11 --steps=64 --base_h=16 \
      --h_values=16 --muon_lrs=0.02   # 52 runs: ~40 min on 2 shared CPU cores
"""
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

from fedpt import aggregator  # noqa: E402
from fedpt import cli  # noqa: E402
from fedpt import config as config_lib  # noqa: E402
from fedpt import data as data_lib  # noqa: E402
from fedpt import errors  # noqa: E402
from fedpt import ledger  # noqa: E402
from fedpt import metrics as metrics_lib  # noqa: E402
from fedpt import model as model_lib  # noqa: E402
from fedpt import personal as personal_lib  # noqa: E402
from fedpt import protocol  # noqa: E402
from fedpt import records  # noqa: E402
from fedpt import silo as silo_lib  # noqa: E402
from fedpt import storage as storage_lib  # noqa: E402
from fedpt import trainer as trainer_lib  # noqa: E402
from fedpt import trees  # noqa: E402

DOMAINS = ('web', 'concurrency', 'text', 'tools')
EVAL_SETS = DOMAINS + ('union',)
COLUMNS = EVAL_SETS + ('domain mean',)  # The union weighs domains by val tokens; this does not.
METRIC = 'domain mean'  # The one number the line plots show.
PARTITIONS = ('domains1', 'domains2', 'domains4', 'domains8', 'iid4')
VAL_FRACTION = 0.1
QUESTIONS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
LONG = 8  # The long-horizon member-gain question: its own --out and --steps.
OVERLAP = 10  # Overlapped rounds and the compressed downlink: wall-clock columns.
BYTES = 11  # Loss against upload bytes: formats x inner optimizer x fragments.
# Question 11's upload formats: (label, compression, topk density); every compressed one with
# error feedback (topk needs it). fp32 first: each row is compared with its fp32 run.
UPLOADS = (('fp32', 'none', None), ('int8', 'int8', None), ('int4', 'int4', None),
           ('int2', 'int2', None), ('top 1% at 2 bits', 'topk', 0.01),
           ('top 3% at 2 bits', 'topk', 0.03))
BYTES_FRAGMENTS = (1, 4)  # Streaming DiLoCo's P: H/P steps and 1/P of the model per round.

config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Model config.', lock_config=True)
flags.DEFINE_string('out', 'bench/study', 'Folder for results.json, study.md and the plots.')
flags.DEFINE_list('seeds', ['0', '1'], 'Seeds (init and data order); tables show mean and spread.')
flags.DEFINE_list('questions', [str(q) for q in QUESTIONS],
                  'Which questions to run: 1-6 from the issue, 7 the outer lr, 8 the long '
                  'horizon, 9 SCAFFOLD\'s step sizes and H, 10 overlapped rounds and the '
                  'compressed downlink, 11 loss against upload bytes (formats, Muon, '
                  'fragments).')
flags.DEFINE_integer('steps', 200, 'S: inner steps per silo (rounds x H) of every federated run.')
flags.DEFINE_integer('base_h', 25, 'H of every run outside the H sweep.')
flags.DEFINE_list('h_values', ['10', '25', '50', '100', '200'], 'Question 2: H values.')
flags.DEFINE_list('k_values', ['1', '2', '4', '8'], 'Question 4: silo counts.')
flags.DEFINE_integer('batch', 8, 'B: per-silo batch; central baselines use K x B.')
flags.DEFINE_integer('seq_len', 128, 'Sequence length of every run.')
flags.DEFINE_float('silo_lr', 6e-3, 'Inner AdamW peak lr at batch B (tuned, see BENCHMARKS.md).')
flags.DEFINE_float('central_lr', 2e-2, 'Peak lr of the central baselines at batch K x B.')
flags.DEFINE_float('adam_lr', 0.1, 'Outer Adam lr (eps 0.1 >> |delta|, so about FedAvg scale).')
flags.DEFINE_float('drop_probability', 0.5, 'Question 6: chance that a delta is lost.')
flags.DEFINE_integer('eval_batches', 32, 'Fixed eval batches (of B windows) per val split.')
flags.DEFINE_integer('personal_steps', 100, 'Question 8: P, personalisation steps per silo; '
                     'isolated silos train S + P steps.')
flags.DEFINE_float('personal_lr', 3e-4, 'Question 8: peak lr of personalisation (fresh AdamW); '
                   'a change rescores saved params, no retraining.')
flags.DEFINE_integer('momentum_warmup', 4, 'Question 8: outer momentum warm-up in rounds.')
flags.DEFINE_float('prox_mu', 0.01, 'Question 8: FedProx mu.')
flags.DEFINE_integer('curve_batches', 4, 'Questions 8 and 10: eval batches per domain of each '
                     'point of the loss curves (the silos\' per-round held-out loss).')
flags.DEFINE_bool('report_only', False, 'Train nothing: write study.md and the plots from the '
                  'runs in results.json so far.')
flags.DEFINE_list('muon_lrs', ['0.02'], 'Question 11: Muon\'s peak lr (inner.muon_lr) of the '
                  'grid, then lrs probed on the first seed alone (int8, P=1).')
flags.DEFINE_multi_string('rows', [], 'Train and report only the rows of this label (as '
                          'study.md prints it; repeat the flag), e.g. a probe at a longer '
                          'horizon.')
flags.DEFINE_bool('muon_probe', False, 'Question 11: train only the Muon lr probes (int8, P=1, '
                  'first seed, every --muon_lrs), to choose the grid\'s lr.')
flags.DEFINE_string('link', None, 'BANDWIDTH,LATENCY, e.g. 10MB/s,50ms: each silo\'s own '
                    'simulated link to the bucket (none: no link). Recorded in the setup.')
FLAGS = flags.FLAGS


class StudyError(errors.UserError, ValueError):
  """Bad study flags or a results file from different flags; the message says the fix."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run; its `key` names it in results.json, so shared runs train once."""
  partition: str  # A PARTITIONS entry, or 'central:union' / 'central:<domain>'.
  seed: int
  inner_steps: int = 0  # H; 0 for central runs.
  optimizer: str = 'diloco'
  compression: str = 'none'
  error_feedback: bool = False
  drop_probability: float = 0.0
  outer_lr: float | None = None  # None: the config's (or --adam_lr for outer Adam).
  outer_momentum: float | None = None
  central_batch: int = 4  # Central runs: batch in units of B (4 = the K silos' tokens per step).
  extra_steps: int = 0  # Central runs: steps beyond S (an isolated silo's personalisation budget).
  silo_order: bool = False  # Central runs on one domain: that silo's data order in the federation.
  drift: str = 'none'  # inner.drift_correction: none, scaffold or fedprox.
  prox_mu: float | None = None
  momentum_warmup: int = 0  # outer.momentum_warmup_rounds.
  inner_lr_scale: float = 1.0  # Federated runs: inner lr = this x --silo_lr.
  overlap: str = 'none'  # federation.overlap: none, delayed or eager.
  downlink: str = 'none'  # federation.downlink_compression.
  topk_density: float = 0.01  # compression='topk': federation.topk_density and topk_bits.
  topk_bits: int = 2
  inner: str = 'adamw'  # inner.optimizer: adamw or muon.
  muon_lr: float | None = None  # inner.muon_lr; None: the config's.
  fragments: int = 1  # federation.fragments (Streaming DiLoCo's P); H stays H.
  ef_decay: float = 1.0  # federation.error_feedback_decay: SparseLoCo's beta.

  def rounds(self, steps: int) -> int:
    """Federated rounds of S = `steps` inner steps: P fragment rounds of H/P steps per H."""
    return steps * self.fragments // self.inner_steps

  @property
  def central(self) -> bool:
    return self.partition.startswith('central:')

  @property
  def key(self) -> str:
    if self.central:
      batch = '' if self.central_batch == 4 else f'/x{self.central_batch}'
      extra = f'/+{self.extra_steps}' if self.extra_steps else ''
      order = '/silo-order' if self.silo_order else ''
      return f'{self.partition}{batch}{extra}{order}/s{self.seed}'
    compression = self.compression
    if compression == 'topk':
      compression += f'{self.topk_density:g}x{self.topk_bits}b'
    parts = [self.partition, f'H{self.inner_steps}', self.optimizer, compression]
    if self.error_feedback:
      parts.append('ef' + ('' if self.ef_decay == 1.0 else f'{self.ef_decay:g}'))
    if self.drop_probability:
      parts.append(f'drop{self.drop_probability:g}')
    if self.outer_lr is not None:
      parts.append(f'lr{self.outer_lr:g}')
    if self.outer_momentum is not None:
      parts.append(f'momentum{self.outer_momentum:g}')
    if self.momentum_warmup:
      parts.append(f'mwarmup{self.momentum_warmup}')
    if self.drift != 'none':
      parts.append(self.drift + ('' if self.prox_mu is None else f'{self.prox_mu:g}'))
    if self.inner_lr_scale != 1.0:
      parts.append(f'innerlrx{self.inner_lr_scale:g}')
    if self.overlap != 'none':
      parts.append(f'overlap-{self.overlap}')
    if self.downlink != 'none':
      parts.append(f'down-{self.downlink}')
    if self.inner != 'adamw':
      parts.append(self.inner + ('' if self.muon_lr is None else f'{self.muon_lr:g}'))
    if self.fragments != 1:
      parts.append(f'P{self.fragments}')
    return '/'.join(parts) + f'/s{self.seed}'


# -- the questions: (row label, run) per seed ------------------------------------------


def plan(questions, seeds, base_h, h_values, k_values, drop_probability, personal_steps=0,
         momentum_warmup=0, prox_mu=0.01, muon_lrs=(0.02,), muon_probe=False) -> dict:
  """{question: [(label, [Run per seed])]}; identical runs share one key.

  Question 8's rows come in priority order (a study stopped early has the core rows
  for every seed): the baselines, then each method at H = base_h, SCAFFOLD at every H
  below it, the H sweep in --h_values order (where does DiLoCo cross FedAvg?), and FedProx
  last (SCAFFOLD already answers drift correction).

  Question 11 runs the grid at `muon_lrs[0]` and the other lrs as one-seed probes; with
  `muon_probe` only the probes (int8, P=1, every lr), which choose the grid's lr. The fp32
  rows at P=4 come last: a study cut short loses them first.
  """
  def fed(label, partition='domains4', **kw):
    kw.setdefault('inner_steps', base_h)
    return label, [Run(partition, s, **kw) for s in seeds]

  def central(label, data, **kw):
    return label, [Run(f'central:{data}', s, **kw) for s in seeds]

  def upload(inner, fragments, label, compression, density, seeds=seeds, muon_lr=None,
             outer='diloco', ef_decay=1.0):
    name = 'AdamW' if inner == 'adamw' else 'Muon'
    kw = dict(compression=compression, error_feedback=compression != 'none', inner=inner,
              fragments=fragments, inner_steps=base_h, optimizer=outer, ef_decay=ef_decay)
    if density is not None:
      kw['topk_density'] = density
    if inner == 'muon':
      kw['muon_lr'] = muon_lrs[0] if muon_lr is None else muon_lr
    return (f'{name}, P={fragments}, {label}' + ('' if muon_lr is None else
                                                  f' (muon_lr {muon_lr:g} probe)') +
            (', FedAvg outer' if outer == 'fedavg' else '') +
            (f', EF decay {ef_decay:g} (SparseLoCo)' if ef_decay != 1.0 else ''),
            [Run('domains4', s, **kw) for s in seeds])

  probes = [upload('muon', 1, 'int8', 'int8', None, seeds[:1], lr)
            for lr in (muon_lrs if muon_probe else muon_lrs[1:])]
  grid = [upload(inner, p, *fmt) for p in BYTES_FRAGMENTS for inner in ('adamw', 'muon')
          for fmt in UPLOADS if p == 1 or fmt[1] != 'none']
  grid += [upload(inner, p, *UPLOADS[0]) for p in BYTES_FRAGMENTS[1:]
           for inner in ('adamw', 'muon')]
  # SparseLoCo's error feedback replaces the outer momentum: top 1% under outer SGD, lr 1.
  grid += [upload('adamw', 1, *fmt, outer='fedavg') for fmt in (UPLOADS[0], UPLOADS[4])]
  # SparseLoCo's full recipe: the residual decays by beta = 0.95 (Algorithm 1).
  grid += [upload('adamw', p, *UPLOADS[4], outer='fedavg', ef_decay=0.95)
           for p in BYTES_FRAGMENTS]
  table = {
      1: [fed('DiLoCo (Nesterov 0.7, 0.9)'), fed('FedAvg (outer SGD, lr 1)', optimizer='fedavg'),
          fed('outer Adam', optimizer='fedadam'),
          central('data-parallel, K x B batch', 'union')] +
         [central(f'{d} alone, K x B batch', d) for d in DOMAINS],
      2: [fed(f'H={h}', inner_steps=h) for h in h_values],
      3: [fed('none (fp32)'), fed('bf16', compression='bf16'), fed('int8', compression='int8'),
          fed('int4', compression='int4'),
          fed('int4 + error feedback', compression='int4', error_feedback=True)],
      4: [fed(f'K={k}', partition=f'domains{k}') for k in k_values] +
         [central('plain training on the union, batch B (K=1, no outer step)', 'union',
                  central_batch=1)],
      5: [fed('non-IID (one domain per silo)'), fed('IID (union dealt into 4)', partition='iid4'),
          central('data-parallel, K x B batch', 'union')],
      6: [fed('every delta arrives'),
          fed(f'{drop_probability:.0%} of deltas dropped', drop_probability=drop_probability),
          fed('FedAvg, every delta arrives', optimizer='fedavg'),
          fed(f'FedAvg, {drop_probability:.0%} of deltas dropped', optimizer='fedavg',
              drop_probability=drop_probability)],
      7: [fed('Nesterov lr 0.3, momentum 0.9', outer_lr=0.3),
          fed('Nesterov lr 0.7, momentum 0.9 (DiLoCo)'),
          fed('Nesterov lr 1.0, momentum 0.9', outer_lr=1.0),
          fed('Nesterov lr 0.7, momentum 0.5', outer_momentum=0.5),
          fed('SGD lr 1.0, no momentum (FedAvg)', optimizer='fedavg'),
          fed('DiLoCo, H=10 (20 rounds)', inner_steps=10),
          fed('FedAvg, H=10 (20 rounds)', inner_steps=10, optimizer='fedavg'),
          fed('DiLoCo, H=5 (40 rounds)', inner_steps=5),
          fed('FedAvg, H=5 (40 rounds)', inner_steps=5, optimizer='fedavg')],
      # The isolated silos (one silo's compute each) before data-parallel (K silos' in one
      # run, the longest): a session cut short still leaves whole runs behind.
      LONG: [central(f'{d} alone, batch B, S + P steps', d, central_batch=1,
                     extra_steps=personal_steps, silo_order=True) for d in DOMAINS] +
            [central('data-parallel, K x B batch', 'union')] +
            [fed(f'FedAvg, H={base_h}', optimizer='fedavg'), fed(f'DiLoCo, H={base_h}'),
             fed(f'SCAFFOLD (FedAvg outer), H={base_h}', optimizer='fedavg', drift='scaffold')] +
            [fed(f'SCAFFOLD (FedAvg outer), H={h}', inner_steps=h, optimizer='fedavg',
                 drift='scaffold') for h in sorted(h_values, reverse=True) if h < base_h] +
            [fed(f'DiLoCo, momentum warm-up {momentum_warmup} rounds, H={base_h}',
                 momentum_warmup=momentum_warmup)] +
            [fed(f'{name}, H={h}', inner_steps=h, optimizer=opt)
             for h in h_values if h != base_h
             for name, opt in (('FedAvg', 'fedavg'), ('DiLoCo', 'diloco'))] +
            [fed(f'FedProx mu={prox_mu:g} (FedAvg outer), H={base_h}', optimizer='fedavg',
                 drift='fedprox', prox_mu=prox_mu)],
      # Does SCAFFOLD want a larger server step (averaging K AdamW walks shrinks the step),
      # a larger inner lr, or more rounds? FedOpt's server SGD, Reddi et al. arXiv 2003.00295.
      9: [central('data-parallel, K x B batch', 'union'),
          fed(f'SCAFFOLD, H={base_h} (FedAvg outer)', optimizer='fedavg', drift='scaffold')] +
         [fed(f'SCAFFOLD, H={base_h}, outer SGD lr {lr:g}', optimizer='sgd', outer_lr=lr,
              outer_momentum=0.0, drift='scaffold') for lr in (0.7, 2.0)] +
         [fed(f'SCAFFOLD, H={base_h}, inner lr 2x', optimizer='fedavg', drift='scaffold',
              inner_lr_scale=2.0),
          *[fed(f'SCAFFOLD, H={h} (FedAvg outer)', inner_steps=h, optimizer='fedavg',
                drift='scaffold') for h in sorted(h_values)[:1] if h < base_h]],
      # arXiv 2502.12996: does training round r from global r-1 (overlap) cost quality, and
      # does a quantised global update? Each against its sync run (same optimizer and seed).
      OVERLAP: [fed(f'{name}, overlap {mode}', optimizer=opt, overlap=mode)
                for name, opt in (('FedAvg', 'fedavg'), ('DiLoCo', 'diloco'))
                for mode in config_lib.OVERLAP_MODES] +
               [fed(f'DiLoCo, {fmt} downlink', downlink=fmt) for fmt in ('int8', 'int4')],
      # SparseLoCo (arXiv 2508.15706) and MuLoCo (arXiv 2505.23725) at equal tokens.
      BYTES: probes if muon_probe else grid + probes,
  }
  return {q: table[q] for q in questions}


def check_flags(steps, base_h, h_values, k_values, questions, muon_lrs=(0.02,)):
  for h in {base_h, *h_values}:
    if h <= 0 or steps % h:
      raise StudyError(f'H={h} does not divide --steps={steps}: every run must spend the same '
                       'tokens. Fix: choose H values that divide --steps')
  p = max(BYTES_FRAGMENTS)
  if BYTES in questions and base_h % p:
    raise StudyError(f'--base_h={base_h} is not a multiple of P={p}: question {BYTES} trains '
                     f'fragment rounds of H/{p} steps. Fix: use --base_h a multiple of {p}, '
                     'e.g. 20')
  if not muon_lrs or any(not lr > 0 for lr in muon_lrs):
    raise StudyError(f'--muon_lrs={",".join(map(str, muon_lrs))} needs positive lrs. Fix: '
                     'e.g. --muon_lrs=0.02,0.01,0.05')
  for k in k_values:
    if f'domains{k}' not in PARTITIONS:
      raise StudyError(f'K={k} has no non-IID partition of the 4 domains. Fix: use --k_values '
                       'from 1, 2, 4, 8')
  for q in questions:
    if q not in QUESTIONS:
      raise StudyError(f'question {q} does not exist. Fix: use --questions from {QUESTIONS}')


# -- corpora ----------------------------------------------------------------------------


def _bucket_of(document: str, buckets: int) -> int:
  """Salted, so the cut is independent of prepare_data's train/val hash."""
  digest = hashlib.sha256(b'fedpt-study\0' + document.encode('utf-8', 'replace')).digest()
  return int.from_bytes(digest[:8], 'little') % buckets


def _cached_corpus(name: str, documents) -> str:
  """Tokenised once, like the built-in stdlib groups, but holding out 10% of documents.

  The built-in groups hold out 2%, one document of web. The split is by document hash,
  so every partition holds out the same documents.
  """
  return data_lib.cached_stdlib_corpus(f'study-val{VAL_FRACTION:g}-{name}', documents,
                                       f'stdlib, fedpt study split {name!r}',
                                       val_fraction=VAL_FRACTION)


def silo_corpora(partition: str) -> dict:
  """{silo id: prepared corpus dir} of one partition of the four domains."""
  docs = {d: (lambda d=d: data_lib.stdlib_documents(d)) for d in DOMAINS}

  def union():
    return [doc for d in DOMAINS for doc in docs[d]()]
  if partition == 'domains4':
    return {d: _cached_corpus(d, docs[d]) for d in DOMAINS}
  if partition == 'domains1':
    return {'all': _cached_corpus('union', union)}
  if partition == 'domains2':
    pairs = (DOMAINS[:2], DOMAINS[2:])
    return {'-'.join(p): _cached_corpus('-'.join(p), lambda p=p: [x for d in p for x in docs[d]()])
            for p in pairs}
  if partition == 'domains8':
    return {f'{d}-{half}': _cached_corpus(f'{d}-{half}', lambda d=d, i=i: [
        x for x in docs[d]() if _bucket_of(x, 2) == i]) for d in DOMAINS for i, half in
            enumerate('ab')}
  if partition == 'iid4':
    return {f'iid{i}': _cached_corpus(f'iid4-{i}', lambda i=i: [
        x for x in union() if _bucket_of(x, 4) == i]) for i in range(4)}
  raise StudyError(f'unknown partition {partition!r}; use one of {PARTITIONS}')


def central_corpus(data: str) -> str:
  return silo_corpora('domains1')['all'] if data == 'union' else silo_corpora('domains4')[data]


def eval_corpora() -> dict:
  """{eval set: corpus dir whose val split scores every model}."""
  return {**silo_corpora('domains4'), 'union': central_corpus('union')}


# -- training -----------------------------------------------------------------------------


def _with(config, **data):
  c = config.copy_and_resolve_references()
  c.data.update(**data)
  return c


class _RoundClock:
  """When each global round became available: seconds since the silos started, per round.

  A light thread polls the bucket (by it: no link); the garbage collector deletes old rounds,
  so their files cannot tell afterwards. A round committed between two polls gets the later.
  """

  def __init__(self, root: str, poll_s: float = 0.05):
    with storage_lib.party_link(None):
      self.store = storage_lib.RunStorage(root)
    self.start = time.monotonic()
    self.seconds, self.error = [], None
    self.done = threading.Event()
    self.thread = threading.Thread(target=self._poll, args=(poll_s,), daemon=True)
    self.thread.start()

  def _look(self):
    newest = self.store.latest_global_round()
    now = time.monotonic() - self.start
    while newest is not None and len(self.seconds) <= newest:
      self.seconds.append(now)

  def _poll(self, poll_s):
    try:
      while not self.done.wait(poll_s):
        self._look()
    except BaseException as e:  # pylint: disable=broad-except
      self.error = e

  def stop(self):
    self.done.set()
    self.thread.join()
    if self.error:  # Times taken after it stopped would be wrong.
      raise self.error
    self._look()  # The final round, even if it came after the last poll.


def run_federated(config, run: Run, steps: int, adam_lr: float, link: str | None = None) -> dict:
  """One federation of silo threads and the aggregator; the final global params and costs.

  `link`: each silo's own simulated link to the bucket (`storage.Link`), none for the
  aggregator, which sits by the bucket.
  """
  corpora = silo_corpora(run.partition)
  config = config.copy_and_resolve_references()
  config.seed = run.seed
  config.federation.update(
      silos=tuple(corpora), rounds=run.rounds(steps),
      inner_steps=run.inner_steps, compression=run.compression,
      error_feedback=run.error_feedback, drop_probability=run.drop_probability,
      overlap=run.overlap, downlink_compression=run.downlink)
  if run.fragments != 1:  # Set only when asked: older fedpts have no such fields.
    config.federation.fragments = run.fragments
  if run.compression == 'topk':
    config.federation.update(topk_density=run.topk_density, topk_bits=run.topk_bits)
  if run.ef_decay != 1.0:
    config.federation.error_feedback_decay = run.ef_decay
  if run.inner != 'adamw':
    config.inner.optimizer = run.inner
    if run.muon_lr is not None:
      config.inner.muon_lr = run.muon_lr
  config.outer.optimizer = run.optimizer
  config.inner.lr *= run.inner_lr_scale
  if run.optimizer == 'fedadam':
    config.outer.lr = adam_lr
  if run.outer_lr is not None:
    config.outer.lr = run.outer_lr
  if run.outer_momentum is not None:
    config.outer.momentum = run.outer_momentum
  if run.momentum_warmup:
    config.outer.momentum_warmup_rounds = run.momentum_warmup
  if run.drift != 'none':
    config.inner.drift_correction = run.drift
    if run.prox_mu is not None:
      config.inner.prox_mu = run.prox_mu
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, 'bucket')
    aggregator.init_run(_with(config, corpus=next(iter(corpora.values()))), root,
                        run_id=run.key.replace('/', '.'))
    results, errors = {}, {}

    def work(silo_id, corpus):
      try:
        with storage_lib.party_link(storage_lib.Link.parse(link)):
          results[silo_id] = silo_lib.run_silo(_with(config, corpus=corpus), silo_id, root,
                                               os.path.join(tmp, silo_id))
      except BaseException as e:  # pylint: disable=broad-except
        errors[silo_id] = e

    threads = [threading.Thread(target=work, args=item, daemon=True) for item in corpora.items()]
    clock = _RoundClock(root)
    for t in threads:
      t.start()
    try:
      with storage_lib.party_link(None):  # By the bucket, whatever FEDPT_LINK says.
        aggregator.run_aggregator(root)
    finally:
      for t in threads:
        t.join()
      clock.stop()
    if errors:
      raise next(iter(errors.values()))
    store = storage_lib.RunStorage(root)
    manifests = [store.read_manifest(r) for r in range(config.federation.rounds)]
    record = store.read_run()
    # Each silo's held-out loss of every global round on its own domain (the curves).
    curve = [[r * run.inner_steps // run.fragments, ledger.eval_losses(store, record, r)]
             for r in range(config.federation.rounds + 1)]
  first = results[next(iter(corpora))]
  return {
      'curve': curve,
      'round_seconds': clock.seconds,
      # What each silo read for each round's base (the update, with a compressed downlink).
      'bytes_down_by_round': [max(results[s]['rounds'][i]['bytes_down'] for s in corpora)
                              for i in range(config.federation.rounds)],
      'params': first['state']['params'],
      'rounds': config.federation.rounds,
      'bytes_up': max(sum(r['bytes'] for r in results[s]['rounds']) for s in corpora),
      'peak_bytes_up': max(r['bytes'] for s in corpora for r in results[s]['rounds']),
      'deltas_dropped': sum('dropped at random' in e['reason']
                            for m in manifests for e in m['rejected']),
      'deltas_total': sum(len(m['included']) + len(m['rejected']) for m in manifests),
      'train_loss_by_round': [float(np.mean([e['train_loss'] for e in m['included']]))
                              if m['included'] else None for m in manifests],
  }


def run_central(config, run: Run, steps: int, batch: int, central_lr: float,
                curve_eval=None, curve_points: int = 0) -> dict:
  """Plain training for S (+ extra) steps; at K x B batches it spends the K silos' tokens.

  With `silo_order` a domain's run sees its silo's batches in the federation's order
  (the isolated baseline of question 8). `curve_eval` scores `curve_points` points.
  """
  domain = run.partition.split(':', 1)[1]
  config = _with(config, corpus=central_corpus(domain), global_batch=run.central_batch * batch)
  config.seed = run.seed
  if run.central_batch > 1:  # Batch B keeps the silos' lr, tuned at B.
    config.inner.lr = central_lr
  total = steps + run.extra_steps
  config.train.steps = total
  data_seed = protocol.silo_data_seed(run.seed, domain) if run.silo_order else None
  trainer = trainer_lib.Trainer(config, data_seed=data_seed)
  state = trainer.init_state()
  every = max(total // curve_points, 1) if curve_points else 0
  curve = []
  for step in range(total):
    if every and step % every == 0:
      curve.append([step, curve_eval(state['params'])])
    state, metrics = trainer.train_step(state, trainer.batch(step))
  loss = float(metrics['train_loss'])
  if not math.isfinite(loss):
    raise trainer_lib.TrainingDivergedError(f'final train loss {loss}')
  if every:
    curve.append([total, curve_eval(state['params'])])
  return {'params': state['params'], 'rounds': 0, 'bytes_up': None, 'curve': curve}


def personalise(config, params, domain: str, seed: int, start_step: int, steps: int,
                lr: float):
  """Fine-tunes `params` on one domain's silo data for `steps` steps (`fedpt.personal`).

  The batches continue the silo's data order after its `start_step` federated steps,
  as a silo's personalisation phase does; a fresh AdamW with a short warm-up.
  """
  config = _with(config, corpus=central_corpus(domain))
  config.seed = seed
  config.personal.update(steps=steps, lr=lr, warmup_steps=min(10, steps // 4))
  trainer = personal_lib.phase_trainer(config, protocol.silo_data_seed(seed, domain))
  state = personal_lib.start_state(trainer, params)
  for step in range(steps):
    state, _ = trainer.train_step(state, trainer.batch(start_step + step))
  return state['params']


class Evaluator:
  """One Trainer that scores any params on fixed windows of every domain and the union."""

  def __init__(self, config, eval_batches: int, names=EVAL_SETS):
    corpora = {n: c for n, c in eval_corpora().items() if n in names}
    config = _with(config, corpus=eval_corpora()['union'])
    config.train.eval_batches = eval_batches
    self.trainer = trainer_lib.Trainer(config)
    self.vals = {name: data_lib.TokenDataset(corpus, 'val', self.trainer.tokenizer_sha256)
                 for name, corpus in corpora.items()}
    self.param_bytes = 4 * model_lib.param_count(self.trainer.model_config)

  def __call__(self, params) -> dict:
    return {name: self.trainer.evaluate(params, dataset=val) for name, val in self.vals.items()}


# -- results: resumable JSON, then pure summaries ------------------------------------------


def load_results(path: str, setup: dict) -> dict:
  if not os.path.exists(path):
    return {'setup': setup, 'runs': {}}
  with open(path) as f:
    results = json.load(f)
  # Runs from before personal_lr left the setup: each records the lr it was personalised at.
  legacy_lr = results.get('setup', {}).get('long', {}).pop('personal_lr', None)
  for record in results.get('runs', {}).values():
    if isinstance(record, dict) and 'personal' in record:
      record.setdefault('personal_lr', legacy_lr)
  if results.get('setup') != setup:
    diff = sorted(k for k in set(setup) | set(results.get('setup', {}))
                  if setup.get(k) != results.get('setup', {}).get(k))
    raise StudyError(f'{path} holds runs made with other settings ({", ".join(diff)}). Fix: '
                     'rerun with the same flags to resume it, or use another --out')
  return results


def save_results(path: str, results: dict) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(results, f, indent=1, sort_keys=True)
  os.replace(tmp, path)  # A kill mid-write never loses the runs already done.


def _domain_mean(losses: dict) -> float:
  """The unweighted mean over the four domains ('domain mean'; the union weighs by tokens)."""
  return float(np.mean([losses[d] for d in DOMAINS]))


def spread(values) -> tuple[float, float]:
  """Mean and half the range: with 2 seeds, each seed lies at mean +- spread."""
  values = np.asarray(values, np.float64)
  return float(values.mean()), float((values.max() - values.min()) / 2)


def summarise(questions: dict, runs: dict) -> dict:
  """{question: [row]}: each row's mean +- spread over seeds of every metric."""
  out = {}
  for q, rows in questions.items():
    out[q] = []
    for label, seeded in rows:
      done = [runs[r.key] for r in seeded if r.key in runs]
      if not done:
        continue
      row = {'label': label, 'seeds': len(done), 'run': seeded[0],
             'diverged': sum(bool(d.get('diverged')) for d in done)}
      finite = [d for d in done if not d.get('diverged')]
      for name in EVAL_SETS:
        row[name] = spread([d['losses'][name] for d in finite]) if finite else None
      row['domain mean'] = spread([_domain_mean(d['losses']) for d in finite]) if finite else None
      row['bytes_up'] = done[0]['bytes_up']
      row['bytes_down'] = done[0]['bytes_down']
      row['peak_bytes_up'] = done[0].get('peak_bytes_up')  # The largest one exchange.
      row['by_seed'] = {r.seed: _domain_mean(runs[r.key]['losses']) for r in seeded
                        if r.key in runs and not runs[r.key].get('diverged')}
      row['rounds'] = done[0]['rounds']
      row['seconds'] = float(np.mean([d['seconds'] for d in done]))
      row['dropped'] = (sum(d.get('deltas_dropped', 0) for d in done),
                        sum(d.get('deltas_total', 0) for d in done))
      if q == OVERLAP:
        row.update(overlap_cells(seeded, runs))
      out[q].append(row)
    if q == BYTES:
      upload_cells(out[q])
  return out


def _gap(row, reference) -> float | None:
  """row's domain mean / reference's - 1, over the seeds both have finished."""
  seeds = sorted(set(row['by_seed']) & set(reference['by_seed']))
  if not seeds:
    return None
  return float(np.mean([row['by_seed'][s] for s in seeds]) /
               np.mean([reference['by_seed'][s] for s in seeds]) - 1)


def upload_cells(rows) -> None:
  """Question 11's comparisons, added to each row: 'vs_fp32', its domain mean against the fp32
  row of the same inner optimizer (and lr) and P; 'vs_best', against the best fp32 row;
  'fewer', fp32's upload bytes per run (P=1) / its own."""
  fp32 = {dataclasses.replace(r['run'], seed=0, fragments=1).key: r for r in rows
          if r['run'].compression == 'none' and r['run'].fragments == 1}
  own = {dataclasses.replace(r['run'], seed=0).key: r for r in rows
         if r['run'].compression == 'none'}
  finite = [r for r in fp32.values() if r[METRIC] is not None]
  best = min(finite, key=lambda r: r[METRIC][0], default=None)
  for r in rows:
    plain = dataclasses.replace(r['run'], seed=0, compression='none', error_feedback=False,
                                topk_density=Run.topk_density, topk_bits=Run.topk_bits)
    ref = own.get(plain.key)
    base = fp32.get(dataclasses.replace(plain, fragments=1).key)
    r['vs_fp32'] = _gap(r, ref) if ref else None
    r['vs_best'] = (_gap(r, best), best['label']) if best else (None, None)
    r['fewer'] = (base['bytes_up'] / r['bytes_up']
                  if base and base['bytes_up'] and r['bytes_up'] else None)


def upload_target(rows, fewer: float = 100.0, within: float = 0.01) -> str:
  """Issue 20's target in one sentence: which rows upload >= `fewer` x fewer bytes than fp32
  with a domain mean within `within` of their own fp32 row's, or how close the best comes."""
  small = [r for r in rows if r['fewer'] and r['fewer'] >= fewer and r['vs_fp32'] is not None]
  if not small:
    return f'No finished row uploads >= {fewer:g}x fewer bytes than fp32 yet.'

  def cell(r):
    best = r['vs_best'][0]
    return (f"{r['label']} ({r['fewer']:.0f}x fewer bytes, {r['vs_fp32'] * 100:+.1f}% vs its "
            f"fp32" + ('' if best is None else f', {best * 100:+.1f}% vs the best fp32 row') +
            ')')
  met = [r for r in small if r['vs_fp32'] <= within]
  if met:
    return (f'Target (>= {fewer:g}x fewer upload bytes, within {within:.0%} of fp32): met by ' +
            '; '.join(cell(r) for r in met) + '.')
  closest = min(small, key=lambda r: r['vs_fp32'])
  return (f'Target (>= {fewer:g}x fewer upload bytes, within {within:.0%} of fp32): not met. '
          f'Closest: {cell(closest)}.')


def round_losses(curve) -> list:
  """Each global round's held-out loss: the mean over silos of their own split's (domains4:
  the domain mean), None for a round not every silo scored (an overlapped run's last but one)."""
  silos = max(len(losses) for _, losses in curve)
  return [float(np.mean(list(losses.values()))) if len(losses) == silos else None
          for _, losses in curve]


def time_to_target(losses, seconds, target: float) -> float | None:
  """When the first global round whose loss is <= `target` became available; None: never."""
  return next((t for loss, t in zip(losses, seconds) if loss is not None and loss <= target),
              None)


def overlap_cells(seeded, runs) -> dict:
  """Question 10's columns of one row, mean +- spread over its finished seeds.

  'final_s': seconds until the final global round; 'target_s': (seconds until the first round
  at or below the final per-round loss of the sync run with the same optimizer and seed,
  seeds that got there, seeds with a sync run); 'down': bytes a silo read per round after
  round 0 (which reads the initial model whole); 'curve': seed one's (seconds, loss) points.
  """
  done = [(r, runs[r.key]) for r in seeded
          if 'round_seconds' in runs.get(r.key, {}) and not runs[r.key].get('diverged')]
  if not done:
    return {'final_s': None, 'target_s': (None, 0, 0), 'round_loss': None, 'down': None,
            'curve': None}
  reached, synced = [], 0
  for r, rec in done:
    sync = runs.get(dataclasses.replace(r, overlap='none', downlink='none').key, {})
    if 'curve' in sync and not sync.get('diverged'):
      synced += 1
      t = time_to_target(round_losses(rec['curve']), rec['round_seconds'],
                         round_losses(sync['curve'])[-1])
      if t is not None:
        reached.append(t)
  first = done[0][1]
  return {
      'final_s': spread([rec['round_seconds'][-1] for _, rec in done]),
      'target_s': (spread(reached) if reached else None, len(reached), synced),
      'round_loss': spread([round_losses(rec['curve'])[-1] for _, rec in done]),
      'down': float(np.mean([np.mean(rec['bytes_down_by_round'][1:] or
                                     rec['bytes_down_by_round']) for _, rec in done])),
      'curve': [(t, loss) for t, loss in zip(first['round_seconds'],
                                             round_losses(first['curve'])) if loss is not None],
  }


def _loss(cell) -> str:
  return 'diverged' if cell is None else f'{cell[0]:.3f} ± {cell[1]:.3f}'


def _mb(n) -> str:
  return '-' if n is None else f'{n / 1e6:,.1f}'


TITLES = {
    1: 'DiLoCo against FedAvg, outer Adam, each silo alone and data-parallel (same tokens)',
    2: 'H sweep: loss against communication (same tokens)',
    3: 'Compression of the pseudo-gradients: loss against bytes',
    4: 'K sweep at fixed tokens per silo',
    5: 'IID against non-IID shards',
    6: 'Deltas dropped at random',
    7: 'Outer lr, momentum and number of rounds (for the defaults)',
    8: 'Long horizon: methods against data-parallel and isolated silos (same tokens)',
    9: 'SCAFFOLD: server step, inner lr and H (same tokens)',
    10: 'Do overlapped rounds and a compressed downlink cost quality?',
    11: 'Loss against upload bytes: formats, AdamW and Muon, P=1 and P=4 (same tokens)',
}


def markdown(summary: dict, setup: dict) -> str:
  lines = [f'Setup: {json.dumps(setup, sort_keys=True)}', '',
           'Held-out loss, mean ± half-range over seeds (each seed at mean ± spread). '
           '"up"/"down": MB a silo uploads (its deltas) / downloads (fp32 global models); '
           'data-parallel counts one fp32 gradient up and one down per step.', '']
  for q, rows in summary.items():
    if q == OVERLAP:
      lines += overlap_markdown(rows)
      continue
    if q == BYTES:
      lines += upload_markdown(rows)
      continue
    lines += [f'### Question {q}: {TITLES[q]}', '',
              '| run | seeds | ' + ' | '.join(COLUMNS) + ' | rounds | up MB | down MB | s |',
              '|---|---:|' + '---:|' * len(COLUMNS) + '---:|---:|---:|---:|']
    for r in rows:
      label = r['label'] + (f' ({r["diverged"]} diverged)' if r['diverged'] else '')
      if r['run'].drop_probability:
        label += f' ({r["dropped"][0]}/{r["dropped"][1]} lost)'
      lines.append(f'| {label} | {r["seeds"]} | ' + ' | '.join(_loss(r[n]) for n in COLUMNS) +
                   f' | {r["rounds"] or "-"} | {_mb(r["bytes_up"])} | {_mb(r["bytes_down"])} '
                   f'| {r["seconds"]:.0f} |')
    lines.append('')
  return '\n'.join(lines)


def _kb(n) -> str:
  return '-' if n is None else f'{n / 1e3:,.1f}'


def upload_markdown(rows) -> list[str]:
  """Question 11's table: losses, the gap to fp32, bytes per run and per exchange."""
  def pct(x):
    return '-' if x is None else f'{x * 100:+.1f}%'
  best = next((r['vs_best'][1] for r in rows if r['vs_best'][1]), '-')
  lines = [f'### Question {BYTES}: {TITLES[BYTES]}', '',
           'Every compressed format uses error feedback (topk requires it: what is not sent '
           'stays in the residual); top-k keeps that share of each chunk of '
           '`federation.topk_chunk` values at 2 bits. P=4: Streaming DiLoCo, 4x the rounds of '
           'H/4 steps, each moving one fragment (1/4 of the rows), so the same tokens and about '
           'the same bytes per run at a quarter of the peak. "vs fp32": domain mean against '
           f'the fp32 row of the same inner optimizer and P; "vs best fp32": against {best}. '
           '"up KB": what a silo uploads over the run; "fp32 / up": fp32\'s upload (P=1) over '
           'the row\'s; "peak KB": the largest one delta.', '']
  return lines + _loss_table(
      rows, ('vs fp32', 'vs best fp32', 'rounds', 'up KB', 'fp32 / up', 'peak KB', 's'),
      lambda r: (pct(r['vs_fp32']), pct(r['vs_best'][0]), r['rounds'] or '-',
                 _kb(r['bytes_up']), '-' if r['fewer'] is None else f'{r["fewer"]:.1f}x',
                 _kb(r['peak_bytes_up']), f'{r["seconds"]:.0f}')) + [
      '', upload_target(rows), '']


def _loss_table(rows, extra, cells) -> list[str]:
  """A question's table: label, seeds, the loss columns, then `extra` filled by `cells(row)`."""
  lines = ['| run | seeds | ' + ' | '.join(list(COLUMNS) + list(extra)) + ' |',
           '|---|---:|' + '---:|' * (len(COLUMNS) + len(extra))]
  for r in rows:
    label = r['label'] + (f' ({r["diverged"]} diverged)' if r['diverged'] else '')
    lines.append(f'| {label} | {r["seeds"]} | ' + ' | '.join(
        [_loss(r[n]) for n in COLUMNS] + [str(c) for c in cells(r)]) + ' |')
  return lines


def overlap_markdown(rows) -> list[str]:
  """Question 10's table: the final losses, then wall-clock seconds and bytes down."""
  def seconds(cell):
    return '-' if cell is None else f'{cell[0]:.0f} ± {cell[1]:.0f}'

  def target(cell):
    value, reached, synced = cell
    if not synced:
      return '-'
    if not reached:
      return f'not reached (0/{synced})'
    return seconds(value) + ('' if reached == synced else f' ({reached}/{synced} seeds)')
  lines = [f'### Question {OVERLAP}: {TITLES[OVERLAP]}', '',
           '"round loss": the final global model\'s per-round held-out loss, the mean over the '
           'silos of each one\'s own split (the curve the silos publish, 1 round = H steps). '
           '"s to final": wall-clock seconds from the silos\' start until the final global '
           'round was committed; "s to sync loss": until the first global round whose round '
           'loss is at or below the final round loss of the overlap-none run with the same '
           'outer optimizer and seed. "down MB/round": what a silo read for one round\'s base '
           '(rounds after the first; the update with a compressed downlink).', '']
  return lines + _loss_table(
      rows, ('rounds', 'round loss', 's to final', 's to sync loss', 'down MB/round', 'up MB'),
      lambda r: (r['rounds'] or '-', _loss(r['round_loss']) if r['round_loss'] else '-',
                 seconds(r['final_s']), target(r['target_s']),
                 '-' if r['down'] is None else f'{r["down"] / 1e6:.2f}',
                 _mb(r['bytes_up']))) + ['']


def plot(summary: dict, out_dir: str) -> list[str]:
  """One PNG per question that has rows; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  written = []
  for q, rows in summary.items():
    rows = [r for r in rows if r[METRIC] is not None]
    if not rows or q == LONG:  # Question 8 has its own plots (plot_curves).
      continue
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if q == BYTES:  # Loss against bytes uploaded, log x: colour the optimizer, mark P.
      for r in rows:
        run = r['run']
        colour = 'tab:blue' if run.inner == 'adamw' else 'tab:orange'
        probe = run.muon_lr is not None and any(
            o['run'].inner == 'muon' and o['run'].muon_lr != run.muon_lr and o['seeds'] > r['seeds']
            for o in rows)
        ax.errorbar(r['bytes_up'], r[METRIC][0], yerr=r[METRIC][1], capsize=3, color=colour,
                    fmt='o' if run.fragments == 1 else 's', mfc='none' if probe else colour)
        if run.fragments == 1:  # P=4's squares sit at about the same bytes: one label.
          ax.annotate(r['label'].split(', ', 2)[-1], (r['bytes_up'], r[METRIC][0]),
                      textcoords='offset points', xytext=(4, 3), fontsize=6, color=colour)
      for label, fmt in (('AdamW', 'tab:blue'), ('Muon', 'tab:orange')):
        ax.plot([], [], 'o', color=fmt, label=label)
      ax.plot([], [], 'ko', label='P=1')
      ax.plot([], [], 'ks', label='P=4 (fragments)')
      fp32 = [r for r in rows if r['run'].compression == 'none' and r['run'].fragments == 1]
      if fp32:
        best = min(r[METRIC][0] for r in fp32)
        ax.axhline(best * 1.01, color='gray', linestyle='--', linewidth=1,
                   label='best fp32 + 1%')
      ax.legend(fontsize=7)
      ax.set_xscale('log')
      ax.set_xlabel('bytes uploaded per silo per run')
    elif q in (2, 3):  # Loss against bytes uploaded, log x.
      for r in rows:
        ax.errorbar(r['bytes_up'] or 0, r[METRIC][0], yerr=r[METRIC][1], fmt='o', capsize=3)
        ax.annotate(r['label'], (r['bytes_up'] or 0, r[METRIC][0]), textcoords='offset points',
                    xytext=(5, 5), fontsize=8)
      ax.set_xscale('log')
      ax.set_xlabel('bytes uploaded per silo')
    elif q == 4:
      sweep = [r for r in rows if not r['run'].central]
      ks = [int(r['run'].partition[len('domains'):]) for r in sweep]
      ax.errorbar(ks, [r[METRIC][0] for r in sweep], yerr=[r[METRIC][1] for r in sweep],
                  marker='o', capsize=3, label='DiLoCo, S steps per silo')
      for r in rows:
        if r['run'].central:
          ax.axhline(r[METRIC][0], color='gray', linestyle='--', label=r['label'])
      ax.legend(fontsize=7)
      ax.set_xscale('log', base=2)
      ax.set_xticks(ks, [str(k) for k in ks])
      ax.set_xlabel('silos K (each S steps at batch B)')
    elif q == OVERLAP:  # Round loss against wall-clock seconds, the first seed of each row.
      for r in rows:
        if r['curve']:
          t, loss = zip(*r['curve'])
          ax.plot(t, loss, '--' if r['run'].optimizer == 'fedavg' else '-', marker='.',
                  label=r['label'])
      ax.legend(fontsize=7)
      ax.set_xlabel('wall-clock seconds (global round committed)')
    elif q in (7, 9):  # One bar per setting: too many rows to group by eval set.
      y = np.arange(len(rows))
      ax.barh(y, [r[METRIC][0] for r in rows], xerr=[r[METRIC][1] for r in rows], capsize=3)
      ax.set_yticks(y, [r['label'] for r in rows], fontsize=8)
      ax.invert_yaxis()
      ax.set_xlim(min(r[METRIC][0] - r[METRIC][1] for r in rows) - 0.1,
                  max(r[METRIC][0] + r[METRIC][1] for r in rows) + 0.05)
      ax.set_xlabel(f'held-out loss ({METRIC})')
    else:  # Grouped bars: every eval set per run.
      width = 0.8 / len(rows)
      x = np.arange(len(COLUMNS))
      for i, r in enumerate(rows):
        means = [r[n][0] for n in COLUMNS]
        errs = [r[n][1] for n in COLUMNS]
        ax.bar(x + i * width, means, width, yerr=errs, capsize=2, label=r['label'])
      ax.set_xticks(x + width * (len(rows) - 1) / 2, COLUMNS, fontsize=8)
      lows = [r[n][0] for r in rows for n in COLUMNS]
      ax.set_ylim(min(lows) - 0.3, max(lows) + 0.3)
      ax.legend(fontsize=7)
    if q == OVERLAP:
      ax.set_ylabel('round loss (mean of the silos\' own splits)')
    elif q != 7:
      ax.set_ylabel('held-out loss' + (f' ({METRIC})' if q in (2, 3, 4, BYTES) else ''))
    ax.set_title(f'Q{q}: {TITLES[q]}', fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, f'q{q}.png')
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
  return written


# -- question 8: does every member gain? ------------------------------------------------------


def _isolated(rows, runs) -> dict:
  """{(domain, seed): own-domain loss of that silo trained alone}."""
  out = {}
  for _, seeded in rows:
    for r in seeded:
      domain = r.partition.split(':', 1)[-1]
      if r.central and domain in DOMAINS and r.key in runs and 'losses' in runs[r.key]:
        out[domain, r.seed] = runs[r.key]['losses'][domain]
  return out


def member_gain(rows, runs) -> list[dict]:
  """Per federated method: global and personalised own-domain losses against isolated silos.

  gain = isolated loss - model loss on the silo's own held-out split (> 0: joining
  paid), per (domain, seed); the isolated silo trained S + P steps, the same compute
  as S federated inner steps plus P personalisation steps.
  """
  iso = _isolated(rows, runs)
  out = []
  for label, seeded in rows:
    done = [r for r in seeded if not r.central and r.key in runs and 'losses' in runs[r.key]]
    if not done:
      continue
    row = {'label': label, 'seeds': len(done),
           'global_by_seed': {r.seed: _domain_mean(runs[r.key]['losses']) for r in done}}
    for kind, get in (('global', lambda rec, d: rec['losses'][d]),
                      ('personal', lambda rec, d: rec.get('personal', {}).get(d))):
      gains = {d: [iso[d, r.seed] - get(runs[r.key], d) for r in done
                   if (d, r.seed) in iso and get(runs[r.key], d) is not None] for d in DOMAINS}
      row[kind] = {d: spread(g) if g else None for d, g in gains.items()}
      flat = [g for d in DOMAINS for g in gains[d]]
      row[kind + '_wins'] = (sum(g > 0 for g in flat), len(flat))
      losses = [np.mean([get(runs[r.key], d) for d in DOMAINS]) for r in done
                if all(get(runs[r.key], d) is not None for d in DOMAINS)]
      row[kind + '_mean'] = spread(losses) if losses else None
    out.append(row)
  return out


def member_gain_markdown(rows, runs) -> str:
  table = member_gain(rows, runs)
  iso = _isolated(rows, runs)
  dp = {r.seed: _domain_mean(runs[r.key]['losses'])
        for label, seeded in rows if label.startswith('data-parallel')
        for r in seeded if r.key in runs and 'losses' in runs[r.key]}

  def versus_dp(row):
    """(data-parallel's domain mean, the row's / it - 1) over the seeds both have."""
    seeds = [s for s in row['global_by_seed'] if s in dp]
    if not seeds:
      return None
    ours = np.mean([row['global_by_seed'][s] for s in seeds])
    theirs = float(np.mean([dp[s] for s in seeds]))
    return theirs, float(ours / theirs - 1)
  lines = ['### Question 8: does every member gain? (own held-out split, same compute per silo)',
           '', 'gain = isolated loss − model loss on the silo\'s own split, mean ± half-range '
           'over seeds (> 0: joining paid). Isolated: the silo alone for S + P steps at batch '
           'B in its federated data order; global: the final global model (S steps per silo); '
           'personalised: the global model fine-tuned P steps on the silo\'s data.', '']
  if iso:
    lines.append('Isolated own-domain loss: ' + ', '.join(
        f'{d} {spread([v for (dd, _), v in iso.items() if dd == d])[0]:.3f}'
        for d in DOMAINS if any(dd == d for dd, _ in iso)))
    lines.append('')
  lines += ['| method | seeds | global domain mean | vs data-parallel | '
            'personalised domain mean | ' +
            ' | '.join(f'{d} gain (global / personalised)' for d in DOMAINS) +
            ' | personalised wins |',
            '|---|---:|---:|---:|---:|' + '---:|' * len(DOMAINS) + '---:|']

  def cell(x):
    return '-' if x is None else f'{x[0]:+.3f} ± {x[1]:.3f}'
  gaps = [versus_dp(row) for row in table]
  for row, gap in zip(table, gaps):
    wins, total = row['personal_wins']
    lines.append(
        f"| {row['label']} | {row['seeds']} | {_loss(row['global_mean'])} | "
        f"{'-' if gap is None else f'{gap[1] * 100:+.1f}%'} | "
        f"{_loss(row['personal_mean']) if row['personal_mean'] else '-'} | " +
        ' | '.join(f"{cell(row['global'][d])} / {cell(row['personal'][d])}" for d in DOMAINS) +
        f' | {wins}/{total} |')
  best = min((pair for pair in zip(table, gaps) if pair[1]), key=lambda p: p[1][1], default=None)
  if best:
    best, (dp_mean, gap) = best
    lines += ['', f"Best federated global model: {best['label']}, domain mean "
              f"{np.mean(list(best['global_by_seed'].values())):.3f} against data-parallel's "
              f"{dp_mean:.3f} ({gap * 100:+.1f}%, over the seeds both have done)."]
  return '\n'.join(lines) + '\n'


def _curve_mean(curves, own=None) -> tuple[list, list]:
  """Steps and the domain-mean loss at each, averaged over runs (seeds or domains)."""
  steps = [p[0] for p in curves[0]]
  ys = []
  for i in range(len(steps)):
    if own is None:
      ys.append(np.mean([np.mean(list(c[i][1].values())) for c in curves]))
    else:
      ys.append(np.mean([c[i][1][d] for c, d in zip(curves, own)]))
  return steps, ys


def plot_curves(rows, runs, out_dir, batch, seq_len, personal_steps) -> list[str]:
  """q8_curves.png: each silo's own held-out loss (mean over domains) against its tokens."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 5))
  tokens = batch * seq_len  # Per silo per step; data-parallel's K x B step is K silos' steps.
  isolated = {}
  for label, seeded in rows:
    done = [runs[r.key] for r in seeded if r.key in runs and runs[r.key].get('curve')]
    if not done:
      continue
    run = seeded[0]
    if run.central and run.partition != 'central:union':
      for r, rec in zip(seeded, done):
        isolated.setdefault(r.seed, []).append((rec['curve'], run.partition.split(':')[1]))
      continue
    try:
      steps, ys = _curve_mean([rec['curve'] for rec in done])
    except (IndexError, KeyError):
      continue
    style = '--' if run.central else '-'
    ax.plot(np.asarray(steps) * tokens, ys, style, label=label, marker='.' if len(steps) < 30
            else None)
    personal = [np.mean(list(rec['personal'].values())) for rec in done if rec.get('personal')]
    if personal:
      ax.scatter([(steps[-1] + personal_steps) * tokens], [np.mean(personal)],
                 marker='*', s=60)
  for seed, curves in sorted(isolated.items())[:1]:
    if len(curves) == len(DOMAINS):
      steps, ys = _curve_mean([c for c, _ in curves], own=[d for _, d in curves])
      ax.plot(np.asarray(steps) * tokens, ys, ':', color='black',
              label=f'isolated silos, own split (seed {seed})')
  ax.set_xlabel('tokens per silo')
  ax.set_ylabel('held-out loss on each silo\'s own split (mean of 4)')
  ax.set_title('Q8: loss against tokens (stars: personalised)', fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)
  ax.set_ylim(top=min(ax.get_ylim()[1], 8.5))
  fig.tight_layout()
  path = os.path.join(out_dir, 'q8_curves.png')
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return [path]


# -- the study ----------------------------------------------------------------------------


def _settings(config, section: str) -> dict:
  """A config section for the setup record; fields added later, at their defaults, left out
  (`records.LATER_FIELDS`), so results from before them still resume."""
  missing = object()
  later = {**records.LATER_FIELDS, 'model.scan_layers': True}
  return {k: v for k, v in config[section].items()
          if later.get(f'{section}.{k}', missing) != v}


def base_config(config, steps, batch, seq_len, silo_lr, central_lr, adam_lr, eval_batches):
  """The config every run starts from, and the settings results.json is tied to."""
  base = config.copy_and_resolve_references()
  base.data.update(seq_len=seq_len, global_batch=batch)
  base.inner.lr = silo_lr
  # The paper's outer settings, whatever fedpt's defaults are.
  base.outer.update(optimizer='diloco', lr=0.7, momentum=0.9, b1=0.9, b2=0.99, eps=0.1)
  # The layout every study run so far used (the same function; float sums in another order).
  base.model.scan_layers = True
  setup = dict(config=config.name, steps=steps, batch=batch, seq_len=seq_len, silo_lr=silo_lr,
               val_fraction=VAL_FRACTION, central_lr=central_lr, adam_lr=adam_lr,
               eval_batches=eval_batches, **{name: _settings(base, name)
                                             for name in ('model', 'inner', 'outer')})
  base.train.update(eval_batches=1)  # Silos' per-round eval; the tables use the Evaluator.
  base.train.async_checkpoints = False  # Threads: a save must finish before the next round.
  # A silo thread that fails leaves the aggregator waiting: bound that to 10 minutes (the
  # longest round here, H=200 with 8 silos, takes under 2).
  base.federation.update(poll_s=0.02, wait_timeout_s=600.0, round_deadline_s=600.0)
  return base, setup


@dataclasses.dataclass(frozen=True)
class LongOptions:
  """Question 8's settings (recorded in results.json's setup when it is asked)."""
  personal_steps: int = 100
  # At or below the inner schedule's final lr (6e-4 here): 2e-3 undid the global model's
  # gains on web (BENCHMARKS.md). Not part of the setup: a change rescores saved params.
  personal_lr: float = 3e-4
  momentum_warmup: int = 4
  prox_mu: float = 0.01
  curve_batches: int = 4
  curve_points: int = 20  # Points of the central runs' curves.


def _missing_feature(base, run: Run) -> str | None:
  """Why this fedpt cannot train `run` (a method it does not have), or None."""
  if run.drift != 'none' and 'drift_correction' not in base.inner:
    return f'inner.drift_correction={run.drift}'
  if run.momentum_warmup and 'momentum_warmup_rounds' not in base.outer:
    return 'outer.momentum_warmup_rounds'
  for field, value in (('overlap', run.overlap), ('downlink_compression', run.downlink)):
    if value != 'none' and field not in base.federation:
      return f'federation.{field}={value}'
  if run.fragments != 1 and 'fragments' not in base.federation:
    return f'federation.fragments={run.fragments}'
  if run.compression == 'topk' and 'topk_density' not in base.federation:
    return 'federation.compression=topk'
  if run.inner != 'adamw' and 'optimizer' not in base.inner:
    return f'inner.optimizer={run.inner}'
  return None


def _save_params(out_dir: str, key: str, params) -> str:
  """The final params, so a later evaluation (whole splits) needs no retraining."""
  flat = {name: np.asarray(v) for name, v in trees.flatten_params(params).items()}
  path = os.path.join(out_dir, 'params', key.replace('/', '.') + '.npz')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.savez(path, **flat)
  return path


def study(config, out_dir, seeds, questions, steps, base_h, h_values, k_values, batch, seq_len,
          silo_lr, central_lr, adam_lr, drop_probability, eval_batches,
          long: LongOptions = LongOptions(), report_only: bool = False,
          link: str | None = None, muon_lrs=(0.02,), muon_probe: bool = False,
          rows=()) -> dict:
  """Trains every planned run not yet in results.json, then writes study.md and the plots.

  `report_only` trains nothing and leaves results.json alone: the tables and plots of the
  runs done so far (a long study reports while it is still going, from another process);
  personalised losses stay at the lr each run records. `link` ('10MB/s,50ms') is each
  silo's simulated link to the bucket (`storage.Link`). `rows`: train only the rows of
  these labels (a probe of a few settings at another horizon), all when empty.
  """
  check_flags(steps, base_h, h_values, k_values, questions, muon_lrs)
  link = storage_lib.Link.parse(link, '--link')
  link = link.spec if link else None
  os.makedirs(out_dir, exist_ok=True)
  base, setup = base_config(config, steps, batch, seq_len, silo_lr, central_lr, adam_lr,
                            eval_batches)
  if link:  # Only then: results from before links existed still resume.
    setup['link'] = link
  if LONG in questions:
    setup['long'] = {k: v for k, v in dataclasses.asdict(long).items() if k != 'personal_lr'}
    base.train.eval_batches = long.curve_batches  # The silos' per-round held-out loss.
  if OVERLAP in questions:  # Its time to a loss reads the silos' per-round held-out loss.
    setup['round_eval_batches'] = long.curve_batches
    base.train.eval_batches = long.curve_batches
  path = os.path.join(out_dir, 'results.json')
  results = load_results(path, setup)
  questions_plan = plan(questions, seeds, base_h, h_values, k_values, drop_probability,
                        long.personal_steps, long.momentum_warmup, long.prox_mu, muon_lrs,
                        muon_probe)
  if rows:
    questions_plan = {q: [row for row in table if row[0] in rows]
                      for q, table in questions_plan.items()}
  check_flags(steps, base_h, sorted({run.inner_steps for rows in questions_plan.values()
                                     for _, seeded in rows for run in seeded} - {0}),
              k_values, questions)
  evaluator = Evaluator(base, eval_batches)

  def personalised(params, seed):
    return {'personal_lr': long.personal_lr, 'personal': {
        d: evaluator.trainer.evaluate(
            personalise(base, params, d, seed, steps, long.personal_steps, long.personal_lr),
            dataset=evaluator.vals[d]) for d in DOMAINS}}

  # Personalisation is post hoc: rescore. Not in a report, which trains and writes nothing
  # (the study it reports on may be running and writing results.json).
  for key, record in ([] if report_only else results['runs'].items()):
    if 'personal' in record and record['personal_lr'] != long.personal_lr:
      params = trees.unflatten_params(dict(np.load(record['params_file'])))
      record.update(personalised(params, int(key.rsplit('/s', 1)[1])))
      save_results(path, results)
      metrics_lib.log(f'study: {key} personalised again at lr {long.personal_lr:g}')
  curve_eval = Evaluator(base, long.curve_batches, names=DOMAINS) if LONG in questions else None
  long_keys = {r.key for _, seeded in questions_plan.get(LONG, []) for r in seeded}
  todo = {}
  for q, rows in questions_plan.items():
    if q == LONG:  # Row-major: the core rows for every seed first.
      order = [run for _, seeded in rows for run in seeded]
    else:  # Seed-major: a stopped study still has whole questions for seed 0.
      order = [run for seed in seeds for _, seeded in rows for run in seeded if run.seed == seed]
    for run in order:
      if run.key not in results['runs']:
        todo.setdefault(run.key, run)
  if report_only:
    todo = {}
  metrics_lib.log(f'study: {len(results["runs"])} runs done, {len(todo)} to go -> {path}')
  for i, run in enumerate(todo.values()):
    missing = _missing_feature(base, run)
    if missing:
      metrics_lib.log(f'study [{i + 1}/{len(todo)}] {run.key}: skipped, this fedpt has no '
                      f'{missing}')
      continue
    start = time.monotonic()
    record = {}
    in_long = run.key in long_keys
    try:
      if run.central:
        trained = run_central(base, run, steps, batch, central_lr, curve_eval,
                              long.curve_points if in_long else 0)
      else:
        trained = run_federated(base, run, steps, adam_lr, link)
      params = trained.pop('params')
      record['losses'] = evaluator(params)
      if in_long:
        record['params_file'] = _save_params(out_dir, run.key, params)
      if in_long and not run.central and long.personal_steps:
        record.update(personalised(params, run.seed))
    except trainer_lib.TrainingDivergedError as e:
      trained, record['diverged'] = {'rounds': 0, 'bytes_up': None}, str(e)
    rounds = trained['rounds']
    record.update(trained, seconds=time.monotonic() - start,
                  bytes_down=(rounds * evaluator.param_bytes * (2 if run.drift == 'scaffold' else 1)
                              if rounds else None))  # SCAFFOLD: the global model and c.
    if run.fragments != 1 and rounds:  # A fragment round's base is 1/P of the model.
      record['bytes_down'] = int(sum(trained['bytes_down_by_round']))
    if run.partition == 'central:union' and run.central_batch > 1:  # Data-parallel over K.
      record['bytes_up'] = record['bytes_down'] = steps * evaluator.param_bytes
    results['runs'][run.key] = record
    save_results(path, results)
    union = record.get('losses', {}).get('union', float('nan'))
    metrics_lib.log(f'study [{i + 1}/{len(todo)}] {run.key}: union loss {union:.4f} '
                    f'({record["seconds"]:.0f}s)')
  summary = summarise(questions_plan, results['runs'])
  text = markdown(summary, setup)
  plots = plot(summary, out_dir)
  if LONG in questions_plan:
    text += member_gain_markdown(questions_plan[LONG], results['runs'])
    plots += plot_curves(questions_plan[LONG], results['runs'], out_dir, batch, seq_len,
                         long.personal_steps)
  with open(os.path.join(out_dir, 'study.md'), 'w') as f:
    f.write(text)
  print(text)
  print('plots: ' + ', '.join(plots))
  return summary


def _ints(name) -> list[int]:
  return _numbers(name, int, 'integers', '1,2')


def _floats(name) -> list[float]:
  return _numbers(name, float, 'numbers', '0.02,0.01')


def _numbers(name, cast, what: str, example: str) -> list:
  """--name's comma-separated values as `cast`s, or a one-line StudyError with the fix."""
  try:
    return [cast(v) for v in FLAGS[name].value]
  except ValueError:
    raise StudyError(f'--{name}={",".join(FLAGS[name].value)} is not a list of {what}. '
                     f'Fix: give comma-separated {what}, e.g. --{name}={example}') from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  # Compiled programs repeat across runs: keep them on disk.
  jax.config.update('jax_compilation_cache_dir',
                    os.path.join(data_lib.default_cache_root(), 'jax-study'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  try:
    cli.run_or_explain(
        study, FLAGS.config, FLAGS.out, _ints('seeds'), _ints('questions'), FLAGS.steps,
        FLAGS.base_h, _ints('h_values'), _ints('k_values'), FLAGS.batch, FLAGS.seq_len,
        FLAGS.silo_lr, FLAGS.central_lr, FLAGS.adam_lr, FLAGS.drop_probability,
        FLAGS.eval_batches, LongOptions(FLAGS.personal_steps, FLAGS.personal_lr,
                                        FLAGS.momentum_warmup, FLAGS.prox_mu,
                                        FLAGS.curve_batches), FLAGS.report_only, FLAGS.link,
        _floats('muon_lrs'), FLAGS.muon_probe, tuple(FLAGS.rows))
  except StudyError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_or_explain)
