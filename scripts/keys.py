r"""Generates Ed25519 key pairs for the parties of a federated run (and each silo's X25519
pair, `silo_<id>.x25519.key` / `.pub`, for secure aggregation's masks).

Each organisation runs this in its own private storage and shares only the .pub:

  python scripts/keys.py --keys=~/fedpt-keys --names=silo_web         # a silo
  python scripts/keys.py --keys=~/fedpt-keys --names=aggregator       # the operator

The operator copies every silo_<id>.pub (and, for secure aggregation, silo_<id>.x25519.pub)
into its folder before init_run.py --keys=...; each silo copies aggregator.pub into its own
folder. Secret keys
(.key, mode 0600) never leave their owner's folder and never go to the bucket. A silo whose
Ed25519 pair exists gets only its missing X25519 pair; existing keys are never overwritten.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from fedpt import cli  # noqa: E402
from fedpt import signing  # noqa: E402

flags.DEFINE_string('keys', None, 'Private folder for the key files.')
flags.DEFINE_list('names', None, 'Key names: aggregator and/or silo_<id>, comma-separated.')
flags.mark_flags_as_required(['keys', 'names'])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  for path in cli.run_or_explain(signing.generate_named, os.path.expanduser(FLAGS.keys),
                                 FLAGS.names):
    x25519 = path[:-len('.pub')] + f'.{signing.X25519}.pub'
    extra = f' and {x25519} (share it too)' if os.path.exists(x25519) else ''
    print(f'wrote {path} (share it){extra} and their .key (keep them private)')
    for pub in (path, x25519):  # status.py lists run.json's: members compare them out of band.
      if pub.endswith(f'.{signing.X25519}.pub') and os.path.exists(pub):
        with open(pub, encoding='ascii') as f:
          print(f'  {os.path.basename(pub)} fingerprint {signing.fingerprint(f.read())}')


if __name__ == '__main__':
  cli.run(main)
