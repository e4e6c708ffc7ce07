"""A workdir across runs: its lock and its record of the configs that ran there.

- One run at a time: `WorkdirLock` (an flock on `<workdir>/lock`, released by the kernel when the
  holder dies, so a stale lock is simply taken over).
- A run checks that the workdir's checkpoints hold the state its config builds before it restores
  anything (`Workdir.check_compatible`; resume.py then checks the checkpoint's own metadata),
  and stops with the difference named otherwise. `config.json` records the config that started
  the workdir; `config_history.json` every start since; neither is overwritten.
"""

import errno
import fcntl
import itertools
import json
import logging
import os
import socket
import time

import flax
import jax
import numpy as np
from jax.experimental import multihost_utils

from vit_jax import files

# Config keys that fix the train state (parameters and optimizer state); the image size and the
# number of outputs, which the data can fix too, are compared as resolved values.
STATE_DEFINING_KEYS = ('model', 'dataset', 'optimizer', 'objective', 'loss')
PARAMS_DEFINING_KEYS = ('model', 'objective')  # What evaluating the parameters needs.
# How the model computes, not what: a run may resume with others. (`scan` changes the layout
# of the parameters, so it stays.)
SAME_STATE_EITHER_WAY = ('model.transformer.remat', 'model.transformer.attention')
# State-defining keys added since workdirs were first recorded, with the value an older record
# (which lacks them) meant.
NEWER_KEYS = {'model.transformer.scan': False}
CONFIG_FILE, HISTORY_FILE, LOCK_FILE = 'config.json', 'config_history.json', 'lock'
CLASSES_FILE = 'classes.json'  # The class names of the data the workdir's run learnt, by label.
EXPORT_FILE, CHECKPOINT_DIR = 'model.npz', 'checkpoints'

class WorkdirMismatchError(ValueError):
  """The workdir's checkpoints hold another train state than the config builds."""


class WorkdirLockLost(RuntimeError):
  """`<workdir>/lock` was deleted or replaced while this run held it."""


# ------------------------------------------------------------------------------------ lock

class WorkdirLock:
  """Exclusive use of a workdir by one run (process 0 holds it for all processes of the run)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None

  def acquire(self):
    error = None
    if jax.process_index() == 0:
      error = self._try_lock()
    if jax.process_count() > 1:  # Every process stops if process 0 could not lock.
      failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
      if failed and error is None:
        error = f'process 0 could not lock {self.path}; see its log.'
    if error:
      raise RuntimeError(error)
    return self

  def _try_lock(self):
    self._file = open(self.path, 'a+')
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      self._file.seek(0)
      holder = self._file.read().strip() or 'a run that has not written its name yet'
      self._file.close()
      self._file = None
      if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
        return (f'workdir {os.path.dirname(self.path)} is in use by another run ({holder}). '
                'Wait for it to end or use another workdir; nothing was changed.')
      logging.warning('Cannot lock %s (%s): this filesystem has no file locks, so nothing '
                      'stops two runs from sharing the workdir.', self.path, e.strerror)
      return None
    self._file.seek(0)
    previous = self._file.read().strip()
    if previous:
      logging.info('Taking over the lock of an ended run (%s).', previous)
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f'pid {os.getpid()} on {socket.gethostname()}, since '
                     f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n')
    self._file.flush()
    return None

  def lost(self):
    """Why `<workdir>/lock` is no longer the file this run locked (deleted, replaced), or None.

    A user or a sync tool deleting it would let a second run lock a new file and share the
    workdir; the holder notices here and stops."""
    if self._file is None:
      return None
    try:
      now = os.stat(self.path)
    except FileNotFoundError:
      return 'was deleted'
    held = os.fstat(self._file.fileno())
    if (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
      return 'was replaced by another file (another run may have locked it)'
    return None

  def check(self, step: int):
    """Raises WorkdirLockLost if the lock was lost (process 0 looks; every process stops)."""
    problem = self.lost() if jax.process_index() == 0 else None
    if jax.process_count() > 1:
      lost = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
      problem = problem or ('was lost by process 0' if lost else None)
    if problem:
      raise WorkdirLockLost(
          f'{self.path} {problem} while this run held it (at step {step}): another run may now '
          f'use workdir {os.path.dirname(self.path)}, so this run stopped without saving or '
          'exporting anything more. Never delete the lock of a running run; run the same command '
          'to resume once no other run uses the workdir.')

  def release(self):
    if self._file is not None:  # Unlocked, not deleted: deleting races with a waiting run.
      self._file.seek(0)
      self._file.truncate()
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def make_writable_directory(directory: str):
  """Creates `directory` and writes a file into it; raises the OSError if it cannot (root may
  write where os.access says no, and a read-only mount refuses root too: try it)."""
  os.makedirs(directory, exist_ok=True)
  probe = os.path.join(directory, f'.write-test-{os.getpid()}')
  with open(probe, 'w'):
    pass
  os.remove(probe)


def remove_temporaries(workdir: str):
  """Deletes what a killed writer of this codebase left in the workdir (files.temporary_path's
  names only): called by the lock's holder, so no live writer owns them."""
  for name in files.remove_temporaries(workdir):
    logging.info('Removed the temporary file of %s, left by a run that was killed while '
                 'writing it.', name)


# ------------------------------------------------------------------------ configs of a workdir

def _flat(config_dict: dict) -> dict:
  return flax.traverse_util.flatten_dict(config_dict, sep='.')


def signature(config_dict: dict, keys, *, num_outputs=None, image_size=None) -> dict:
  """The values under `keys` that fix the state, spelling-independent (JSON types, the crop
  as an image size)."""
  flat = {**NEWER_KEYS, **_flat(json.loads(json.dumps(config_dict)))}
  values = {k: v for k, v in flat.items() if k not in SAME_STATE_EITHER_WAY and
            any(k == key or k.startswith(key + '.') for key in keys)}
  if num_outputs is not None:
    values['number of outputs'] = int(num_outputs)
  if image_size is not None:
    values['image size'] = [int(side) for side in image_size]
  return values


def read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is unreadable ({e}): repair or move it; nothing was '
                     'changed.') from None


def append_json(path, entry: dict):
  """Adds `entry` to the JSON list in `path`, atomically: earlier entries are kept."""
  entries = read_json(path) or []
  entries = [entries] if isinstance(entries, dict) else entries  # One result, as written before.
  entries.append(entry)
  files.write_bytes(path, json.dumps(entries, indent=1).encode())


class Workdir:
  """The record of the configs a workdir ran with."""

  def __init__(self, workdir: str):
    self.path = os.path.abspath(workdir)

  def last_training(self):
    """(config dict, number of outputs, image size) of the last training start, or None."""
    history = read_json(os.path.join(self.path, HISTORY_FILE)) or []
    for entry in reversed(history):
      if entry.get('trainer') == 'train':
        return entry['config'], entry.get('num_outputs'), entry.get('image_size')
    # Workdirs from before the history: their config only (the checkpoint's metadata catches
    # shape changes of what it does not say).
    first = read_json(os.path.join(self.path, CONFIG_FILE))
    return (first, None, None) if first else None

  def check_compatible(self, config, *, num_outputs, image_size, keys=STATE_DEFINING_KEYS):
    """Refuses a config whose state differs from the last training run's, naming each change,
    when the workdir holds what that run made (checkpoints or an export)."""
    made = os.path.exists(os.path.join(self.path, EXPORT_FILE)) or self.has_checkpoints()
    last = self.last_training() if made else None
    if last is None:
      return
    saved_config, saved_outputs, saved_size = last
    current = json.loads(config.to_json_best_effort())
    saved = signature(saved_config, keys, num_outputs=saved_outputs, image_size=saved_size)
    current = signature(current, keys, num_outputs=num_outputs if saved_outputs else None,
                        image_size=image_size if saved_size else None)
    changed = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if changed:
      details = '; '.join(f'{k}: {saved.get(k)!r} in the checkpoints, {current.get(k)!r} now'
                          for k in changed)
      raise WorkdirMismatchError(
          f'workdir {self.path} holds checkpoints of a different run ({details}). Nothing was '
          f'changed. Use the config it was trained with (see {HISTORY_FILE}), or a new workdir.')

  def has_checkpoints(self) -> bool:
    checkpoints = os.path.join(self.path, CHECKPOINT_DIR)
    return os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))

  def check_pretrained_path(self, config):
    """Refuses to resume with another pretrained_path than the run started from: it is read
    only at step 0, so the run would go on from the old one while the history said otherwise."""
    last = self.last_training() if self.has_checkpoints() else None
    if last is None:
      return
    then, now = last[0].get('pretrained_path'), config.pretrained_path
    if then == now or (then and now and '://' not in then + now and os.path.exists(then) and
                       os.path.exists(now) and os.path.samefile(then, now)):
      return
    raise WorkdirMismatchError(
        f'workdir {self.path} holds checkpoints of a run started from pretrained_path={then!r}; '
        f'this run names pretrained_path={now!r}, which resuming would not read. Nothing was '
        f'changed. Resume with pretrained_path={then!r}, or fine-tune from {now!r} in a new '
        'workdir.')

  def check_classes(self, class_names):
    """Refuses data whose classes (names, by label) are not those the workdir recorded: a
    renamed, added or removed class folder would shift the meaning of every label."""
    recorded = read_json(os.path.join(self.path, CLASSES_FILE))
    if recorded is None or class_names is None or list(recorded) == list(class_names):
      return
    now = list(class_names)
    added, removed = sorted(set(now) - set(recorded)), sorted(set(recorded) - set(now))
    shifted = [f'label {i}: {old!r} then, {new!r} now' for i, (old, new) in
               enumerate(itertools.zip_longest(recorded, now)) if old != new]
    raise WorkdirMismatchError(
        f'workdir {self.path} was trained on other classes than the data has now '
        f'({len(recorded)} in {CLASSES_FILE}, {len(now)} now; added {added[:5]}, removed '
        f'{removed[:5]}; {"; ".join(shifted[:5])}{" ..." if len(shifted) > 5 else ""}). Every '
        'label would name another class. Nothing was changed: restore the classes as they were, '
        'or use a new workdir.')

  def record_start(self, config, *, num_outputs, image_size, start_step, class_names=None):
    """Adds this start to the history; writes config.json (and classes.json) if the workdir
    has none."""
    if jax.process_index() > 0:
      return
    classes_path = os.path.join(self.path, CLASSES_FILE)
    if class_names is not None and not os.path.exists(classes_path):
      files.write_bytes(classes_path, json.dumps(list(class_names), indent=0).encode())
    config_dict = json.loads(config.to_json_best_effort())
    append_json(os.path.join(self.path, HISTORY_FILE), {
        'started': time.strftime('%Y-%m-%d %H:%M:%S'), 'host': socket.gethostname(),
        'pid': os.getpid(), 'trainer': config.trainer, 'start_step': start_step,
        'num_outputs': num_outputs, 'image_size': list(image_size), 'config': config_dict})
    config_path = os.path.join(self.path, CONFIG_FILE)
    if not os.path.exists(config_path):
      files.write_bytes(config_path, json.dumps(config_dict, indent=2).encode())
