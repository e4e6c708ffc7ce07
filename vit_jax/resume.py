"""Resuming a run: its train-state checkpoints (orbax) and preemption (workdir.py: the lock and
the record of configs).

Rules that keep a user's files safe:
- A checkpoint's metadata must hold the state the config builds (after workdir.py's
  `check_compatible`), or the run stops with the difference named.
- A checkpoint is set aside (`<step>.unreadable`) only when its own files are proven damaged:
  missing or shorter than `files.json` (written when the save completed) records, or orbax's
  metadata missing or unparseable. An interrupt, a resource error, a mismatch or a bug stops the
  run and changes nothing.
"""

import errno
import json
import logging
import os
import re
import signal

import flax
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vit_jax import checkpoint, files
from vit_jax.workdir import (CHECKPOINT_DIR, HISTORY_FILE, WorkdirMismatchError,
                             make_writable_directory)

FILES_RECORD = 'files.json'  # In each checkpoint: the size of each of its files.
# errno values that say the machine, not the checkpoint, is at fault.
RESOURCE_ERRORS = (errno.ENOMEM, errno.ENOSPC, errno.EDQUOT, errno.EMFILE, errno.ENFILE,
                   errno.EACCES, errno.EPERM, errno.EAGAIN, errno.ETIMEDOUT, errno.EIO,
                   errno.EROFS)


class CheckpointRestoreError(RuntimeError):
  """A checkpoint with intact files could not be restored (resource error, bug, ...)."""


class CheckpointSaveError(OSError):
  """An asynchronous checkpoint save failed (full disk, ...); the run stops."""


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
