r"""Per-device memory of a config on a mesh, and the size of its published delta, from shapes.

  python scripts/plan.py --config=configs/1b.py --mesh=fsdp=8
  python scripts/plan.py --config=configs/70b.py --mesh=fsdp=-1 --devices=256
  python scripts/plan.py --config=configs/70b.py --mesh=fsdp=64,tensor=4 --hbm_gib=95 \
      --platform=tpu --format=json

Allocates nothing and needs none of the devices it plans for. It also sizes the
aggregator: host memory per aggregation shard for --num_shards (launch/gke/render.py
--plan reads it). --mesh replaces the
config's mesh (axes left out are 1); --devices defaults to the mesh's product. Activation
memory is an estimate (see fedpt/planning.py); --compile also asks XLA for its own
numbers by compiling, not running, the train step on this host's devices.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fedpt import cli  # noqa: E402
from fedpt import config as config_lib  # noqa: E402
from fedpt import planning  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
flags.DEFINE_string('mesh', None, "Mesh sizes, e.g. 'data=1,fsdp=16,tensor=4' or 'fsdp=-1' "
                    "(axes left out are 1); default: the config's mesh.")
flags.DEFINE_integer('devices', None, 'Devices of the silo; default: the product of the mesh, '
                     'or this host\'s device count when an axis is -1.')
flags.DEFINE_enum('platform', 'gpu', ['gpu', 'tpu', 'cpu'], 'Resolves compute_dtype and '
                  "attention 'auto' (bfloat16 and cuDNN on gpu).")
flags.DEFINE_float('hbm_gib', 80.0, 'Memory per device in GiB (H100 80, TPU v4 32, v5e 16, '
                   'v5p 95).')
flags.DEFINE_bool('compile', False, 'Also compile the train step on this host\'s devices and '
                  'report XLA\'s memory numbers (slow for big models; uses this host\'s '
                  'platform instead of --platform).')
flags.DEFINE_integer('num_shards', None, 'Aggregation shards to size the aggregator for '
                     '(host memory per shard); default: the config\'s federation.num_shards.')
flags.DEFINE_enum('format', 'table', ['table', 'json'], 'table for people, json for tools.')
flags.mark_flags_as_required(['config'])
FLAGS = flags.FLAGS


@cli.config_resolver
def _config():
  """--config with --mesh's sizes."""
  config = FLAGS.config
  if FLAGS.mesh is not None:
    config.mesh.update(planning.parse_mesh(FLAGS.mesh))
  return config


def make_plan():
  config = _config()
  num_devices = planning.device_count(config.mesh, FLAGS.devices)
  if not FLAGS.compile:
    return planning.plan(config, num_devices, platform=FLAGS.platform, hbm_gib=FLAGS.hbm_gib,
                         num_shards=FLAGS.num_shards)
  devices = jax.devices()
  if len(devices) < num_devices:
    raise config_lib.ConfigError(
        'mesh', f'--compile needs the {num_devices} devices it plans for; this host has '
        f'{len(devices)}', 'drop --compile, or run it where the devices are (on a CPU, '
        f'XLA_FLAGS=--xla_force_host_platform_device_count={num_devices})')
  info = planning.plan(config, num_devices, platform=devices[0].platform,
                       hbm_gib=FLAGS.hbm_gib, num_shards=FLAGS.num_shards)
  info['compiled'] = planning.compiled_memory(config, devices[:num_devices])
  return info


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  info = cli.run_or_explain(make_plan)
  print(json.dumps(info, indent=1) if FLAGS.format == 'json' else planning.render(info))


if __name__ == '__main__':
  cli.run(main)
