"""A workdir across runs: its lock, its record of configs, its train-state checkpoints, preemption.

Rules that keep a user's files safe:
- One run at a time: `WorkdirLock` (an flock on `<workdir>/lock`, released by the kernel when the
  holder dies, so a stale lock is simply taken over).
- A run checks that the workdir's checkpoints hold the state its config builds before it restores
  anything (`check_compatible`, then the checkpoint's own metadata), and stops with the difference
  named otherwise. `config.json` records the config that started the workdir; `config_history.json`
  every start since; neither is overwritten.
- A checkpoint is set aside (`<step>.unreadable`) only when its own files are proven damaged:
  missing or shorter than `files.json` (written when the save completed) records, or orbax's
  metadata missing or unparseable. An interrupt, a resource error, a mismatch or a bug stops the
  run and changes nothing.
"""

import errno
import fcntl
import itertools
import json
import logging
import os
import re
import signal
import socket
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vit_jax import checkpoint, files

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
FILES_RECORD = 'files.json'  # In each checkpoint: the size of each of its files.
# errno values that say the machine, not the checkpoint, is at fault.
RESOURCE_ERRORS = (errno.ENOMEM, errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE,
                   errno.EACCES, errno.EPERM, errno.EAGAIN, errno.ETIMEDOUT, errno.EIO,
                   errno.EROFS)


class WorkdirMismatchError(ValueError):
  """The workdir's checkpoints hold another train state than the config builds."""


class CheckpointRestoreError(RuntimeError):
  """A checkpoint with intact files could not be restored (resource error, bug, ...)."""


class WorkdirLockLost(RuntimeError):
  """`<workdir>/lock` was deleted or replaced while this run held it."""


class CheckpointSaveError(OSError):
  """An asynchronous checkpoint save failed (full disk, ...); the run stops."""


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


# ---------------------------------------------------------------------------- checkpoints

def _chain(error: BaseException):
  while error is not None:
    yield error
    error = error.__cause__ or error.__context__


def _shapes(tree) -> dict:
  """{'a/b/0/c': shape} of every array of `tree`, whatever containers hold them (orbax's
  metadata turns tuples into lists and named tuples into dicts)."""
  def name(entry):
    for attribute in ('key', 'idx', 'name'):
      if hasattr(entry, attribute):
        return str(getattr(entry, attribute))
    return str(entry)
  return {'/'.join(name(e) for e in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _structure_differences(stored: dict, wanted: dict, partial: bool) -> list:
  """What differs between the stored and the wanted {key: shape}; partial: only wanted keys."""
  lines = [f'{k}: not in the checkpoint' for k in sorted(wanted.keys() - stored.keys())]
  if not partial:
    lines += [f'{k}: in the checkpoint, not in this run' for k in
              sorted(stored.keys() - wanted.keys())]
  lines += [f'{k}: {stored[k]} in the checkpoint, {wanted[k]} in this run'
            for k in sorted(wanted.keys() & stored.keys()) if stored[k] != wanted[k]]
  return lines


class Checkpoints:
  """The train-state checkpoints of one workdir (orbax, asynchronous saves)."""

  def __init__(self, workdir: str, keep: int, *, saving: bool = True):
    """saving=False: only restored from (evaluation), which a read-only directory allows."""
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
    self.keep = keep
    if saving and jax.process_index() == 0:
      self._probe_writable()
    self.manager = self._new_manager()
    self.saving = None  # The step of the save in flight.
    # The checkpoints this run resumed from or saved: the only ones it writes into.
    self.own = set()

  def _probe_writable(self):
    """Names an unwritable checkpoint directory before any step: orbax would fail the first
    save and leave its threads waiting for a coordination timeout."""
    try:
      make_writable_directory(self.directory)
    except OSError as e:
      raise CheckpointSaveError(
          f'The checkpoint directory {self.directory} is not writable ({e.strerror}); nothing '
          'was trained or changed. Make it writable, or use another workdir.') from None

  def _new_manager(self):
    return ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True),
        item_handlers=ocp.StandardCheckpointHandler())

  def _item_dir(self, step):
    return os.path.join(self.directory, str(step), 'default')

  # Damage: proven from the files alone.
  def damage(self, step: int):
    """Why the files of checkpoint `step` are damaged, or None if nothing proves it."""
    step_dir = os.path.join(self.directory, str(step))
    record = os.path.join(step_dir, FILES_RECORD)
    if os.path.exists(record):
      try:
        with open(record) as f:
          sizes = json.load(f)
      except ValueError:
        return f'its {FILES_RECORD} is not valid JSON'
      missing = [p for p in sizes if not os.path.isfile(os.path.join(step_dir, p))]
      short = [p for p in sizes if p not in missing and
               os.path.getsize(os.path.join(step_dir, p)) != sizes[p]]
      if missing or short:
        return (f'{len(missing)} file(s) missing, {len(short)} of another size than when it '
                f'was saved: {", ".join((missing + short)[:5])}')
      return None
    for name in ('_CHECKPOINT_METADATA', 'default/_METADATA'):  # Saved before files.json.
      try:
        with open(os.path.join(step_dir, name)) as f:
          json.load(f)
      except FileNotFoundError:
        return f'{name} is missing'
      except ValueError:
        return f'{name} is not valid JSON'
    return None

  def _record_files(self):
    """Writes files.json into every completed checkpoint of this run that has none (process 0)."""
    if jax.process_index() > 0:
      return
    for step in sorted(self.own & set(self.manager.all_steps())):
      step_dir = os.path.join(self.directory, str(step))
      if os.path.exists(os.path.join(step_dir, FILES_RECORD)):
        continue
      sizes = {}
      for root, _, names in os.walk(step_dir):
        for name in names:
          path = os.path.join(root, name)
          sizes[os.path.relpath(path, step_dir)] = os.path.getsize(path)
      files.write_bytes(os.path.join(step_dir, FILES_RECORD), json.dumps(sizes).encode())

  def _set_aside(self, step, problem):
    logging.warning('The checkpoint of step %d is damaged (%s); setting it aside as '
                    '%d.unreadable and trying the previous one.', step, problem, step)
    multihost_utils.sync_global_devices(f'damaged checkpoint {step}')
    if jax.process_index() == 0:
      os.replace(os.path.join(self.directory, str(step)),
                 os.path.join(self.directory, f'{step}.unreadable'))
    multihost_utils.sync_global_devices(f'set aside checkpoint {step}')
    self.manager = self._new_manager()

  def _stored_shapes(self, step):
    metadata = self.manager.item_metadata(step)
    return _shapes(metadata.tree if hasattr(metadata, 'tree') else metadata)

  def restore_latest(self, target, *, partial: bool = False):
    """The newest checkpoint restored into `target`'s structure and shardings, or None.

    partial: restore only the keys of `target` (e.g. {'params': ..., 'step': ...}).
    Raises WorkdirMismatchError when the checkpoint holds another structure, KeyboardInterrupt
    when interrupted, CheckpointRestoreError for other failures with intact files.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    wanted = _shapes(abstract)
    while (step := self.manager.latest_step()) is not None:
      problem = self.damage(step)
      if problem:
        self._set_aside(step, problem)
        continue
      try:
        differences = _structure_differences(self._stored_shapes(step), wanted, partial)
        if differences:
          raise WorkdirMismatchError(
              f'The checkpoint of step {step} in {self.directory} holds another train state '
              f'than this run builds: {"; ".join(differences[:10])}'
              f'{" ..." if len(differences) > 10 else ""}. Nothing was changed. Use the config '
              f'it was trained with (see {HISTORY_FILE}), or a new workdir.')
        if partial:
          restored = ocp.PyTreeCheckpointer().restore(self._item_dir(step), args=ocp.args.PyTreeRestore(
              item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
              partial_restore=True))
        else:
          restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except WorkdirMismatchError:
        raise
      except BaseException as e:  # Orbax wraps what it meets (interrupts too) in Exception.
        self._classify_failure(step, e)
        continue  # Damaged: set aside by _classify_failure.
      self._refuse_non_finite(step, restored)
      self.own.add(step)
      logging.info('Resumed from the checkpoint of step %d.', step)
      return restored
    return None

  def _refuse_non_finite(self, step, restored):
    """Earlier versions saved the state of a diverged step: refuse it, naming the step."""
    params = flax.traverse_util.flatten_dict(restored['params'])
    finite = jax.jit(lambda tree: {k: jnp.isfinite(v).all() for k, v in tree.items()})(
        {'/'.join(k): v for k, v in params.items()})
    bad = sorted(k for k, ok in finite.items() if not bool(ok))
    if bad:
      step_dir = os.path.join(self.directory, str(step))
      raise checkpoint.NonFiniteParametersError(
          f'The checkpoint of step {step} in {self.directory} holds parameters that are not '
          f'finite (NaN or inf) in {len(bad)} of {len(params)} arrays ({", ".join(bad[:3])}'
          f'{" ..." if len(bad) > 3 else ""}): a diverged step was saved. Nothing was changed; '
          f'move it aside (mv {step_dir} {step_dir}.nonfinite) to resume from the one before.')

  def _classify_failure(self, step, error):
    causes = list(_chain(error))
    if any(isinstance(c, (KeyboardInterrupt, SystemExit)) for c in causes):
      raise KeyboardInterrupt(f'interrupted while restoring the checkpoint of step {step}; '
                              'nothing was changed.') from error
    resource = next((c for c in causes if isinstance(c, MemoryError) or (
        isinstance(c, OSError) and c.errno in RESOURCE_ERRORS)), None)
    problem = None if resource else self.damage(step)
    if problem:
      self._set_aside(step, problem)
      return
    why = resource or error
    raise CheckpointRestoreError(
        f'Could not restore the checkpoint of step {step} in {self.directory} '
        f'({type(why).__name__}: {str(why)[:500]}). Its files are complete, so it was left as '
        'it is and nothing was changed; fix the cause and run again.') from error

  # Saving.
  def save(self, step: int, state):
    self.wait(step)  # The previous save: its failure stops the run here, its files get recorded.
    self.saving = step
    self.own.add(step)
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def check_save(self, step: int):
    """Raises, naming the disk error, if the save in flight has failed (cheap: no waiting)."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(e, step)

  def _raise_save_error(self, error, step):
    text = f'{type(error).__name__}: {str(error)[:500]}'
    # The OS's reason goes first: orbax puts it last, after paths that can be long.
    code = re.search(r"os_error_code='?(\d+)", str(error))
    if code:
      text = f'{os.strerror(int(code.group(1)))}; {text}'
    raise CheckpointSaveError(
        f'Saving the checkpoint of step {self.saving} failed ({text}); the run stopped at step '
        f'{step}. Earlier checkpoints are intact: fix the cause (disk space?) and run the same '
        'command to resume.') from error

  def wait(self, step=None):
    """Waits for the save in flight; raises naming its error and `step`, where the run is."""
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(e, self.saving if step is None else step)
    self._record_files()

  def finish_quietly(self):
    """Lets a save in flight complete while another error stops the run (that one is raised)."""
    try:
      self.wait()
    except Exception as e:  # pylint: disable=broad-except
      logging.error('%s', e)


# ----------------------------------------------------------------------------- preemption

_SIGTERM_RECEIVED = []  # Non-empty once this process got SIGTERM while catching it.


def _on_sigterm(signum, frame):
  del signum, frame
  logging.warning('SIGTERM received: stopping after this step with a checkpoint.')
  _SIGTERM_RECEIVED.append(True)


def catch_sigterm():
  """From now on SIGTERM asks the run to stop at its next step with a checkpoint and exit 0,
  wherever it arrives (start-up, compilation, evaluation, export): the command line calls it
  first thing (one process; several: JAX's coordination service receives the signal)."""
  signal.signal(signal.SIGTERM, _on_sigterm)


class Preemption:
  """Whether the run was asked to stop (SIGTERM, as TPU VMs and schedulers send).

  One process: a SIGTERM handler sets a flag. Several: JAX's coordination service receives the
  signal and agrees with every process on the step at which to stop.
  """

  def __init__(self):
    self._previous_handler = None
    if jax.process_count() == 1 and signal.getsignal(signal.SIGTERM) is not _on_sigterm:
      self._previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
      _SIGTERM_RECEIVED.clear()  # A run in this process (a notebook) may have been stopped.

  def close(self):
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return bool(_SIGTERM_RECEIVED)
    return multihost_utils.reached_preemption_sync_point(step)
