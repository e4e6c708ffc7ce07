"""tf.data pipelines for images with class maps, boxes and instance masks (segmentation and
detection), beside input_pipeline.py's classification ones and built on its sources and streams.

Datasets:
  shapes              the embedded synthetic shapes (shapes.py): class maps, boxes, masks
  seg:<dir>, det:<dir>  folders of label maps / COCO-format JSON (dense_folders.py: their
                      layouts, checked in one pass before anything compiles)
  scene_parse150      TFDS ADE20K (150 classes; its 'other' pixels unlabelled)
  coco/2017           TFDS COCO (boxes only: this TFDS build has no instance masks)

Every example is read as {'image' uint8 (h, w, 3)} and 'segmentation' (h, w) or 'boxes' (N, 4)
(ymin, xmin, ymax, xmax in [0, 1]), 'classes' (N,) (-1: no object), 'is_crowd' (N,), 'masks'
(N, h, w). Its geometry is one operation for training and evaluation (`place`): scaled so that
its longer side fits the input (training: times a random factor in pp.scale_range, then a random
crop: scale jitter / random resized crop), padded to the input size, then flipped; class maps,
boxes and masks move with the pixels. Evaluation batches also carry each image's original
targets and size, for metrics at the original resolution.
"""

import os

import numpy as np
import tensorflow as tf

from vit_jax import (config_lib, decoders, dense_folders, input_pipeline, preprocess, segmentation,
                     shapes)
from vit_jax.datasets import DETECTION_TFDS, SEGMENTATION_TFDS, has_boxes, has_class_maps
from vit_jax.input_pipeline import Source

# -------------------------------------------------------------------------------------- sources

def _shapes(split, process_index, process_count, task) -> Source:
  parts = {name: np.arange(size) for name, size in shapes.SPLITS.items()}
  chosen = input_pipeline.slice_split('shapes', split, parts)
  examples = {}
  for name, indices in chosen:
    part = shapes.split_examples(name, indices)
    for k, v in part.items():
      examples.setdefault(k, []).append(v)
  examples = {k: np.concatenate(v) for k, v in examples.items()}
  examples['is_crowd'] = np.zeros_like(examples['classes'])
  if task == 'segmentation':
    examples = {'image': examples['image'], 'segmentation': examples['segmentation']}
    names = shapes.SEGMENTATION_CLASSES
  else:
    examples.pop('segmentation')
    names = shapes.CLASSES
  return Source(num_examples=len(examples['image']), num_classes=len(names),
                class_names=tuple(names), process_index=process_index,
                process_count=process_count, examples=examples, read=dict)


def _tfds_dense(config, name, split, process_index, process_count) -> Source:
  import tensorflow_datasets as tfds
  builder = input_pipeline.tfds_builder(name, data_dir=config.tfds_data_dir,
                                        download=config.tfds_download,
                                        manual_dir=config.tfds_manual_dir)
  try:
    num_examples = builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise ValueError(f'Unknown split {split!r} of TFDS dataset {name!r}; it has '
                     f'{list(builder.info.splits)} ({e}).') from None
  process_split = tfds.split_for_jax_process(split, process_index=process_index,
                                             process_count=process_count)
  dataset = builder.as_dataset(split=process_split, shuffle_files=True, read_config=tfds.ReadConfig(
      shuffle_seed=config.seed, shuffle_reshuffle_each_iteration=False))
  if name in SEGMENTATION_TFDS:
    # ADE20K's label 0 is "other": unlabelled, as in the benchmark; classes 1..150 -> 0..149.
    dataset = dataset.map(lambda ex: {'image': ex['image'], 'segmentation': tf.where(
        ex['annotation'][..., 0] == 0, tf.constant(segmentation.IGNORE, tf.uint8),
        ex['annotation'][..., 0] - 1)})
    num_classes, names = SEGMENTATION_TFDS[name], None
  else:
    label = builder.info.features['objects']['label']
    dataset = dataset.map(lambda ex: {
        'image': ex['image'], 'boxes': ex['objects']['bbox'],
        'classes': tf.cast(ex['objects']['label'], tf.int32),
        'is_crowd': tf.cast(ex['objects']['is_crowd'], tf.int32)})
    num_classes, names = label.num_classes, tuple(label.names)
  return Source(num_examples=num_examples, num_classes=num_classes, class_names=names,
                process_index=process_index, process_count=process_count, stream=dataset,
                stream_size=builder.info.splits[process_split].num_examples, read=dict)


def get_source(config, split: str, *, process_index: int = 0, process_count: int = 1,
               dataset: str = '') -> Source:
  """This process' shard of `split` of a dataset with class maps or boxes."""
  name = dataset or config.dataset
  task = 'segmentation' if config.objective == 'segmentation' else 'detection'
  if name == 'shapes':
    source = _shapes(split, process_index, process_count, task)
  elif name.startswith('seg:'):
    source = dense_folders.segmentation_folder(os.path.expanduser(name[4:]), split, process_index,
                                  process_count, config.num_classes)
  elif name.startswith('det:'):
    source = dense_folders.detection_folder(os.path.expanduser(name[4:]), split, process_index,
                               process_count)
  elif name in SEGMENTATION_TFDS or name in DETECTION_TFDS:
    source = _tfds_dense(config, name, split, process_index, process_count)
  else:
    raise ValueError(f'dataset={name!r} has no class maps or boxes: objective={task} reads '
                     f'"shapes", "seg:<dir>", "det:<dir>", {", ".join(SEGMENTATION_TFDS)} or '
                     f'{", ".join(DETECTION_TFDS)}.')
  if task == 'segmentation' and not has_class_maps(name):
    raise ValueError(f'dataset={name!r} has boxes, not class maps: objective=segmentation '
                     'needs a dataset with class maps (shapes, seg:<dir>, scene_parse150).')
  if task == 'detection' and not has_boxes(name):
    raise ValueError(f'dataset={name!r} has class maps, not boxes: objective=detection needs '
                     'a dataset with boxes (shapes, det:<dir>, coco/2017).')
  if (config.num_classes is not None and name == config.dataset and
      config.num_classes != source.num_classes):
    raise ValueError(f'num_classes={config.num_classes}, but {name} has {source.num_classes}.')
  return source


# ------------------------------------------------------------------------------------ geometry

def _resize_nearest(x, size):
  return tf.image.resize(x, size, method='nearest')


def place(example, size, *, scale, offset, flip, max_objects: int):
  """The example on the input canvas `size`: scaled by `scale` (relative to its longer side
  fitting the canvas), its window at `offset` (pixels of the scaled image, multiples of
  decoders.MASK_STRIDE) cropped, padded bottom and right (pixels 0 after normalisation, class
  maps IGNORE), mirrored if `flip`. Boxes in canvas pixels; objects cropped away or crowds:
  class -1; instance masks at 1/MASK_STRIDE of the canvas."""
  image = example['image']
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  canvas = tf.constant(size, tf.float32)
  factor = tf.reduce_min(canvas / hw) * scale
  scaled = tf.maximum(tf.cast(tf.round(hw * factor), tf.int32), 1)
  offset = tf.cast(offset, tf.int32)
  out = {}

  def fit(x, fill, stride=1):
    """Crops the window of the (scaled) map x at offset / stride, pads to size / stride."""
    target = [s // stride for s in size]
    x = x[offset[0] // stride:offset[0] // stride + target[0],
          offset[1] // stride:offset[1] // stride + target[1]]
    pad = [[0, target[0] - tf.shape(x)[0]], [0, target[1] - tf.shape(x)[1]]]
    x = tf.pad(x, pad + [[0, 0]] * (len(x.shape) - 2), constant_values=fill)
    if flip:
      x = tf.reverse(x, [1])
    return x

  pixels = tf.image.resize(tf.cast(image, tf.float32), scaled, antialias=True)
  out['image'] = fit(pixels / 255.0, 0.0)  # Normalised by the caller; padding set there.
  out['valid'] = fit(tf.ones(tf.concat([scaled, [1]], 0)), 0.0)[..., 0]
  if 'segmentation' in example:
    labels = _resize_nearest(example['segmentation'][..., None], scaled)[..., 0]
    out['segmentation'] = fit(labels, tf.constant(segmentation.IGNORE, labels.dtype))
  if 'boxes' in example:
    pixels_yx = tf.cast(tf.tile(scaled, [2]), tf.float32)
    boxes = example['boxes'] * pixels_yx - tf.cast(tf.tile(offset, [2]), tf.float32)
    boxes = tf.clip_by_value(boxes, 0.0, tf.cast(tf.tile(size, [2]), tf.float32))
    if flip:
      boxes = tf.stack([boxes[:, 0], size[1] - boxes[:, 3], boxes[:, 2], size[1] - boxes[:, 1]], 1)
    hw_box = boxes[:, 2:] - boxes[:, :2]
    kept = ((tf.reduce_min(hw_box, -1) >= 2.0) & (example['classes'] >= 0) &
            (example['is_crowd'] == 0))
    classes = tf.where(kept, example['classes'], -1)
    out['boxes'] = _pad_rows(boxes, max_objects, 0.0)
    out['classes'] = _pad_rows(classes, max_objects, -1)
    if 'masks' in example:
      stride = decoders.MASK_STRIDE
      masks = tf.transpose(example['masks'], [1, 2, 0])
      # One more (blank) channel: an image without objects has none, which resizing refuses.
      masks = tf.concat([masks, tf.zeros(tf.concat([tf.shape(masks)[:2], [1]], 0),
                                         masks.dtype)], -1)
      masks = _resize_nearest(masks, tf.maximum(scaled // stride, 1))[..., :-1]
      masks = tf.transpose(fit(masks, tf.constant(0, masks.dtype), stride), [2, 0, 1])
      out['masks'] = _pad_rows(masks, max_objects, 0)
  return out


def _pad_rows(x, rows: int, fill):
  x = x[:rows]
  pad = [[0, rows - tf.shape(x)[0]]] + [[0, 0]] * (len(x.shape) - 1)
  return tf.pad(x, pad, constant_values=fill)


def _normalised(placed, config):
  image = preprocess.to_value_range(placed['image'] * 255.0, config.pp.mean, config.pp.std)
  return image * placed['valid'][..., None]  # Padding is 0 after normalisation (ViTDet's).


def train_dataset(config, source: Source, *, batch_size: int,
                  start_step: int = 0) -> tf.data.Dataset:
  """Endless host-local batches {'image', 'labels': {'segmentation'} or {'boxes', 'classes',
  ('masks')}} from step `start_step` on, a pure function of (seed, step)."""
  size = config_lib.image_size(config)
  seed = config.seed
  low, high = config.pp.scale_range
  if source.examples is not None:
    stream = input_pipeline.global_stream(source, seed, batch_size, start_step)
  else:
    stream = input_pipeline.shard_stream(source, seed, batch_size, start_step,
                                         config.shuffle_buffer)
  stride = decoders.MASK_STRIDE

  def augment(position, stored):
    example = source.read(stored)
    scale_seed, crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(
        tf.stack([tf.cast(seed, tf.int64), position]), 3))
    scale = tf.random.stateless_uniform([], scale_seed, low, high)
    hw = tf.cast(tf.shape(example['image'])[:2], tf.float32)
    scaled = tf.round(hw * tf.reduce_min(tf.constant(size, tf.float32) / hw) * scale)
    room = tf.cast(tf.maximum(scaled - tf.constant(size, tf.float32), 0) // stride, tf.int32)
    offset = tf.random.stateless_uniform([2], crop_seed, 0, tf.int32.max, tf.int32) % (
        room + 1) * stride
    flip = tf.logical_and(tf.constant(config.pp.flip),
                          tf.random.stateless_uniform([], flip_seed) < 0.5)
    placed = tf.cond(flip, lambda: _place(example, size, scale, offset, True, config),
                     lambda: _place(example, size, scale, offset, False, config))
    return {'image': _normalised(placed, config),
            'labels': {k: v for k, v in placed.items() if k not in ('image', 'valid')}}

  dataset = stream.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _place(example, size, scale, offset, flip, config):
  return place(example, size, scale=scale, offset=offset, flip=flip,
               max_objects=config.max_objects)


def canvas(image: np.ndarray, config):
  """One uint8 image (h, w, 3) as evaluation places it: (normalised canvas, scale)."""
  size = config_lib.image_size(config)
  placed = place({'image': tf.constant(image)}, size, scale=1.0, offset=tf.zeros([2], tf.int32),
                 flip=False, max_objects=1)
  return (_normalised(placed, config).numpy(),
          float(min(s / side for s, side in zip(size, image.shape[:2]))))


def train_batches(config, source: Source, *, batch_size: int, start_step: int = 0):
  return input_pipeline.numpy_batches(train_dataset(config, source, batch_size=batch_size,
                                                    start_step=start_step), source)


def eval_batches(config, source: Source, *, batch_size: int, num_steps: int):
  """`num_steps` host-local numpy batches: 'image' (the canvas, no augmentation), 'mask' (1:
  an example, 0: padding), 'scale' (canvas pixels per original pixel), 'original_size' (h, w),
  and the original targets: 'segmentation' (padded with IGNORE) or 'boxes' (normalised),
  'classes', 'is_crowd', 'masks' (padded with -1 / 0)."""
  size = config_lib.image_size(config)

  def prepare(stored):
    example = source.read(stored)
    placed = _place(example, size, 1.0, tf.zeros([2], tf.int32), False, config)
    hw = tf.shape(example['image'])[:2]
    out = {'image': _normalised(placed, config), 'mask': tf.constant(1.0),
           'scale': tf.reduce_min(tf.constant(size, tf.float32) / tf.cast(hw, tf.float32)),
           'original_size': hw}
    for key in ('segmentation', 'boxes', 'classes', 'is_crowd', 'masks'):
      if key in example:
        out[key] = example[key]
    return out

  dataset = source.shard().map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  spec = dataset.element_spec
  filler = {'segmentation': segmentation.IGNORE, 'classes': -1}
  padding_values = {k: tf.constant(filler.get(k, 0), v.dtype) for k, v in spec.items()}
  blank = {k: tf.zeros([0 if d is None else d for d in v.shape], v.dtype)
           for k, v in spec.items()}
  blank['image'] = tf.zeros(size + (3,))
  blank['scale'] = tf.constant(1.0)
  blank['original_size'] = tf.ones([2], tf.int32)
  missing = max(0, num_steps * batch_size - input_pipeline.shard_size(source))
  dataset = dataset.concatenate(tf.data.Dataset.from_tensors(blank).repeat(missing))
  dataset = dataset.padded_batch(batch_size, padding_values=padding_values).take(num_steps)
  return input_pipeline.numpy_batches(dataset.prefetch(tf.data.AUTOTUNE), source)
