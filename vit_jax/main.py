"""Entry point: python -m vit_jax.main --config=configs/<recipe>.py:<args> --workdir=DIR.

Any config key can be overridden with --config.<key>=<value>; unknown keys and values of the wrong
type are rejected by ml_collections, impossible values by config_lib.check, before compiling.
"""

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Recipe file and its arguments, e.g. configs/digits.py:pretrain.')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Where checkpoints, logs, results.json and model.npz go.')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv):
  """absl's parsing, with a clear error for an override of a key the config does not have."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # What ml_collections raises for unknown keys.
    key = str(e).strip('"\'')
    culprit = next((a for a in argv if a.startswith('--config.') and key in a), key)
    sys.stderr.write(f'FATAL Flags parsing error: {culprit}: the config has no key {key!r}.\n')
    sys.exit(1)


def _quiet_orbax(record: std_logging.LogRecord) -> bool:
  """Orbax logs every step of every save at INFO; keep its warnings and errors only."""
  return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected command-line arguments: {" ".join(argv[1:])}')
  logging.get_absl_handler().addFilter(_quiet_orbax)
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')  # tf.data only: leave accelerators to JAX.
  from vit_jax import train  # After flag parsing, so that --help stays fast.

  config = _CONFIG.value
  logging.info('Config:\n%s', config)
  if config.trainer == 'evaluate':
    train.evaluate(config, _WORKDIR.value)
  else:
    train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
