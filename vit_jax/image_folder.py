"""Image folders as datasets (`dataset='folder:<root>'`): their layout, split slicing, and an
index of their files that is listed once and then read from a cache.

Two layouts:
  <root>/<split>/<class>/*.jpg   one directory per split (train, test, ...)
  <root>/<class>/*.jpg           no split directories (as the ImageNet-21k release unpacks):
                                 the whole folder is the split 'train'
Splits take TFDS's slicing, e.g. 'train[:99%]' / 'train[99%:]' to hold out 1% for validation.
Files are ordered by a hash of their path before slicing, so that every slice draws from every
class, and the same files fall in the same slice on every machine and at every start.
"""

import hashlib
import json
import logging
import os
import zipfile

import numpy as np
import tensorflow as tf

from vit_jax import files

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
SPLITLESS = 'train'  # The name of the one split of a folder without split directories.
INDEX_VERSION = 3  # 3: hidden entries ignored.


def _hidden(name: str) -> bool:
  """What tools leave beside the data (.ipynb_checkpoints, .DS_Store, macOS's ._* and
  __MACOSX in unpacked archives): never a class, a split or an image."""
  return name.startswith('.') or name == '__MACOSX'


def _subdirectories(directory: str) -> list:
  return sorted(entry.rstrip('/') for entry in tf.io.gfile.listdir(directory)
                if not _hidden(entry) and
                tf.io.gfile.isdir(os.path.join(directory, entry.rstrip('/'))))


def _is_image(name: str) -> bool:
  return not _hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def layout(root: str):
  """({split name: directory of its class folders}, class names): the class names are the
  sorted union over the splits, so that a class missing from one split keeps its label."""
  if not tf.io.gfile.isdir(root):
    raise ValueError(f'Image folder {root} does not exist (dataset=folder:<dir> names a folder of '
                     '<class>/*.jpg or <split>/<class>/*.jpg).')
  entries = _subdirectories(root)
  if not entries:
    raise ValueError(f'Image folder {root} holds no class folders (<root>/<class>/*.jpg) and '
                     'no split folders (<root>/<split>/<class>/*.jpg).')
  first = os.path.join(root, entries[0])
  if any(_is_image(name) for name in tf.io.gfile.listdir(first)):
    return {SPLITLESS: root}, entries  # The sub-folders hold images: they are the classes.
  splits = {split: os.path.join(root, split) for split in entries}
  classes = sorted(set().union(*(_subdirectories(d) for d in splits.values())))
  return splits, classes


def _signature(directory: str, classes: list):
  """What changes when files are added or removed: the modification times of the class folders
  of a local directory. None for remote ones (no cheap equivalent: delete the index to list
  again)."""
  if '://' in directory:
    return None
  return [os.stat(os.path.join(directory, name)).st_mtime_ns if os.path.isdir(
      os.path.join(directory, name)) else None for name in classes]


def _list(directory: str, classes: list):
  """(paths relative to directory, labels) of every image under directory/<class>/, ordered by a
  hash of the path: arrays of bytes and int32, ~40 bytes a file (ImageNet-21k: ~0.5 GB)."""
  names, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(directory, name)
    if not tf.io.gfile.isdir(class_dir):
      continue
    images = [f'{name}/{f}'.encode() for f in tf.io.gfile.listdir(class_dir) if _is_image(f)]
    if not images:
      raise ValueError(f'Class folder {class_dir} holds no {"/".join(IMAGE_EXTENSIONS)} images.')
    names += images
    labels += [label] * len(images)
  if not names:
    raise ValueError(f'Split folder {directory} holds no class folders with images.')
  order = sorted(range(len(names)), key=lambda i: hashlib.sha1(names[i]).digest())
  return np.array([names[i] for i in order]), np.array(labels, np.int32)[order]


def _read_index(path: str, expected: dict):
  """The index's (names, labels) if it was written for `expected`, else None."""
  try:
    with np.load(path) as index:
      if json.loads(index['about'].item()) == expected:
        return index['names'], index['labels']
  except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
    logging.warning('The file index %s is unreadable (%s).', path, e)
  return None


def indexed_files(directory: str, classes: list, index_dir: str):
  """_list(directory, classes), from the index in index_dir when it is current ('' = no index)."""
  if not index_dir:
    return _list(directory, classes)
  key = hashlib.sha1(os.path.abspath(directory).encode() if '://' not in directory
                     else directory.encode()).hexdigest()[:16]
  path = os.path.join(os.path.expanduser(index_dir), f'{key}.npz')
  expected = {'version': INDEX_VERSION, 'directory': directory, 'classes': classes,
              'signature': _signature(directory, classes)}
  if os.path.exists(path):
    indexed = _read_index(path, expected)
    if indexed is not None:
      return indexed
    logging.info('The file index %s is out of date: listing %s again.', path, directory)
  logging.info('Listing the images of %s (indexed in %s for the next start).', directory, path)
  names, labels = _list(directory, classes)
  temporary = files.temporary_path(path)
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(temporary, 'wb') as f:
      np.savez(f, names=names, labels=labels, about=np.array(json.dumps(expected)))
    os.replace(temporary, path)  # Another process may be writing the same index: no torn file.
  except OSError as e:  # A read-only or full disk costs the next start a listing, not this run.
    logging.warning('Cannot write the file index %s (%s); set folder_index_dir to a writable '
                    "folder, or '' to list at every start.", path, e)
    if os.path.exists(temporary):
      os.remove(temporary)
  return names, labels


def split_files(root: str, split: str, index_dir: str = ''):
  """(paths relative to root as bytes, labels, class names) of `split` ('train', 'test',
  'train[:99%]', ...)."""
  import tensorflow_datasets as tfds
  splits, classes = layout(root)
  try:
    instruction = tfds.core.ReadInstruction.from_spec(split)
  except ValueError as e:
    raise ValueError(f'Split {split!r} of image folder {root}: {e}') from None
  by_split = {}
  for name in {part.split('[')[0].strip() for part in split.split('+')}:
    if name not in splits:
      has = (f'no split folders: its one split is {SPLITLESS!r}' if splits == {SPLITLESS: root}
             else f'the splits {sorted(splits)}')
      raise ValueError(f'Image folder {root} has no split {name!r}; it has {has}.')
    by_split[name] = indexed_files(splits[name], classes, index_dir)
  infos = {name: tfds.core.SplitInfo(name=name, shard_lengths=[len(f[0])], num_bytes=0)
           for name, f in by_split.items()}
  names, labels = [], []
  for part in instruction.to_absolute(infos):
    part_names, part_labels = by_split[part.splitname]
    in_root = os.path.relpath(splits[part.splitname], root)  # The split's folder, or '.'.
    prefix = b'' if in_root == '.' else f'{in_root}/'.encode()
    names.append(np.char.add(prefix, part_names[part.from_:part.to]))
    labels.append(part_labels[part.from_:part.to])
  names, labels = np.concatenate(names), np.concatenate(labels).astype(np.int64)
  if not len(names):
    raise ValueError(f'Split {split!r} of image folder {root} is empty.')
  return names, labels, classes
