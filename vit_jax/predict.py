r"""Classifies image files with a checkpoint: the top-5 classes and their probabilities; with a
segmentation or detection model, draws its class map or boxes and masks over each image.

python -m vit_jax.predict --checkpoint=runs/demo/finetune/model.npz --dataset=digits IMAGE...
python -m vit_jax.predict --model=ViT-B_16 --checkpoint=ViT-B_16.npz --labels=names.txt IMAGE...
python -m vit_jax.predict --checkpoint=runs/detection/model.npz --outdir=DIR IMAGE...

A dense model's drawing goes to <outdir>/<image name>.png, at the image's own size; a name that
a file not drawn there by predict holds, or that two images would share, is refused before any
work (files.OutputFolder), so an input photo or a user's own drawing is never replaced (images are
scaled as in evaluation: the longer side fits the model's input); detections scoring at least
--threshold are drawn and printed.

The architecture and resolution are read off the checkpoint (`--model` checks them against a
registry entry). Images of any size are resized to the model's resolution, as in evaluation.
Label names come from --labels (one per line) or --dataset (digits, folder:<dir>, a TFDS name).
A file that cannot be read is reported by name; the others are still classified.
"""

import math
import os
import re
import sys
from typing import Callable, NamedTuple, Optional

import jax
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS

from vit_jax import checkpoint, cpu_tuning, files, models, sharding


def label_names(num_classes, labels_path=None, dataset=None, from_checkpoint=None) -> list:
  """--labels, else --dataset's class names, else the checkpoint's own (Hugging Face id2label)."""
  if labels_path:
    with open(labels_path) as f:
      names = [line.strip() for line in f if line.strip()]
  elif dataset == 'digits':
    names = [str(i) for i in range(10)]
  elif dataset and dataset.startswith('folder:'):
    from vit_jax import image_folder
    names = image_folder.layout(dataset[len('folder:'):])[1]
  elif dataset:
    import tensorflow_datasets as tfds
    names = tfds.builder(dataset).info.features['label'].names
  elif from_checkpoint:
    names = list(from_checkpoint)
  else:
    names = [f'class {i}' for i in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f'{len(names)} label names for a model with {num_classes} classes.')
  return names


def load_image(path: str, image_size, resize=None) -> np.ndarray:
  """The eval preprocessing: decode, resize to the model's resolution (or as the checkpoint's
  image processor does, `resize`: the shorter side to its size, then the centre crop), value
  range [-1, 1]."""
  import tensorflow as tf
  from vit_jax import preprocess
  try:
    image = preprocess.decode(tf.io.read_file(path))
  except (tf.errors.OpError, ValueError) as e:
    reason = re.sub(r'\{\{.*?\}\}|\[Op:.*', '', getattr(e, 'message', str(e))).strip()
    raise ValueError(f'{path}: not a readable JPEG/PNG/GIF/BMP image ({reason}).') from None
  if resize:
    image = preprocess.resize_shorter_and_crop(image, resize['shortest_edge'], resize['crop'],
                                               resize['method'])
  else:
    # A photograph may be many times the model's resolution: without a low-pass filter its
    # resize would keep one pixel in n and drop the rest.
    image = preprocess.resize_and_central_crop(image, image_size, image_size, antialias=True)
  return preprocess.to_value_range(image).numpy()


class Classifier(NamedTuple):
  classify: Callable  # images in [-1, 1] -> class probabilities
  image_size: tuple
  num_classes: int
  class_names: Optional[list]  # What the checkpoint calls its classes (Hugging Face: id2label).
  resize: Optional[dict] = None  # The checkpoint's own resize and crop (Read.resize).


def load_classifier(checkpoint_path: str, model_name=None) -> Classifier:
  """The classifier of a checkpoint; the probabilities are sigmoids for a multi-label model, a
  softmax distribution otherwise. Images are normalised as the checkpoint expects (Hugging Face
  files: the mean and std of their preprocessor_config.json; exports: of their recipe)."""
  read = checkpoint.load_model(checkpoint_path)
  params, config, num_classes, image_size, multi_label = read[:5]
  if not num_classes or config.classifier == 'unpooled' or config.get('decoder') is not None:
    raise ValueError(f'{checkpoint_path} has no image classification head (classifier='
                     f'{config.classifier!r}, e.g. a masked patch prediction model): fine-tune it '
                     'on labelled images first (configs/finetune.py).')
  if model_name:
    expected = models.get_config(model_name)
    if (expected.hidden_size, tuple(expected.patches.size), expected.transformer.num_layers) != (
        config.hidden_size, tuple(config.patches.size), config.transformer.num_layers):
      raise ValueError(f'{checkpoint_path} does not hold a {model_name}: width '
                       f'{config.hidden_size}, patch {tuple(config.patches.size)}, '
                       f'{config.transformer.num_layers} layers.')
  model = models.build(config, num_classes)
  activation = jax.nn.sigmoid if multi_label else jax.nn.softmax
  classify = jax.jit(sharding.under_mesh(lambda x: activation(model.apply(
      {'params': params}, read.model_inputs(x), train=False)),
      sharding.make_mesh(jax.devices()[:1])))  # One image at a time: one device.
  return Classifier(classify, image_size, num_classes, read.class_names, read.resize)


# ------------------------------------------------------------------------- dense models

PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
                    [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255]], np.uint8)


def colour(k: int) -> tuple:
  return tuple(int(v) for v in PALETTE[k % len(PALETTE)])


def load_dense(checkpoint_path: str):
  """(objective, predict(images) -> objective.predict outputs, config) of a segmentation or
  detection export."""
  from vit_jax import config_lib, objectives
  read = checkpoint.load_model(checkpoint_path)
  config = config_lib.base_config()
  config.model = read.config
  config.pp.crop = tuple(read.image_size)
  config_lib.set_normalisation(config, read)
  config.objective = ('detection' if read.config.decoder.type == 'detection' else
                      'segmentation')
  objective = objectives.from_config(config, read.num_classes)
  model = models.build(read.config, read.num_classes)
  predict = jax.jit(lambda images: objective.predict(model, read.params, images))
  return objective, predict, config, read.class_names


def draw(image: np.ndarray, found: dict, objective, scale: float, names, threshold: float):
  """The image (uint8, original size) with the class map blended in, or the boxes (and masks)
  scoring at least `threshold`; and the text lines that describe them."""
  from PIL import Image, ImageDraw
  from vit_jax import evaluators
  h, w = image.shape[:2]
  if objective.name == 'segmentation':
    classes = evaluators.original_region(found, scale, (h, w))
    drawn = (0.5 * image + 0.5 * PALETTE[classes % len(PALETTE)]).astype(np.uint8)
    counts = np.bincount(classes.ravel(), minlength=len(names)) / classes.size
    return Image.fromarray(drawn), [f'  {c:7.2%}  {names[k]}' for k, c in
                                    sorted(enumerate(counts), key=lambda kc: -kc[1]) if c > 0]
  drawn = image.astype(np.float32)
  keep = [k for k in np.argsort(-found['scores']) if found['scores'][k] >= threshold]
  if 'masks' in found:
    from vit_jax import decoders
    for k in keep:
      mask = evaluators.original_region(found['masks'][k] > 0.5, scale, (h, w),
                                        stride=decoders.MASK_STRIDE)
      drawn[mask] = 0.5 * drawn[mask] + 0.5 * np.array(colour(int(found['classes'][k])))
  picture = Image.fromarray(drawn.astype(np.uint8))
  pen = ImageDraw.Draw(picture)
  lines = []
  for k in keep:
    ymin, xmin, ymax, xmax = np.clip(found['boxes'][k] / scale, 0, [h, w, h, w])
    name, score = names[int(found['classes'][k])], float(found['scores'][k])
    pen.rectangle([xmin, ymin, xmax, ymax], outline=colour(int(found['classes'][k])), width=2)
    pen.text((xmin + 2, ymin + 1), f'{name} {score:.2f}', fill=colour(int(found['classes'][k])))
    lines.append(f'  {score:7.2%}  {name}  box (x, y, w, h) = ({xmin:.0f}, {ymin:.0f}, '
                 f'{xmax - xmin:.0f}, {ymax - ymin:.0f})')
  return picture, lines


def output_names(paths, outdir) -> list:
  """<image name>.png for each image, checked before any work: a name that another file holds
  (the input photo itself, a user's own drawing) or that two images would share is refused."""
  folder = files.OutputFolder(outdir)
  names = [os.path.splitext(os.path.basename(path))[0] + '.png' for path in paths]
  for path, name in zip(paths, names):
    out = os.path.join(outdir, name)
    if os.path.exists(out) and os.path.exists(path) and os.path.samefile(path, out):
      raise ValueError(f'{out} would be drawn over its own input image: name another --outdir '
                       '(nothing was written).')
  folder.check(names)
  return folder, names


def predict_dense(paths, checkpoint_path, outdir, threshold, names=None) -> int:
  """Draws a dense model's predictions for each image into <outdir>; the number of images that
  could not be read."""
  import tensorflow as tf
  from vit_jax import dense_pipeline, preprocess
  if not outdir:
    raise app.UsageError(f'{checkpoint_path} is a segmentation / detection model: name '
                         '--outdir, where its drawings go.')
  folder, out_names = output_names(paths, outdir)
  objective, predict, config, class_names = load_dense(checkpoint_path)
  names = names or class_names or [f'class {i}' for i in range(objective.num_outputs)]
  failures = 0
  for path, out_name in zip(paths, out_names):
    try:
      image = preprocess.decode(tf.io.read_file(path)).numpy()
    except (tf.errors.OpError, ValueError):
      print(f'error: {path}: not a readable JPEG/PNG/GIF/BMP image.', file=sys.stderr)
      failures += 1
      continue
    canvas, scale = dense_pipeline.canvas(image, config)
    found = jax.tree.map(lambda x: np.asarray(x)[0], predict(canvas[None]))
    picture, lines = draw(image, found, objective, scale, names, threshold)
    out = folder.write(out_name, lambda temporary: picture.save(temporary, format='PNG'))
    print(f'{path} -> {out}')
    print('\n'.join(lines))
  return failures


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Name at least one image file.')
  if FLAGS.top < 1:
    raise app.UsageError(f'--top={FLAGS.top} must be at least 1.')
  if not (math.isfinite(FLAGS.threshold) and 0 <= FLAGS.threshold <= 1):
    raise app.UsageError(f'--threshold={FLAGS.threshold}: expected a score between 0 and 1.')
  description = checkpoint.read_description(FLAGS.checkpoint)
  if description is not None and description.config.get('decoder') is not None:
    names = FLAGS.labels and label_names(description.num_classes, FLAGS.labels)
    failures = predict_dense(paths, FLAGS.checkpoint, FLAGS.outdir, FLAGS.threshold, names)
    if failures:
      sys.exit(f'{failures} of {len(paths)} images could not be read.')
    return
  classify, image_size, num_classes, class_names, resize = load_classifier(FLAGS.checkpoint,
                                                                           FLAGS.model)
  names = label_names(num_classes, FLAGS.labels, FLAGS.dataset, class_names)

  failures = 0
  for path in paths:
    try:
      image = load_image(path, image_size, resize)
    except ValueError as e:
      print(f'error: {e}', file=sys.stderr)
      failures += 1
      continue
    probabilities = np.asarray(classify(image[None]))[0]
    print(path)
    for index in np.argsort(-probabilities)[:FLAGS.top]:
      print(f'  {probabilities[index]:7.2%}  {names[index]}')
  if failures:
    sys.exit(f'{failures} of {len(paths)} images could not be read.')


def define_flags():
  """The command line; defined on use, so that importing this module defines no flags."""
  flags.DEFINE_string('model', None, 'Registry name to check the checkpoint against.')
  flags.DEFINE_string('checkpoint', None, 'Checkpoint: .npz (local or gs://), Hugging Face '
                      'model directory, timm .safetensors, or hf://ORG/NAME[@REVISION].',
                      required=True)
  flags.DEFINE_string('labels', None, 'Text file with one class name per line.')
  flags.DEFINE_string('dataset', None, 'Dataset whose class names to use.')
  flags.DEFINE_integer('top', 5, 'How many classes to print per image.')
  flags.DEFINE_string('outdir', None, 'Segmentation / detection models: where the drawings go.')
  flags.DEFINE_float('threshold', 0.3, 'Detection: the lowest score drawn and printed.')


if __name__ == '__main__':
  cpu_tuning.tune_command_line()
  define_flags()
  app.run(main)
