r"""Few-shot linear evaluation (paper Sec. 4.1, the metric of Figures 3 and 4).

The model is frozen; its pre-logits representations of `shots` training images per class are
mapped to {-1, 1}^K targets by regularised least squares, solved in closed form, and the test
images are classified by the largest output. Accuracy is averaged over several random draws.

python -m vit_jax.fewshot --checkpoint=runs/demo/pretrain/model.npz --dataset=digits
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from vit_jax import checkpoint, cpu_tuning, sharding

FLAGS = flags.FLAGS


def solve(features, labels, num_classes: int, l2_reg: float):
  """W minimising |[X 1] W - Y|^2 + l2_reg |W|^2 for Y in {-1, 1}^K (the bias is regularised
  too, which keeps the system well posed with fewer examples than dimensions)."""
  x = np.concatenate([features, np.ones((len(features), 1))], axis=1).astype(np.float64)
  targets = 2.0 * np.eye(num_classes)[labels] - 1.0
  return np.linalg.solve(x.T @ x + l2_reg * np.eye(x.shape[1]), x.T @ targets)


def predict(weights, features):
  x = np.concatenate([features, np.ones((len(features), 1))], axis=1)
  return np.argmax(x @ weights, axis=1)


def fewshot_accuracy(train_x, train_y, test_x, test_y, *, num_classes: int, shots: int,
                     seeds: int = 3, l2_reg: float = 1.0) -> float:
  """Mean test accuracy over `seeds` draws of `shots` training examples per class."""
  accuracies = []
  for seed in range(seeds):
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([
        rng.choice(np.flatnonzero(train_y == c), size=shots, replace=False)
        for c in range(num_classes)])
    weights = solve(train_x[chosen], train_y[chosen], num_classes, l2_reg)
    accuracies.append(np.mean(predict(weights, test_x) == test_y))
  return float(np.mean(accuracies))


def make_embed_step(model, mesh, params_shardings=None):
  """Jitted (params, global batch) -> (pre-logits features, labels, mask, index) of the whole
  batch on every process; each device embeds its part of the batch, with the parameters as
  sharded (`params_shardings`, default replicated)."""
  def embed(params, batch):
    features = model.clone(num_classes=None).apply(
        {'params': checkpoint.without_head(params)}, batch['image'], train=False)
    return features, batch['labels'], batch['mask'], batch['index']

  return jax.jit(sharding.under_mesh(embed, mesh),
                 in_shardings=(params_shardings or sharding.replicated(mesh),
                               sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def _with_positions(batches, source, batch_size: int):
  """Each batch with its examples' positions in the split: process p's shard of a
  random-access source holds positions p, p + P, p + 2P, ... (for a TFDS stream, whose shards
  are file ranges read in a shuffled order, the same formula only gives a fixed order)."""
  for step, batch in enumerate(batches):
    local = step * batch_size + np.arange(batch_size)
    yield dict(batch, index=local * source.process_count + source.process_index)


def representations(embed_step, params, batches, mesh):
  """Pre-logits features and labels of every (unmasked) example of every process' `batches`,
  ordered by position: for a random-access source the split's order whatever the number of
  processes, so that the few-shot draws are the same too."""
  features, labels, positions = [], [], []
  for batch in batches:
    x, y, mask, index = jax.device_get(embed_step(params, sharding.to_global(batch, mesh)))
    keep = mask > 0
    features.append(np.asarray(x, np.float64)[keep])
    labels.append(y[keep].argmax(-1))
    positions.append(index[keep])
  order = np.argsort(np.concatenate(positions), kind='stable')
  return np.concatenate(features)[order], np.concatenate(labels)[order]


def usable_shots(source, shots) -> list:
  """The shot counts every class of `source` has enough examples for (all if unknown before
  reading, as for streamed TFDS splits); the others are named in a warning."""
  if source.examples is None:
    return list(shots)
  fewest = np.bincount(source.examples['label'], minlength=source.num_classes).min()
  usable = [k for k in shots if k <= fewest]
  if len(usable) < len(shots):
    logging.warning('Few-shot: skipping %s shots, a class of the training split has only %d '
                    'examples.', sorted(set(shots) - set(usable)), fewest)
  return usable


def evaluate(config, embed_step, params, train_source, test_source, mesh, *,
             shots=(1, 5, 10, 25), seeds=3, l2_reg=1.0, batch_size=256) -> dict:
  """{k: accuracy} for each k of `shots` that every class of train_source has enough examples
  for: fitted on `train_source`, measured on `test_source` (this process' shards of them,
  preprocessed as config says, `batch_size` examples per process and step)."""
  from vit_jax import input_pipeline
  if train_source.num_classes < 2:
    raise ValueError(f'No few-shot evaluation possible: the dataset has {train_source.num_classes} '
                     'class, which every probe gets right. It needs at least two.')
  if not l2_reg > 0:
    raise ValueError(f'l2_reg={l2_reg} must be a positive number (the ridge regularisation).')
  shots = usable_shots(train_source, shots)
  if not shots:
    raise ValueError('No few-shot evaluation possible: some class of the training split has '
                     'fewer examples than the fewest shots asked for.')
  data = []
  for source in (train_source, test_source):
    steps = input_pipeline.eval_steps(source, batch_size=batch_size,
                                      process_count=source.process_count)
    batches = input_pipeline.eval_batches(config, source, batch_size=batch_size, num_steps=steps)
    data.append(representations(embed_step, params, _with_positions(batches, source, batch_size),
                                mesh))
  (train_x, train_y), (test_x, test_y) = data
  results = {}
  for k in shots:
    if np.bincount(train_y, minlength=train_source.num_classes).min() < k:
      logging.warning('Few-shot: skipping %d shots, too few examples of some class.', k)
      continue
    results[k] = fewshot_accuracy(train_x, train_y, test_x, test_y,
                                  num_classes=train_source.num_classes, shots=k, seeds=seeds,
                                  l2_reg=l2_reg)
  return results


def evaluate_checkpoint(path: str, *, dataset: str, train_split='train', test_split='test',
                        random_init=False, **kwargs) -> dict:
  """`evaluate` ({shots: accuracy}) of the model in an .npz (architecture and resolution read
  off the file), or with random_init of the same architecture untrained (the baseline), on
  every local device."""
  from vit_jax import config_lib, input_pipeline
  from vit_jax.models_vit import VisionTransformer
  read = checkpoint.load_model(path)
  params, model_config, image_size = read.params, read.config, read.image_size
  if model_config.get('decoder') is not None:
    raise ValueError(f'{path} is a dense model (model.decoder.type='
                     f'{model_config.decoder.get("type")!r}: segmentation or detection), whose '
                     'outputs are per pixel or per box: few-shot evaluation needs one pooled '
                     'representation per image, of a classification model or backbone '
                     '(the checkpoint this one was fine-tuned from).')
  if model_config.classifier == 'unpooled':
    raise ValueError(f'{path} has one output per patch (classifier=\'unpooled\', e.g. a masked '
                     'patch prediction model): few-shot evaluation needs one representation per '
                     'image. Fine-tune it with a pooled classifier first (configs/finetune.py).')
  config = config_lib.base_config()
  config.dataset = dataset
  config.pp.crop = image_size[0] if image_size[0] == image_size[1] else tuple(image_size)
  config_lib.set_normalisation(config, read)
  model = VisionTransformer(num_classes=None, **model_config)
  if random_init:
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + tuple(image_size) + (3,)),
                        train=False)['params']
  train, test = (input_pipeline.get_source(config, split) for split in (train_split, test_split))
  mesh = sharding.make_mesh()
  devices = mesh.devices.size
  return evaluate(config, make_embed_step(model, mesh), params, train, test, mesh,
                  batch_size=-(-256 // devices) * devices, **kwargs)


def main(argv):
  del argv
  if not FLAGS.shots or not all(k.strip().isdigit() for k in FLAGS.shots):
    raise app.UsageError(f'--shots={",".join(FLAGS.shots)}: expected whole numbers of examples '
                         'per class, e.g. --shots=1,5,10,25.')
  shots = [int(k) for k in FLAGS.shots]
  if FLAGS.seeds < 1 or min(shots) < 1:
    raise app.UsageError(f'--seeds={FLAGS.seeds} and --shots={",".join(FLAGS.shots)} must be at '
                         'least 1.')
  if not FLAGS.l2_reg > 0:  # NaN fails this too.
    raise app.UsageError(f'--l2_reg={FLAGS.l2_reg} must be a positive number.')
  results = evaluate_checkpoint(
      FLAGS.checkpoint, dataset=FLAGS.dataset, train_split=FLAGS.train_split,
      test_split=FLAGS.test_split, random_init=FLAGS.random_init, shots=shots,
      seeds=FLAGS.seeds, l2_reg=FLAGS.l2_reg)
  for shots, accuracy in results.items():
    print(f'{shots}-shot: {accuracy:.4f}')


def define_flags():
  """The command line; defined on use, so that importing this module defines no flags."""
  flags.DEFINE_string('checkpoint', None, '.npz checkpoint.', required=True)
  flags.DEFINE_string('dataset', 'digits', 'Dataset (digits, folder:<dir>, a TFDS name).')
  flags.DEFINE_string('train_split', 'train', 'Split the few-shot examples are drawn from.')
  flags.DEFINE_string('test_split', 'test', 'Split the accuracy is measured on.')
  flags.DEFINE_list('shots', ['1', '5', '10', '25'], 'Examples per class.')
  flags.DEFINE_integer('seeds', 3, 'Random draws to average over.')
  flags.DEFINE_float('l2_reg', 1.0, 'Ridge regularisation.')
  flags.DEFINE_bool('random_init', False, 'Evaluate a randomly initialised model instead.')


if __name__ == '__main__':
  cpu_tuning.tune_command_line()
  define_flags()
  app.run(main)
