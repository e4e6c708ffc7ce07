"""Entry point: python -m vit_jax.main --config=configs/<recipe>.py:<args> --workdir=DIR.

Any config key can be overridden with --config.<key>=<value>; unknown keys and values of the wrong
type are rejected by ml_collections, impossible values by config_lib.check, before compiling.
"""

import logging as std_logging
import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vit_jax import cpu_tuning

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Recipe file and its arguments, e.g. configs/digits.py:pretrain.')
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Where checkpoints, logs, results.json and model.npz go.')
flags.mark_flags_as_required(['config', 'workdir'])
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-host: HOST:PORT of process 0 (auto-detected on TPU VMs).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: index of this process.')
_STARTUP_TIMEOUT = flags.DEFINE_integer(
    'startup_timeout_s', 300, 'Multi-host: how long the processes wait for each other to join; '
    'then a missing one is named.')


def initialize_distributed():
  """Joins the processes of a multi-host run; a plain machine runs as the only process."""
  from vit_jax import multihost
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise app.UsageError('--coordinator_address, --num_processes and --process_id go together.')
    multihost.initialize(*explicit, timeout_s=_STARTUP_TIMEOUT.value)
    return
  try:  # TPU VMs, SLURM, ... provide everything in their environment.
    jax.distributed.initialize(initialization_timeout=_STARTUP_TIMEOUT.value)
  except ValueError:
    pass  # No cluster environment: a single process.


def parse_flags(argv):
  """absl's parsing, with a clear error for an override of a key the config does not have."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # What ml_collections raises for unknown keys.
    sys.stderr.write(f'FATAL Flags parsing error: {unknown_key_message(e, argv)}\n')
    sys.exit(1)


def unknown_key_message(error: Exception, argv) -> str:
  """One plain line for ml_collections' error about an unknown config key: the flag that named
  it, the key, and ml_collections' closest existing key where it has one."""
  while error.args and isinstance(error.args[0], BaseException):  # A KeyError in an AttributeError.
    error = error.args[0]
  text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  key = text.splitlines()[0].strip().strip('"\'')
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  culprit = next((a.split('=')[0] for a in argv if a.startswith('--config.') and
                  a.split('=')[0].split('.')[-1] == key), f'--config...{key}')
  hint = (f' Did you mean {culprit.rsplit(".", 1)[0]}.{suggestion.group(1)}?' if suggestion
          else '')
  return f'{culprit}: the config has no key {key!r}.{hint}'


def _quiet_orbax(record: std_logging.LogRecord) -> bool:
  """Orbax logs every step of every save at INFO; keep its warnings and errors only."""
  return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def start(argv):
  """What every command that trains does once its flags are parsed: join the other processes,
  turn SIGTERM into a clean stop, and keep tf.data off the accelerators. Returns the parsed
  (config, workdir)."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected command-line arguments: {" ".join(argv[1:])}')
  logging.get_absl_handler().addFilter(_quiet_orbax)
  initialize_distributed()
  from vit_jax import resume
  if jax.process_count() == 1:
    resume.catch_sigterm()  # From here on, SIGTERM ends the run cleanly (exit 0).
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # Process 0 speaks for all.
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')  # tf.data only: leave accelerators to JAX.
  return _CONFIG.value, _WORKDIR.value


def main(argv):
  config, workdir = start(argv)
  from vit_jax import resume, train  # After flag parsing, so that --help stays fast.

  if config.auto_fit and config.trainer == 'train':
    config = _fitted(config)
  logging.info('Config:\n%s', config)
  if config.trainer == 'evaluate':
    train.evaluate(config, workdir)
  elif config.trainer == 'inference_time':
    from vit_jax import inference_time
    inference_time.inference_time(config, workdir)
  else:
    try:
      train.train_and_evaluate(config, workdir)
    except resume.CheckpointSaveError as e:
      # The failed save's orbax threads would hold the exit for a coordination timeout
      # (300 s) and then print their tracebacks: the named error is the last word instead.
      logging.error('%s', e)
      logging.flush()
      sys.stderr.write(f'\n{type(e).__name__}: {e}\n')
      sys.stderr.flush()
      os._exit(1)  # pylint: disable=protected-access
    _beside_published(workdir)


def _fitted(config):
  """config with the cheapest memory-only setting whose steps fit this machine's devices."""
  from vit_jax import plan
  devices = jax.devices()
  logging.info('auto_fit: compiling the steps for %d %s devices, cheapest setting first.',
               len(devices), devices[0].device_kind)
  found = plan.auto_fit(config, devices, f'{devices[0].platform}:{len(devices)}',
                        log=lambda line: logging.info('auto_fit:%s', line))
  logging.info('auto_fit chose %s', found.flags() or 'the config as it is')
  return plan.with_overrides(config, found.overrides)


def _beside_published(workdir: str):
  """Prints the finished run beside the published result it reproduces, where there is one."""
  from vit_jax import published, report
  if (jax.process_index() == 0 and published.for_workdir(workdir) is not None
      and os.path.isfile(os.path.join(workdir, 'results.json'))):
    report.main([workdir])


if __name__ == '__main__':
  cpu_tuning.tune_command_line()
  app.run(main, flags_parser=parse_flags)
