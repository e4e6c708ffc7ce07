"""tf.data input pipelines: a source (TFDS, image folder or the embedded digits) read as this
process' disjoint shard, preprocessed, and batched into host-local numpy arrays.

Training batches are a pure function of (seed, step): each epoch is shuffled with a seed derived
from its number, and each example is augmented with a seed derived from its position in the
stream. Resuming at step s therefore rebuilds exactly the batches s, s+1, ... of the first run.
"""

import concurrent.futures
import dataclasses
import logging
import math
import os
from typing import Callable, Iterator, Optional

import jax
import numpy as np
import tensorflow as tf

from vit_jax import config_lib, image_folder, preprocess, vtab_tasks

DIGITS_TEST_EVERY = 5  # The embedded digits' fixed split: every 5th image is a test image.


@dataclasses.dataclass(frozen=True)
class Source:
  """One split of a dataset as this process sees it.

  Random-access sources (digits, image folders) hold every example of the split: training then
  reads one global stream of examples that does not depend on the number of processes, each
  process taking its slice of every global batch. Streamed sources (TFDS) hold this process'
  shard of the split, read in order.
  """
  num_examples: int             # In the whole split, over all processes.
  num_classes: int
  process_index: int = 0
  process_count: int = 1
  examples: Optional[dict] = None            # Random access: {'image', 'label'} arrays.
  stream: Optional[tf.data.Dataset] = None   # Streamed: this process' shard,
  stream_size: int = 0                       # of this many examples.
  multi_label: bool = False                  # 'label' is then a list of class ids.
  find_unreadable: Optional[Callable] = None  # () -> files that fail to decode, for errors.
  encoded: Optional[Callable] = None  # An example's 'image' -> its file's bytes (None: pixels).
  class_names: Optional[tuple] = None  # Label i is class_names[i] (where the dataset says).
  # Dense datasets (dense_pipeline.py): a stored example -> {'image' uint8, its targets}.
  read: Optional[Callable] = None

  def decode(self, image):
    """An example's 'image' -> uint8 (h, w, 3)."""
    return image if self.encoded is None else preprocess.decode(self.encoded(image))

  def shard(self) -> tf.data.Dataset:
    """This process' disjoint share of the split, in order (for evaluation)."""
    if self.stream is not None:
      return self.stream
    return tf.data.Dataset.from_tensor_slices(self.examples).shard(
        self.process_count, self.process_index)


def _digits(split: str, process_index: int, process_count: int) -> Source:
  """The embedded digits' split: 'train', 'test', or slices of them as TFDS writes them
  ('train[:800]', 'train[90%:]', 'train[:10]+test[:10]')."""
  from sklearn.datasets import load_digits  # Bundled with scikit-learn: no download.
  digits = load_digits()
  is_test = np.arange(len(digits.target)) % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)  # Values are 0..16.
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int64)
  parts = {'train': np.flatnonzero(~is_test), 'test': np.flatnonzero(is_test)}
  chosen = np.concatenate([indices for _, indices in slice_split('digits', split, parts)])
  return Source(num_examples=len(chosen), num_classes=10,
                class_names=tuple(str(i) for i in range(10)),
                process_index=process_index, process_count=process_count,
                examples={'image': images[chosen], 'label': labels[chosen]})


def slice_split(dataset: str, split: str, parts: dict) -> list:
  """[(part name, indices)] that `split` selects from `parts` ({name: indices}), sliced as TFDS
  slices ('train', 'train[:80%]', 'train[:10]+test[:10]')."""
  import tensorflow_datasets as tfds
  sizes = {name: tfds.core.SplitInfo(name=name, shard_lengths=[len(indices)], num_bytes=0)
           for name, indices in parts.items()}
  try:
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(sizes)
  except (ValueError, KeyError, AssertionError) as e:
    raise ValueError(f'Unknown split {split!r} of dataset {dataset!r}; expected '
                     f'{" or ".join(map(repr, parts))}, or a slice of them such as '
                     f"'{next(iter(parts))}[:80%]' ({e}).") from None
  return [(i.splitname, np.asarray(parts[i.splitname])[i.from_:i.to]) for i in instructions]


def _vtab(name: str, split: str, process_index: int, process_count: int, config) -> Source:
  """A VTAB-1k task (vtab_tasks.py): its dataset with the label the benchmark defines, read
  through split train800 / val200 / train800val200 / test."""
  task = vtab_tasks.get(name)
  if task.dataset == 'digits':
    tfds_split = vtab_tasks.tfds_split(task, split, {})
    source = _digits(tfds_split, process_index, process_count)
    examples = dict(source.examples)
    if task.label is not None:
      examples['label'] = np.asarray(task.label(examples)).astype(np.int64)
    num_classes = task.num_classes or source.num_classes
    return dataclasses.replace(source, examples=examples, num_classes=num_classes,
                               class_names=source.class_names if task.label is None else
                               tuple(str(i) for i in range(num_classes)))
  builder = tfds_builder(task.dataset, data_dir=config.tfds_data_dir,
                          download=config.tfds_download, manual_dir=config.tfds_manual_dir)
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  return _tfds(builder, vtab_tasks.tfds_split(task, split, sizes), process_index,
               process_count, seed=config.seed, label_key='', task=task)


def _folder(root: str, split: str, process_index: int, process_count: int,
            index_dir: str) -> Source:
  names, labels, classes = image_folder.split_files(root, split, index_dir)
  prefix = os.path.join(root, '')  # Paths are kept relative to it: ~4x less memory.
  return Source(encoded=lambda name: tf.io.read_file(tf.strings.join([prefix, name])),
                num_examples=len(names), num_classes=len(classes), class_names=tuple(classes),
                process_index=process_index, process_count=process_count,
                examples={'image': names, 'label': labels},
                find_unreadable=lambda: unreadable([prefix + n.decode() for n in names]))


def unreadable(paths) -> list:
  """The paths that fail to decode, in order; every file is read, on every core (TF's decoders
  release the GIL)."""
  def fails(path):
    try:
      preprocess.decode(tf.io.read_file(path))
    except tf.errors.OpError:
      return True
    return False

  logging.error('An image failed to decode: reading all %d files of the split to name it.',
                len(paths))
  bad = []
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    for start in range(0, len(paths), 10_000):  # A bounded number of futures at a time.
      chunk = paths[start:start + 10_000]
      bad += [path for path, failed in zip(chunk, pool.map(fails, chunk)) if failed]
  return bad


def numpy_batches(dataset: tf.data.Dataset, source: Source) -> Iterator:
  """The dataset's batches as numpy; a file that fails to decode is named in the error."""
  iterator = dataset.as_numpy_iterator()
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:
      if source.find_unreadable is None:
        raise
      bad = source.find_unreadable()  # tf.data's error does not say which file it was.
      raise ValueError(f'{len(bad)} image file(s) cannot be decoded as JPEG/PNG/GIF/BMP: '
                       f'{", ".join(bad[:10])}{" ..." if len(bad) > 10 else ""}') from e
    yield batch


def tfds_builder(name: str, *, data_dir, download, manual_dir):
  """The TFDS builder of `name`, its dataset prepared (downloaded only where allowed)."""
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'Unknown dataset {name!r}: not "digits", not "folder:<dir>", not '
                     f'"vtab:<task>", and not a TFDS dataset ({e}).') from None
  if not builder.is_prepared():
    if not download:
      raise ValueError(f'TFDS dataset {name!r} is not prepared in {builder.data_dir}; set '
                       'tfds_download=True or tfds_data_dir to where it is.')
    # Datasets behind a licence (ImageNet) are prepared from archives the user downloaded.
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(manual_dir) if manual_dir else None)
    try:
      builder.download_and_prepare(download_config=download_config)
    except AssertionError as e:  # How TFDS says that manual files are missing.
      raise ValueError(f'TFDS dataset {name!r} cannot be prepared: {e}\nPut the files it names '
                       'in one folder and set tfds_manual_dir to it.') from None
  return builder


def _tfds(builder, split: str, process_index: int, process_count: int, *, seed, label_key,
          task: Optional[vtab_tasks.Task] = None) -> Source:
  import tensorflow_datasets as tfds
  name = builder.name
  info = builder.info
  try:
    num_examples = info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise ValueError(f'Unknown split {split!r} of TFDS dataset {name!r}; it has '
                     f'{list(info.splits)} ({e}).') from None
  process_split = tfds.split_for_jax_process(split, process_index=process_index,
                                             process_count=process_count)
  stream_size = info.splits[process_split].num_examples
  # File order is shuffled once per seed, not per epoch, so every epoch reads the same order
  # and resuming at any epoch is exact; examples are shuffled per epoch afterwards.
  read_config = tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=False)
  scale = task.scale_pixels if task else 1  # Decoded here where the pixels need rescaling.
  dataset = builder.as_dataset(
      split=process_split, shuffle_files=True, read_config=read_config,
      decoders=None if scale != 1 else {'image': tfds.decode.SkipDecoding()})
  if task is not None and task.label is not None:  # A VTAB label derived from the example.
    label_of, multi_label = task.label, False
    num_classes, class_names = task.num_classes, tuple(str(i) for i in range(task.num_classes))
  else:
    label_key = label_key or ('label' if 'label' in info.features else 'labels')
    if label_key not in info.features:
      raise ValueError(f'TFDS dataset {name!r} has no feature {label_key!r}; it has '
                       f'{sorted(info.features)}.')
    feature = info.features[label_key]
    multi_label = isinstance(feature, tfds.features.Sequence)  # ImageNet ReaL's real_label.
    class_label = feature.feature if multi_label else feature
    num_classes, class_names = class_label.num_classes, tuple(class_label.names)
    label_of = lambda ex: ex[label_key]
  if scale != 1:
    dataset = dataset.map(lambda ex: {'image': tf.tile(ex['image'] * scale, [1, 1, 3]),
                                      'label': label_of(ex)})
  else:
    dataset = dataset.map(lambda ex: {'image': ex['image'], 'label': label_of(ex)})
  return Source(encoded=None if scale != 1 else lambda image: image, num_examples=num_examples,
                num_classes=num_classes, class_names=class_names,
                process_index=process_index, process_count=process_count, stream=dataset,
                stream_size=stream_size, multi_label=multi_label)


def get_source(config, split: str, *, process_index: int = 0, process_count: int = 1,
               dataset: str = '', label_key: str = '') -> Source:
  """This process' shard of `split` of `dataset` (default config.dataset); a TFDS dataset's
  labels are its feature `label_key` (default 'label', else 'labels')."""
  name = config_lib.official_dataset(dataset or config.dataset)  # A bare directory: a folder.
  if name == 'digits':
    source = _digits(split, process_index, process_count)
  elif name.startswith('folder:'):
    source = _folder(os.path.expanduser(name[len('folder:'):]), split, process_index,
                     process_count, config.folder_index_dir)
  elif name.startswith('vtab:'):
    source = _vtab(name[len('vtab:'):], split, process_index, process_count, config)
  else:
    builder = tfds_builder(name, data_dir=config.tfds_data_dir, download=config.tfds_download,
                            manual_dir=config.tfds_manual_dir)
    source = _tfds(builder, split, process_index, process_count, seed=config.seed,
                   label_key=label_key)
  if source.num_examples < process_count:
    raise ValueError(f'Split {split!r} of {name} has {source.num_examples} examples: too few '
                     f'for {process_count} processes.')
  if (config.num_classes is not None and (dataset or config.dataset) == config.dataset and
      config.num_classes != source.num_classes):
    raise ValueError(f'num_classes={config.num_classes}, but {name} has {source.num_classes}.')
  return source


def _targets(label, num_classes: int, multi_label: bool):
  """One-hot (single label) or multi-hot (list of labels) float targets."""
  if multi_label:  # An empty list gives all zeros (an example that is then not scored).
    return tf.minimum(tf.reduce_sum(tf.one_hot(label, num_classes), axis=0), 1.0)
  return tf.one_hot(label, num_classes)


def global_stream(source: Source, seed: int, batch_size: int, start_step: int):
  """(position, example) of this process' slice of each global batch, from `start_step` on.

  The global stream is every epoch's permutation of the split, one after the other; global batch
  s holds positions [s * B, (s + 1) * B) and process p the p-th of its process_count slices.
  """
  n = source.num_examples
  global_batch = batch_size * source.process_count
  first_epoch, offset = divmod(start_step * global_batch, n)
  examples = {k: tf.constant(v) for k, v in source.examples.items()}

  def epoch(number):
    order = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), number]))
    return tf.data.Dataset.from_tensor_slices(order)

  indices = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)
  indices = indices.enumerate(start=first_epoch * n).skip(offset)
  mine = indices.filter(
      lambda position, _: (position % global_batch) // batch_size == source.process_index)
  return mine.map(lambda position, index: (
      position, {k: tf.gather(v, index) for k, v in examples.items()}))


def shard_stream(source: Source, seed: int, batch_size: int, start_step: int,
                  shuffle_buffer: int):
  """(position, example) of this process' shard, reshuffled each epoch, from `start_step` on."""
  size = source.stream_size
  first_epoch, offset = divmod(start_step * batch_size, size)

  def epoch(number):
    return source.stream.shuffle(min(shuffle_buffer, size), seed=number * 1_000_003 + seed)

  stream = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)
  return stream.enumerate(start=first_epoch * size).skip(offset)


def train_batches(config, source: Source, *, batch_size: int, start_step: int = 0) -> Iterator:
  """Endless host-local numpy training batches {'image', 'labels'} from step `start_step` on."""
  return numpy_batches(train_dataset(config, source, batch_size=batch_size,
                                      start_step=start_step), source)


def train_dataset(config, source: Source, *, batch_size: int,
                  start_step: int = 0) -> tf.data.Dataset:
  """Endless host-local training batches {'image', 'labels'} from step `start_step` on.

  An example's augmentation is seeded by its position in the stream, so the batches are a pure
  function of (seed, step).
  """
  size = config_lib.image_size(config)
  seed = config.seed
  if source.examples is not None:
    stream = global_stream(source, seed, batch_size, start_step)
  else:
    stream = shard_stream(source, seed, batch_size, start_step, config.shuffle_buffer)

  def augment(position, example):
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.stack([tf.cast(seed, tf.int64), position]), 2))
    if source.encoded is None:
      image = preprocess.inception_crop(source.decode(example['image']), size, crop_seed,
                                        min_area=config.pp.crop_min_area,
                                        antialias=config.pp.antialias)
    else:
      image = preprocess.decode_and_inception_crop(source.encoded(example['image']), size,
                                                   crop_seed, min_area=config.pp.crop_min_area,
                                                   antialias=config.pp.antialias)
    if config.pp.flip:
      image = preprocess.random_flip(image, flip_seed)
    if config.pp.randaug_layers:
      image = preprocess.randaugment(image, tf.random.experimental.stateless_fold_in(
          crop_seed, 1), num_layers=config.pp.randaug_layers,
                                     magnitude=config.pp.randaug_magnitude)
    return {'image': preprocess.to_value_range(image, config.pp.mean, config.pp.std),
            'labels': _targets(example['label'], source.num_classes, source.multi_label)}

  dataset = stream.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.batch(batch_size, drop_remainder=True)
  if config.pp.mixup_alpha:  # Within this process' batch; seeded by the step.
    dataset = dataset.enumerate(start=start_step).map(
        lambda step, batch: preprocess.mixup(
            batch, tf.stack([tf.constant(seed, tf.int64), step]), config.pp.mixup_alpha))
  return dataset.prefetch(tf.data.AUTOTUNE)


def eval_steps(source: Source, *, batch_size: int, process_count: int) -> int:
  """Steps that cover the largest process shard; all processes run the same number."""
  return math.ceil(math.ceil(source.num_examples / process_count) / batch_size)


def eval_batches(config, source: Source, *, batch_size: int, num_steps: int) -> Iterator:
  """`num_steps` host-local numpy batches {'image', 'labels', 'mask'} (see eval_dataset)."""
  return numpy_batches(eval_dataset(config, source, batch_size=batch_size, num_steps=num_steps),
                        source)


def eval_dataset(config, source: Source, *, batch_size: int, num_steps: int) -> tf.data.Dataset:
  """`num_steps` host-local batches {'image', 'labels', 'mask'}: every example of the shard once,
  then zero padding with mask 0 (so no example is dropped and none counts twice)."""
  size = config_lib.image_size(config)
  resize = (config.pp.resize_eval,) * 2 if config.pp.resize_eval else size

  def prepare(example):
    image = preprocess.resize_and_central_crop(source.decode(example['image']), resize, size,
                                               antialias=config.pp.antialias)
    return {'image': preprocess.to_value_range(image, config.pp.mean, config.pp.std),
            'labels': _targets(example['label'], source.num_classes, source.multi_label),
            'mask': tf.constant(1.0)}

  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros(size + (3,)), 'labels': tf.zeros([source.num_classes]),
      'mask': tf.constant(0.0)}).repeat(max(0, num_steps * batch_size - shard_size(source)))
  dataset = source.shard().map(prepare, num_parallel_calls=tf.data.AUTOTUNE).concatenate(padding)
  return dataset.batch(batch_size).take(num_steps).prefetch(tf.data.AUTOTUNE)


def shard_size(source: Source) -> int:
  """The number of examples in this process' shard (Source.shard)."""
  if source.stream is not None:
    return source.stream_size
  return len(range(source.process_index, source.num_examples, source.process_count))


# ------------------------------------------------------------ the official repository's names

def get_dataset_info(dataset: str, split: str) -> dict:
  """The official notebook's dataset facts: num_examples, num_classes, int2str (class id ->
  name), examples_glob (None). `dataset` as the official configs name it: a TFDS name, a
  directory of {train,test}/<class>/<image>, or here also 'digits' / 'folder:<dir>'."""
  config = config_lib.base_config()
  config.dataset = dataset
  source = get_source(config, split)
  names = source.class_names or tuple(str(i) for i in range(source.num_classes))
  return {'num_examples': source.num_examples, 'num_classes': source.num_classes,
          'int2str': lambda label: names[label], 'examples_glob': None}


def get_data_from_tfds(*, config, mode: str) -> tf.data.Dataset:
  """The official notebook's data for jax.pmap: batches {'image', 'label' (one-hot)} shaped
  [local devices, batch / devices, ...], from config.dataset (any dataset this pipeline reads)
  and its split config.train_split / test_split (= the official config.pp.train / pp.test).
  'train' is endless and augmented (train_dataset, batch config.batch); 'test' covers the split
  once with batch config.batch_eval, the last batch padded and marked by 'mask' (the official
  pipeline dropped the remainder)."""
  if mode not in ('train', 'test'):
    raise ValueError(f"mode={mode!r}; expected 'train' or 'test'.")
  devices, process_count = jax.local_device_count(), jax.process_count()
  batch_size = (config.batch if mode == 'train' else config.batch_eval) // process_count
  if batch_size % devices:
    raise ValueError(f'The batch per process ({batch_size}) does not divide over the '
                     f'{devices} local devices.')
  split = config.train_split if mode == 'train' else config.test_split
  source = get_source(config, split, process_index=jax.process_index(),
                      process_count=process_count)
  if mode == 'train':
    dataset = train_dataset(config, source, batch_size=batch_size)
  else:
    dataset = eval_dataset(config, source, batch_size=batch_size, num_steps=eval_steps(
        source, batch_size=batch_size, process_count=process_count))

  def per_device(batch):
    batch['label'] = batch.pop('labels')
    return {k: tf.reshape(v, [devices, -1] + v.shape[1:].as_list()) for k, v in batch.items()}

  return dataset.map(per_device)
