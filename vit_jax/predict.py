r"""Classifies image files with a checkpoint: the top-5 classes and their probabilities.

python -m vit_jax.predict --checkpoint=runs/demo/finetune/model.npz --dataset=digits IMAGE...
python -m vit_jax.predict --model=ViT-B_16 --checkpoint=ViT-B_16.npz --labels=names.txt IMAGE...

The architecture and resolution are read off the checkpoint (`--model` checks them against a
registry entry). Images of any size are resized to the model's resolution, as in evaluation.
Label names come from --labels (one per line) or --dataset (digits, folder:<dir>, a TFDS name).
A file that cannot be read is reported by name; the others are still classified.
"""

import re
import sys
from typing import Callable, NamedTuple, Optional

import jax
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS

from vit_jax import checkpoint, models
from vit_jax.models_vit import VisionTransformer


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


def load_image(path: str, image_size) -> np.ndarray:
  """The eval preprocessing: decode, resize to the model's resolution, value range [-1, 1]."""
  import tensorflow as tf
  from vit_jax import preprocess
  try:
    image = preprocess.decode(tf.io.read_file(path))
  except (tf.errors.OpError, ValueError) as e:
    reason = re.sub(r'\{\{.*?\}\}|\[Op:.*', '', getattr(e, 'message', str(e))).strip()
    raise ValueError(f'{path}: not a readable JPEG/PNG/GIF/BMP image ({reason}).') from None
  # A photograph may be many times the model's resolution: without a low-pass filter its
  # resize would keep one pixel in n and drop the rest.
  image = preprocess.resize_and_central_crop(image, image_size, image_size, antialias=True)
  return preprocess.to_value_range(image).numpy()


class Classifier(NamedTuple):
  classify: Callable  # images in [-1, 1] -> class probabilities
  image_size: tuple
  num_classes: int
  class_names: Optional[list]  # What the checkpoint calls its classes (Hugging Face: id2label).


def load_classifier(checkpoint_path: str, model_name=None) -> Classifier:
  """The classifier of a checkpoint; the probabilities are sigmoids for a multi-label model, a
  softmax distribution otherwise. Images are normalised as the checkpoint expects (Hugging Face
  files: the mean and std of their preprocessor_config.json; exports: of their recipe)."""
  read = checkpoint.load_model(checkpoint_path)
  params, config, num_classes, image_size, multi_label = read[:5]
  if not num_classes or config.classifier == 'unpooled':
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
  model = VisionTransformer(num_classes=num_classes, **config)
  activation = jax.nn.sigmoid if multi_label else jax.nn.softmax
  classify = jax.jit(lambda x: activation(model.apply({'params': params}, read.model_inputs(x),
                                                      train=False)))
  return Classifier(classify, image_size, num_classes, read.class_names)


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Name at least one image file.')
  if FLAGS.top < 1:
    raise app.UsageError(f'--top={FLAGS.top} must be at least 1.')
  classify, image_size, num_classes, class_names = load_classifier(FLAGS.checkpoint,
                                                                   FLAGS.model)
  names = label_names(num_classes, FLAGS.labels, FLAGS.dataset, class_names)

  failures = 0
  for path in paths:
    try:
      image = load_image(path, image_size)
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


if __name__ == '__main__':
  define_flags()
  app.run(main)
