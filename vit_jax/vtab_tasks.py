"""VTAB-1k (Zhai et al. 2019): the 19 tasks of the ViT paper's Table 2 and Fig. 3, as the
benchmark's task_adaptation code defines them: the TFDS dataset, the label (a feature, or one
derived from the example), and the four splits of the 1k protocol:

  train800        the first 800 examples of the benchmark's training split
  val200          200 examples of its validation split (the first 200 after the training ones
                  where the dataset has no validation split of its own)
  train800val200  both: what the chosen learning rate is trained on
  test            the benchmark's test split

Read by `input_pipeline.get_source(dataset='vtab:<task>')`; swept by `vit_jax.vtab`. Two offline
tasks on the embedded digits ('digits', 'digits_parity') exercise the same path without TFDS.
"""

from typing import Callable, NamedTuple, Optional

import numpy as np
import tensorflow as tf

SPLITS = ('train800', 'val200', 'train800val200', 'test')
GROUPS = ('natural', 'specialized', 'structured')


class Task(NamedTuple):
  name: str
  group: str
  dataset: str  # TFDS name ('digits': the embedded digits).
  splits: Callable[[dict], dict]  # {TFDS split: size} -> {VTAB split: TFDS split string}
  num_classes: Optional[int] = None  # None: the label feature's.
  label: Optional[Callable] = None  # example -> label (tf or numpy); None: example['label'].
  scale_pixels: int = 1  # dSprites stores 0/1 pixels.


def _validation_split(sizes: dict) -> dict:
  """The dataset has train / validation / test splits."""
  del sizes
  return {'train800': 'train[:800]', 'val200': 'validation[:200]',
          'train800val200': 'train[:800]+validation[:200]', 'test': 'test'}


def _held_out(train_percent: int, test: Optional[str] = 'test', val_percent: int = 0):
  """Only a training split (and maybe a test split): its first train_percent% are "train", the
  rest (or the next val_percent%) "val", and the test split is `test` or else what follows."""
  def splits(sizes: dict) -> dict:
    total = sizes['train']
    train = train_percent * total // 100
    val = f'train[{train}:{train + 200}]'
    return {'train800': 'train[:800]', 'val200': val, 'train800val200': f'train[:800]+{val}',
            'test': test or f'train[{train + val_percent * total // 100}:]'}
  return splits


def _smallnorb_splits(sizes: dict) -> dict:
  del sizes  # Its test split's first half is the validation split.
  return {'train800': 'train[:800]', 'val200': 'test[:200]',
          'train800val200': 'train[:800]+test[:200]', 'test': 'test[50%:]'}


def _digits_splits(sizes: dict) -> dict:
  del sizes
  return {'train800': 'train[:800]', 'val200': 'train[800:1000]',
          'train800val200': 'train[:1000]', 'test': 'test'}


def _bin(value, thresholds):
  """The index of the last threshold below `value`."""
  return tf.reduce_max(tf.where(np.asarray(thresholds, np.float32) - value < 0))


def clevr_count(example):
  """The number of objects (3 to 10) as 8 classes."""
  return tf.size(example['objects']['size'], out_type=tf.int64) - 3


def clevr_distance(example):
  """The depth of the closest object, in 6 bins."""
  depth = tf.reduce_min(example['objects']['pixel_coords'][:, 2])
  return _bin(depth, [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])


def kitti_distance(example):
  """The distance to the closest vehicle (car, van, truck: types 0-2), in 4 bins (the last: no
  vehicle)."""
  objects = example['objects']
  depths = tf.boolean_mask(objects['location'][:, 2], objects['type'] < 3)
  depth = tf.reduce_min(tf.concat([depths, [1000.0]], axis=0))
  return _bin(depth, [-100.0, 8.0, 20.0, 999.0])


def dsprites(attribute: str, num_original: int, num_classes: int = 16):
  """An attribute's classes merged into `num_classes` equal bins."""
  factor = num_original / num_classes
  return lambda example: tf.cast(
      tf.math.floordiv(tf.cast(example[attribute], tf.float32), factor), tf.int64)


def feature(name: str):
  return lambda example: example[name]


TASKS = {task.name: task for task in [
    # Natural.
    Task('caltech101', 'natural', 'caltech101', _held_out(90)),
    Task('cifar100', 'natural', 'cifar100', _held_out(90)),
    Task('dtd', 'natural', 'dtd', _validation_split),
    Task('oxford_flowers102', 'natural', 'oxford_flowers102', _validation_split),
    Task('oxford_iiit_pet', 'natural', 'oxford_iiit_pet', _held_out(80)),
    Task('sun397', 'natural', 'sun397/tfds', _validation_split),
    Task('svhn', 'natural', 'svhn_cropped', _held_out(90)),
    # Specialized.
    Task('patch_camelyon', 'specialized', 'patch_camelyon', _validation_split),
    Task('eurosat', 'specialized', 'eurosat/rgb', _held_out(60, test=None, val_percent=20)),
    Task('resisc45', 'specialized', 'resisc45', _held_out(60, test=None, val_percent=20)),
    Task('diabetic_retinopathy', 'specialized', 'diabetic_retinopathy_detection/btgraham-300',
         _validation_split),
    # Structured.
    Task('clevr_count', 'structured', 'clevr', _held_out(90, test='validation'), 8,
         clevr_count),
    Task('clevr_distance', 'structured', 'clevr', _held_out(90, test='validation'), 6,
         clevr_distance),
    Task('dmlab', 'structured', 'dmlab', _validation_split),
    Task('dsprites_location', 'structured', 'dsprites', _held_out(80, None, 10), 16,
         dsprites('label_x_position', 32), scale_pixels=255),
    Task('dsprites_orientation', 'structured', 'dsprites', _held_out(80, None, 10), 16,
         dsprites('label_orientation', 40), scale_pixels=255),
    Task('kitti_distance', 'structured', 'kitti', _validation_split, 4, kitti_distance),
    Task('smallnorb_azimuth', 'structured', 'smallnorb', _smallnorb_splits, 18,
         feature('label_azimuth')),
    Task('smallnorb_elevation', 'structured', 'smallnorb', _smallnorb_splits, 9,
         feature('label_elevation')),
]}
VTAB_1K = tuple(TASKS)  # The 19 tasks, in the paper's order.
OFFLINE = {task.name: task for task in [  # The embedded digits, for demos and tests.
    Task('digits', 'offline', 'digits', _digits_splits),
    Task('digits_parity', 'offline', 'digits', _digits_splits, 2,
         lambda example: example['label'] % 2),
]}


def get(name: str) -> Task:
  task = TASKS.get(name) or OFFLINE.get(name)
  if task is None:
    raise ValueError(f'Unknown VTAB task {name!r}; expected one of '
                     f'{", ".join(list(TASKS) + list(OFFLINE))}.')
  return task


def tfds_split(task: Task, split: str, sizes: dict) -> str:
  """The TFDS split string of a VTAB split, given the dataset's {split: size}."""
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r} of VTAB task {task.name!r}; expected one of '
                     f'{SPLITS}.')
  return task.splits(sizes)[split]
