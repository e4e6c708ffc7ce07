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

import tensorflow as tf

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
SPLITLESS = 'train'  # The name of the one split of a folder without split directories.
INDEX_VERSION = 1


def _subdirectories(directory: str) -> list:
  return sorted(entry.rstrip('/') for entry in tf.io.gfile.listdir(directory)
                if tf.io.gfile.isdir(os.path.join(directory, entry.rstrip('/'))))


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


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


def _list(directory: str, classes: list) -> list:
  """[relative path, label] of every image under directory/<class>/, ordered by path hash."""
  files = []
  for label, name in enumerate(classes):
    class_dir = os.path.join(directory, name)
    if not tf.io.gfile.isdir(class_dir):
      continue
    images = [f for f in tf.io.gfile.listdir(class_dir) if _is_image(f)]
    if not images:
      raise ValueError(f'Class folder {class_dir} holds no {"/".join(IMAGE_EXTENSIONS)} images.')
    files += [[f'{name}/{f}', label] for f in images]
  if not files:
    raise ValueError(f'Split folder {directory} holds no class folders with images.')
  return sorted(files, key=lambda item: hashlib.sha1(item[0].encode()).hexdigest())


def indexed_files(directory: str, classes: list, index_dir: str) -> list:
  """_list(directory, classes), from the index in index_dir when it is current ('' = no index)."""
  if not index_dir:
    return _list(directory, classes)
  key = hashlib.sha1(os.path.abspath(directory).encode() if '://' not in directory
                     else directory.encode()).hexdigest()[:16]
  path = os.path.join(os.path.expanduser(index_dir), f'{key}.json')
  expected = {'version': INDEX_VERSION, 'directory': directory, 'classes': classes,
              'signature': _signature(directory, classes)}
  if os.path.exists(path):
    with open(path) as f:
      index = json.load(f)
    if {k: index.get(k) for k in expected} == expected:
      return index['files']
    logging.info('The file index %s is out of date: listing %s again.', path, directory)
  logging.info('Listing the images of %s (indexed in %s for the next start).', directory, path)
  files = _list(directory, classes)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  temporary = f'{path}.tmp-{os.getpid()}'
  with open(temporary, 'w') as f:
    json.dump(dict(expected, files=files), f)
  os.replace(temporary, path)  # Another process may be writing the same index: no torn file.
  return files


def split_files(root: str, split: str, index_dir: str = ''):
  """(paths, labels, class names) of `split` ('train', 'test', 'train[:99%]', ...)."""
  import tensorflow_datasets as tfds
  splits, classes = layout(root)
  try:
    instruction = tfds.core.ReadInstruction.from_spec(split)
  except ValueError as e:
    raise ValueError(f'Split {split!r} of image folder {root}: {e}') from None
  files = {}
  for name in {part.split('[')[0].strip() for part in split.split('+')}:
    if name not in splits:
      has = (f'no split folders: its one split is {SPLITLESS!r}' if splits == {SPLITLESS: root}
             else f'the splits {sorted(splits)}')
      raise ValueError(f'Image folder {root} has no split {name!r}; it has {has}.')
    files[name] = indexed_files(splits[name], classes, index_dir)
  infos = {name: tfds.core.SplitInfo(name=name, shard_lengths=[len(f)], num_bytes=0)
           for name, f in files.items()}
  paths, labels = [], []
  for part in instruction.to_absolute(infos):
    for relative, label in files[part.splitname][part.from_:part.to]:
      paths.append(os.path.join(splits[part.splitname], relative))
      labels.append(label)
  if not paths:
    raise ValueError(f'Split {split!r} of image folder {root} is empty.')
  return paths, labels, classes
