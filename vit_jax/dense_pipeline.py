"""tf.data pipelines for images with class maps, boxes and instance masks (segmentation and
detection), beside input_pipeline.py's classification ones and built on its sources and streams.

Datasets:
  shapes              the embedded synthetic shapes (shapes.py): class maps, boxes, masks
  seg:<dir>           <dir>/images/<split>/<name>.{jpg,png} with <dir>/masks/<split>/<name>.png
                      (PNG label maps, 255 = unlabelled; without <split> folders, the split is
                      'train'), and <dir>/classes.txt, class i's name on line i
  det:<dir>           COCO-format JSON <dir>/annotations/{,instances_}<split>.json, images in
                      <dir>/<split>/ (the COCO download: det:~/coco with split 'val2017');
                      polygons and RLEs give the instance masks
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

import json
import os

import numpy as np
import tensorflow as tf

from vit_jax import config_lib, decoders, input_pipeline, preprocess, segmentation, shapes
from vit_jax.datasets import DETECTION_TFDS, SEGMENTATION_TFDS, has_boxes, has_class_maps
from vit_jax.input_pipeline import Source

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


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


def _files(directory):
  return sorted(f for f in os.listdir(directory) if not f.startswith('.'))


def _segmentation_folder(root, split, process_index, process_count, num_classes) -> Source:
  classes_file = os.path.join(root, 'classes.txt')
  names = None
  if os.path.exists(classes_file):
    with open(classes_file) as f:
      names = tuple(line.strip() for line in f if line.strip())
  elif num_classes is None:
    raise ValueError(f'seg:{root} has no classes.txt (class i\'s name on line i) and '
                     'num_classes is not set: one of them must say how many classes there are.')
  split_name = split.split('[')[0].split('+')[0]
  images_dir, masks_dir = os.path.join(root, 'images'), os.path.join(root, 'masks')
  if not os.path.isdir(images_dir) or not os.path.isdir(masks_dir):
    raise ValueError(f'seg:{root} needs the folders images/ and masks/ (PNG label maps).')
  has_splits = os.path.isdir(os.path.join(images_dir, split_name))
  if has_splits:
    images_dir, masks_dir = (os.path.join(d, split_name) for d in (images_dir, masks_dir))
  images = [f for f in _files(images_dir) if f.lower().endswith(IMAGE_EXTENSIONS)]
  stems = {os.path.splitext(f)[0]: f for f in images}
  masks = {os.path.splitext(f)[0]: f for f in _files(masks_dir) if f.lower().endswith('.png')}
  unmatched = sorted(set(stems) ^ set(masks))
  if unmatched:
    raise ValueError(f'seg:{root}: {len(unmatched)} image(s) without a mask or masks without '
                     f'an image in {images_dir} / {masks_dir}, e.g. {unmatched[:5]} (each '
                     'image needs <name>.png in masks/).')
  order = sorted(stems)
  chosen = input_pipeline.slice_split(f'seg:{root}', split, {
      split_name if has_splits else 'train': np.arange(len(order))})
  keep = np.concatenate([indices for _, indices in chosen])
  image_paths = np.array([os.path.join(images_dir, stems[order[i]]) for i in keep])
  mask_paths = np.array([os.path.join(masks_dir, masks[order[i]]) for i in keep])

  def read(example):
    image = preprocess.decode(tf.io.read_file(example['image']))
    label = tf.io.decode_png(tf.io.read_file(example['segmentation']), channels=1)[..., 0]
    return {'image': image, 'segmentation': label}

  return Source(num_examples=len(keep), num_classes=num_classes or len(names),
                class_names=names, process_index=process_index, process_count=process_count,
                examples={'image': image_paths, 'segmentation': mask_paths}, read=read,
                find_unreadable=lambda: input_pipeline.unreadable(list(image_paths)))


def _coco_json(root, split):
  for name in (f'{split}.json', f'instances_{split}.json'):
    path = os.path.join(root, 'annotations', name)
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
  raise ValueError(f'det:{root} has no annotations/{split}.json or '
                   f'annotations/instances_{split}.json (COCO format).')


def _detection_folder(root, split, process_index, process_count) -> Source:
  split_name = split.split('[')[0]
  coco = _coco_json(root, split_name)
  categories = sorted(coco['categories'], key=lambda c: c['id'])
  class_of = {c['id']: i for i, c in enumerate(categories)}
  by_image = {}
  for annotation in coco.get('annotations', []):
    by_image.setdefault(annotation['image_id'], []).append(annotation)
  images = sorted(coco['images'], key=lambda image: image['id'])
  chosen = input_pipeline.slice_split(f'det:{root}', split,
                                      {split_name: np.arange(len(images))})
  images = [images[i] for _, indices in chosen for i in indices]
  # Annotations are kept as JSON per image: boxes and masks are made where the image is read.
  records = [json.dumps({'height': image['height'], 'width': image['width'], 'objects': [
      {'bbox': a['bbox'], 'class': class_of[a['category_id']], 'iscrowd': a.get('iscrowd', 0),
       'segmentation': a.get('segmentation')} for a in by_image.get(image['id'], [])]})
             for image in images]
  paths = np.array([os.path.join(root, split_name, image['file_name']) for image in images])

  def objects(record):
    from pycocotools import mask as mask_utils
    record = json.loads(np.asarray(record).item())
    h, w = record['height'], record['width']
    boxes, classes, crowd, masks = [], [], [], []
    for o in record['objects']:
      x, y, bw, bh = o['bbox']
      boxes.append([y / h, x / w, (y + bh) / h, (x + bw) / w])
      classes.append(o['class'])
      crowd.append(o['iscrowd'])
      segm = o['segmentation']
      if isinstance(segm, list):  # Polygons.
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w)) if segm else None
      elif isinstance(segm, dict):
        rle = mask_utils.frPyObjects(segm, h, w) if isinstance(segm['counts'], list) else segm
      else:
        rle = None
      masks.append(np.zeros((h, w), np.uint8) if rle is None else mask_utils.decode(rle))
    return (np.array(boxes, np.float32).reshape(-1, 4), np.array(classes, np.int32),
            np.array(crowd, np.int32), np.array(masks, np.uint8).reshape(-1, h, w))

  def read(example):
    image = preprocess.decode(tf.io.read_file(example['image']))
    boxes, classes, crowd, masks = tf.numpy_function(
        objects, [example['objects']], [tf.float32, tf.int32, tf.int32, tf.uint8])
    return {'image': image, 'boxes': tf.reshape(boxes, [-1, 4]),
            'classes': tf.reshape(classes, [-1]), 'is_crowd': tf.reshape(crowd, [-1]), 'masks': tf.reshape(masks, [-1] + tf.unstack(tf.shape(image)[:2]))}

  return Source(num_examples=len(images), num_classes=len(categories),
                class_names=tuple(c.get('name', str(c['id'])) for c in categories),
                process_index=process_index, process_count=process_count,
                examples={'image': paths, 'objects': np.array(records)}, read=read,
                find_unreadable=lambda: input_pipeline.unreadable(list(paths)))


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
    source = _segmentation_folder(os.path.expanduser(name[4:]), split, process_index,
                                  process_count, config.num_classes)
  elif name.startswith('det:'):
    source = _detection_folder(os.path.expanduser(name[4:]), split, process_index,
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
      masks = _resize_nearest(masks, tf.maximum(scaled // stride, 1))
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
