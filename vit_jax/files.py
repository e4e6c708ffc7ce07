"""Writing files without touching the user's.

Every write goes first to a temporary name that only this codebase makes
(`<folder>/.<name>.vit_jax-tmp-<pid>`), then becomes the real name in one step:

- `write_bytes` replaces: for files a run owns (its workdir's records, its export).
- `create` / `create_dir` take a name only while nothing holds it. The check and the take are
  one system call (`link`, `mkdir`), so a file that appears while a conversion runs, or a
  dangling symlink, is never replaced.
- `OutputFolder` is a folder a user names for figures and drawings: a name is written when it is
  new, or when a command wrote it there before (recorded in `.vit_jax-outputs.json` with its
  digest) and nobody has changed it since; anything else stays byte for byte as it was.

Paths with a scheme (`gs://...`) go through tf.io.gfile, which has no atomic create: their
existence is checked before the work starts and again just before the upload.
"""

import collections
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Callable, Iterable

TEMPORARY = '.vit_jax-tmp-'
_TEMPORARY_NAME = re.compile(r'^\.(?P<name>.+)' + re.escape(TEMPORARY) + r'(?P<pid>\d+)$')
RECORD = '.vit_jax-outputs.json'


def is_remote(path: str) -> bool:
  return '://' in path


def _gfile():
  import tensorflow as tf  # Only remote paths pay for importing TensorFlow.
  return tf.io.gfile


def temporary_path(path: str) -> str:
  head, tail = os.path.split(path.rstrip('/'))
  return os.path.join(head, f'.{tail}{TEMPORARY}{os.getpid()}')


def _remove_quietly(path: str):
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


def exists(path: str) -> bool:
  """Whether anything holds the name, a dangling symlink included."""
  return _gfile().exists(path) if is_remote(path) else os.path.lexists(path)


def check_new(path: str, what: str = 'file'):
  """Refuses, before any work, a destination that exists or whose folder does not."""
  if exists(path):
    raise FileExistsError(f'{path} exists: name a new {what} (nothing is ever overwritten; '
                          'nothing was written).')
  parent = os.path.dirname(path.rstrip('/'))
  if parent and not is_remote(path) and not os.path.isdir(parent):
    raise FileNotFoundError(f'{path}: its folder {parent} does not exist (create it first; '
                            'nothing was written).')


def write_bytes(path: str, data: bytes):
  """Writes or replaces `path` atomically: a reader never sees half a file, and a full disk or
  an interrupt leaves the old file as it was."""
  if is_remote(path):
    with _gfile().GFile(path, 'wb') as f:
      f.write(data)
    return
  temporary = temporary_path(path)
  try:
    with open(temporary, 'wb') as f:
      f.write(data)
    os.replace(temporary, path)
  finally:
    _remove_quietly(temporary)


def _take_name(temporary: str, path: str):
  """Gives the finished file `temporary` the name `path` if nothing holds it (one system call)."""
  try:
    os.link(temporary, path)
  except FileExistsError:
    raise FileExistsError(f'{path} appeared while it was being written: it was kept as it is '
                          '(nothing was written).') from None
  except OSError:  # A file system without hard links: claim the name, then fill it.
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    os.replace(temporary, path)


def create(path: str, write: Callable[[str], None]):
  """A new file `path`, written by `write(temporary_path)`; an existing `path` is never replaced."""
  check_new(path)
  if is_remote(path):
    local = tempfile.mkdtemp(prefix='vit_jax-')
    try:
      write(os.path.join(local, 'file'))
      check_new(path)  # gfile has no atomic create: look again just before the upload.
      _gfile().copy(os.path.join(local, 'file'), path, overwrite=False)
    finally:
      shutil.rmtree(local, ignore_errors=True)
    return
  temporary = temporary_path(path)
  try:
    write(temporary)
    _take_name(temporary, path)
  finally:
    _remove_quietly(temporary)


def create_dir(path: str, fill: Callable[[str], None]):
  """A new folder `path`, filled by `fill(temporary_folder)`; an existing `path` is never touched."""
  check_new(path, 'folder')
  path = path.rstrip('/')
  if is_remote(path):
    local = tempfile.mkdtemp(prefix='vit_jax-')
    try:
      fill(local)
      check_new(path, 'folder')
      gfile = _gfile()
      gfile.makedirs(path)
      for name in sorted(os.listdir(local)):
        gfile.copy(os.path.join(local, name), f'{path}/{name}', overwrite=False)
    finally:
      shutil.rmtree(local, ignore_errors=True)
    return
  temporary = temporary_path(path)
  os.mkdir(temporary)
  try:
    fill(temporary)
    try:
      os.mkdir(path)  # Claims the name; fails if anything holds it.
    except FileExistsError:
      raise FileExistsError(f'{path} appeared while it was being written: it was kept as it '
                            'is (nothing was written).') from None
    try:
      os.rename(temporary, path)  # Onto the empty folder just made: replaces only that.
    except OSError:
      try:
        os.rmdir(path)
      except OSError:
        pass  # Someone put files into it meanwhile: theirs now.
      raise
  finally:
    _remove_quietly(temporary)


def remove_temporaries(folder: str) -> list:
  """Deletes what a killed writer of this codebase left in `folder` (only names of the form
  `temporary_path` makes); returns the names of the files they were for."""
  removed = []
  for name in os.listdir(folder):
    match = _TEMPORARY_NAME.match(name)
    if match:
      _remove_quietly(os.path.join(folder, name))
      removed.append(match['name'])
  return removed


def digest(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


class OutputFolder:
  """A user's folder for a command's outputs (see the module docstring)."""

  def __init__(self, path: str):
    if is_remote(path):
      raise ValueError(f'{path}: write figures and drawings to a local folder.')
    if os.path.lexists(path) and not os.path.isdir(path):
      raise ValueError(f'{path} is a file, not a directory: name a directory (the file is left '
                       'as it is).')
    self.path = path
    self.record_path = os.path.join(path, RECORD)
    self.record = {}
    if os.path.lexists(self.record_path):
      try:
        with open(self.record_path) as f:
          self.record = json.load(f)['written']
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f'{self.record_path} is not the record vit_jax keeps of the files it '
                         f'wrote there ({type(e).__name__}: {e}); move it away or name another '
                         'folder.') from None

  def owns(self, name: str) -> bool:
    """Whether `name` is a file a command wrote here and nobody changed since."""
    path = os.path.join(self.path, name)
    return (name in self.record and os.path.isfile(path) and not os.path.islink(path) and
            digest(path) == self.record[name])

  def check(self, names: Iterable[str]):
    """Refuses, before any work, names that something else holds (and names asked twice)."""
    names = list(names)
    twice = sorted(n for n, count in collections.Counter(names).items() if count > 1)
    if twice:
      raise ValueError(f'Two inputs would both be written to {os.path.join(self.path, twice[0])}'
                       f'{f" (and {len(twice) - 1} more names)" if len(twice) > 1 else ""}: '
                       'rename one of them or run them separately (nothing was written).')
    taken = [n for n in names if os.path.lexists(os.path.join(self.path, n)) and
             not self.owns(n)]
    if taken:
      raise FileExistsError(
          f'{", ".join(os.path.join(self.path, n) for n in taken[:3])}'
          f'{f" and {len(taken) - 3} more" if len(taken) > 3 else ""} already exist and were not '
          'written by vit_jax here (or were changed since): they are never overwritten. Name '
          'another folder, or move them away (nothing was written).')

  def write(self, name: str, write: Callable[[str], None]) -> str:
    """Writes `name` through `write(temporary_path)`; returns its path."""
    os.makedirs(self.path, exist_ok=True)
    path = os.path.join(self.path, name)
    temporary = temporary_path(path)
    try:
      write(temporary)
      if self.owns(name):
        os.replace(temporary, path)
      else:
        _take_name(temporary, path)
    finally:
      _remove_quietly(temporary)
    self.record[name] = digest(path)
    self._save()
    return path

  def remove(self, name: str):
    """Deletes `name` only if it is this folder's own output, unchanged."""
    if self.owns(name):
      os.remove(os.path.join(self.path, name))
      del self.record[name]
      self._save()

  def _save(self):
    write_bytes(self.record_path, json.dumps({'written': self.record}, indent=1).encode())
