"""Final global held-out loss, each silo's epsilon and sigma of run_quality.sh's runs, as JSON.

  python bench/dp_results/collect.py /tmp/dpbench/tiny > bench/dp_results/quality_tiny.json
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def collect(out: str) -> dict:
  runs = {}
  for name in sorted(os.listdir(out)):
    bucket = os.path.join(out, name, 'bucket')
    if not os.path.isdir(bucket):
      continue
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'scripts/status.py'),
                           f'--storage={bucket}', '--format=json'],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
      runs[name] = {'error': proc.stderr.strip().splitlines()[-1:]}
      continue
    ledger = json.loads(proc.stdout)
    rows = [r for r in ledger['rounds'] if r['status'] == 'done']
    sigma = {}
    for silo in os.listdir(os.path.join(out, name, 'silos')):
      record = os.path.join(out, name, 'silos', silo, 'privacy.json')
      if os.path.exists(record):
        with open(record) as f:
          sigma[silo] = json.load(f)['noise_multiplier']
    runs[name] = {
        'rounds_done': len(rows), 'rounds': ledger['federation']['rounds'],
        'eval_loss_by_round': [rows[0]['base_eval_loss']] + [r['eval_loss'] for r in rows]
                              if rows else [],
        'final_eval_loss': rows[-1]['eval_loss'] if rows else None,
        'final_eval_loss_by_silo': rows[-1]['eval_loss_by_silo'] if rows else None,
        'dp': {s: t['dp'] for s, t in ledger['silo_totals'].items()},
        'noise_multiplier': sigma,
    }
  return runs


if __name__ == '__main__':
  json.dump(collect(sys.argv[1]), sys.stdout, indent=1)
  print()
