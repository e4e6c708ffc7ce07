"""Surviving interruptions: train-state checkpoints in the workdir, resuming, preemption.

Checkpoints are orbax's: written to a temporary directory and renamed when complete, so a run
killed mid-save leaves no half checkpoint behind. One that is complete but unreadable
(corrupted storage) is renamed `<step>.unreadable` and the previous one is used.
"""

import json
import logging
import os
import signal

import flax
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vit_jax import checkpoint

# Config keys that fix the shapes of the train state: a checkpoint only resumes under the same.
STATE_DEFINING_KEYS = ('model', 'dataset', 'num_classes', 'optimizer', 'objective', 'pp.crop')
SAME_STATE_EITHER_WAY = ('model.transformer.remat',)  # Memory layout only: may change on resume.
CONFIG_FILE = 'config.json'


def _flat(config_dict: dict) -> dict:
  return flax.traverse_util.flatten_dict(config_dict, sep='.')


def _state_defining(config_json: str) -> dict:
  flat = _flat(json.loads(config_json))
  return {k: v for k, v in flat.items() if k not in SAME_STATE_EITHER_WAY and
          any(k == key or k.startswith(key + '.') for key in STATE_DEFINING_KEYS)}


class Checkpoints:
  """The train-state checkpoints of one workdir."""

  def __init__(self, workdir: str, config):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, 'checkpoints')
    self.config = config
    self.manager = self._new_manager()

  def _new_manager(self):
    return ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
        max_to_keep=self.config.keep_checkpoints, create=True))

  def check_compatible(self):
    """Refuses to resume a workdir whose checkpoints hold another model (or optimizer, ...)."""
    saved_path = os.path.join(self.workdir, CONFIG_FILE)
    if self.manager.latest_step() is None or not os.path.exists(saved_path):
      return
    with open(saved_path) as f:
      saved = _state_defining(f.read())
    current = _state_defining(self.config.to_json_best_effort())
    changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if changed:
      details = '; '.join(f'{k}: {saved.get(k)!r} in the checkpoints, {current.get(k)!r} now'
                          for k in changed)
      raise ValueError(f'workdir {self.workdir} holds checkpoints of a different run ({details}). '
                       'Resume with the same model, or use a new workdir.')

  def write_config(self):
    if jax.process_index() == 0:
      checkpoint.write_bytes(os.path.join(self.workdir, CONFIG_FILE),
                             self.config.to_json_best_effort(indent=2).encode())

  def restore_latest(self, state):
    """The newest readable checkpoint restored into `state`'s structure and shardings, or None."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    while (step := self.manager.latest_step()) is not None:
      try:
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        logging.info('Resumed from the checkpoint of step %d.', step)
        return restored
      except Exception as e:  # Orbax / TensorStore raise many types for damaged files.
        logging.warning('The checkpoint of step %d is unreadable (%s: %s); setting it aside as '
                        '%d.unreadable and trying the previous one.', step, type(e).__name__,
                        str(e)[:500], step)
        multihost_utils.sync_global_devices(f'unreadable checkpoint {step}')
        if jax.process_index() == 0:
          os.replace(os.path.join(self.directory, str(step)),
                     os.path.join(self.directory, f'{step}.unreadable'))
        multihost_utils.sync_global_devices(f'set aside checkpoint {step}')
        self.manager = self._new_manager()
    return None

  def save(self, step: int, state):
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def wait(self):
    self.manager.wait_until_finished()


class Preemption:
  """Whether the run was asked to stop (SIGTERM, as TPU VMs and schedulers send).

  One process: a SIGTERM handler sets a flag. Several: JAX's coordination service receives the
  signal and agrees with every process on the step at which to stop.
  """

  def __init__(self):
    self.requested = False
    self._previous_handler = None
    if jax.process_count() == 1:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def close(self):
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: stopping after this step with a checkpoint.')
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    return multihost_utils.reached_preemption_sync_point(step)
