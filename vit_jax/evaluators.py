"""Evaluators: what a training run measures, listed by name in `config.evals`.

Each entry has a `type` and its own `every` (steps; 0 = off; an evaluator also runs at the last
step). Its metrics go to TensorBoard as `<name>/<metric>` and to results.json under `<name>`.

  classification  the objective's metrics on a (dataset, split): `dataset` ('' = config.dataset),
                  `split`, `label_key` (a TFDS feature; '' = 'label', e.g. 'real_label' for
                  ImageNet ReaL, whose unlabelled images are not scored), `classes` ('present':
                  only the classes that occur in the split can be predicted, as ImageNet-A and
                  -R are scored on their 200 of ImageNet's 1000)
  corruption      ImageNet-C: top-1 error on every `<dataset>/<corruption>_<severity>`, each
                  corruption's error (CE) relative to AlexNet's, and their mean (mCE)
  segmentation    mIoU and pixel accuracy on a (dataset, split), each image's predicted class
                  map resized back to its original size
  detection       COCO box mAP (and mask mAP for instance masks) by pycocotools, boxes and
                  masks mapped back to each image's original pixels
  fewshot         few-shot linear evaluation (paper Sec. 4.1) on other, small datasets:
                  `datasets` = {name: (dataset, train_split, test_split)} (the train split a
                  fixed slice that holds enough examples per class), `shots`, `seeds`, `l2_reg`

Every evaluator's data is opened when the run starts: a misspelt dataset or split fails then.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import decoders, detection, segmentation, sharding
# The specs (plain data: recipes and config_lib build them) live below the modules that run them.
from vit_jax.evaluator_specs import (  # pylint: disable=unused-import
    CORRUPTION_ALEXNET_ERRORS, TYPES, classification, corruption, dense, few_shot, robustness)

def _local_batch(config) -> int:
  return config.batch_eval // jax.process_count()


def _open(config, split, dataset, label_key=''):
  """This process' shard of an evaluator's split."""
  from vit_jax import input_pipeline
  return input_pipeline.get_source(config, split, process_index=jax.process_index(),
                                   process_count=jax.process_count(), dataset=dataset,
                                   label_key=label_key)


def evaluate_split(config, eval_step, params, source, mesh, objective, classes=None):
  """The objective's metrics over every example of the split, each read once; only the
  `classes` (a boolean per class) can be predicted where given."""
  from vit_jax import input_pipeline
  local_batch = _local_batch(config)
  num_steps = input_pipeline.eval_steps(source, batch_size=local_batch,
                                        process_count=jax.process_count())
  allowed = None if classes is None else np.repeat(classes[None].astype(np.float32),
                                                   local_batch, axis=0)
  totals = None
  for batch in input_pipeline.eval_batches(config, source, batch_size=local_batch,
                                           num_steps=num_steps):
    if allowed is not None:
      batch['classes'] = allowed
    sums = eval_step(params, sharding.to_global(batch, mesh))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = int(totals['examples'])
  if count != source.num_examples:
    raise RuntimeError(f'Evaluation read {count} examples, the split has {source.num_examples}.')
  return objective.metrics(totals)


class Classification:

  def __init__(self, name, spec, config, objective, eval_step, mesh):
    self.every = spec.every
    self.source = _open(config, spec.split, spec.dataset, spec.label_key)
    if objective.name != 'mpp' and self.source.num_classes != objective.num_outputs:
      raise ValueError(f'evals.{name}: {spec.dataset or config.dataset}:{spec.split} has '
                       f'{self.source.num_classes} classes, the model {objective.num_outputs}.')
    classes = None
    if spec.get('classes', 'all') == 'present':
      classes = present_classes(self.source)
      logging.info('evals.%s: scored on the %d classes that occur in the split.', name,
                   classes.sum())
    self.run = lambda params: evaluate_split(config, eval_step, params, self.source, mesh,
                                             objective, classes)


def present_classes(source) -> np.ndarray:
  """Which classes occur in the split, over every process' shard (read once, labels only)."""
  labels = source.shard().map(lambda example: example['label'])
  present = np.zeros(source.num_classes, bool)
  for batch in labels.batch(4096).as_numpy_iterator():
    present[np.asarray(batch).reshape(-1)] = True
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    present = multihost_utils.process_allgather(present).any(axis=0)
  return present


class Corruption:
  """ImageNet-C (Hendrycks & Dietterich 2019): CE_c = sum over severities of the top-1 error on
  corruption c / the same sum for AlexNet; mCE = the mean CE over corruptions."""

  def __init__(self, name, spec, config, objective, eval_step, mesh):
    self.every = spec.every
    self.sources = {(c, s): _open(config, spec.split, f'{spec.dataset}/{c}_{s}')
                    for c in spec.corruptions for s in spec.severities}
    for (c, s), source in self.sources.items():
      if source.num_classes != objective.num_outputs:
        raise ValueError(f'evals.{name}: {spec.dataset}/{c}_{s} has {source.num_classes} '
                         f'classes, the model {objective.num_outputs}.')

    def run(params):
      errors = {key: 1 - evaluate_split(config, eval_step, params, source, mesh,
                                        objective)['accuracy_test']
                for key, source in self.sources.items()}
      return corruption_errors(errors, spec.severities)
    self.run = run


def corruption_errors(errors: dict, severities) -> dict:
  """{(corruption, severity): top-1 error} -> each corruption's mean error and CE, and mCE (as
  fractions: AlexNet's CE is 1)."""
  results = {}
  for c in dict.fromkeys(c for c, _ in errors):
    mean_error = sum(errors[c, s] for s in severities) / len(severities)
    results[f'{c}_error'] = mean_error
    results[f'{c}_ce'] = mean_error / CORRUPTION_ALEXNET_ERRORS[c]
  ces = [v for k, v in results.items() if k.endswith('_ce')]
  results['mce'] = sum(ces) / len(ces)
  return results


def _predict_step(objective, model, params_shardings, mesh):
  """params, images -> objective.predict, every row on every process (each reads its own)."""
  return jax.jit(sharding.under_mesh(lambda params, images: objective.predict(
      model, params, images), mesh), in_shardings=(params_shardings,
                                                  sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def dense_predictions(config, predict_step, params, source, mesh):
  """(host batch, this process' rows of the predictions) over every example of the split."""
  from vit_jax import dense_pipeline, input_pipeline
  local_batch = _local_batch(config)
  num_steps = input_pipeline.eval_steps(source, batch_size=local_batch,
                                        process_count=jax.process_count())
  mine = slice(jax.process_index() * local_batch, (jax.process_index() + 1) * local_batch)
  for batch in dense_pipeline.eval_batches(config, source, batch_size=local_batch,
                                           num_steps=num_steps):
    images = sharding.to_global({'image': batch['image']}, mesh)['image']
    predicted = jax.device_get(predict_step(params, images))
    yield batch, jax.tree.map(lambda x: np.asarray(x)[mine], predicted)


def _resize_nearest(x, size):
  """x (h, w, ...) -> (size[0], size[1], ...), each output pixel the input pixel it falls in."""
  rows = np.minimum((np.arange(size[0]) + 0.5) * x.shape[0] / size[0], x.shape[0] - 1)
  columns = np.minimum((np.arange(size[1]) + 0.5) * x.shape[1] / size[1], x.shape[1] - 1)
  return x[rows.astype(int)][:, columns.astype(int)]


def original_region(canvas, scale, original_size, stride=1):
  """The part of a canvas-sized map that shows the image, resized to the original size."""
  shown = [max(int(round(side * scale)) // stride, 1) for side in original_size]
  return _resize_nearest(canvas[:shown[0], :shown[1]], original_size)


class _Dense:
  """A dense evaluator's data (opened now) and prediction step."""

  def __init__(self, name, spec, config, objective, model, mesh, params_shardings):
    from vit_jax import dense_pipeline
    self.every = spec.every
    self.source = dense_pipeline.get_source(
        config, spec.split, process_index=jax.process_index(),
        process_count=jax.process_count(), dataset=spec.dataset)
    if self.source.num_classes != objective.num_outputs:
      raise ValueError(f'evals.{name}: {spec.dataset or config.dataset}:{spec.split} has '
                       f'{self.source.num_classes} classes, the model {objective.num_outputs}.')
    self.predict_step = _predict_step(objective, model, params_shardings, mesh)


class Segmentation(_Dense):

  def __init__(self, name, spec, config, objective, model, mesh, params_shardings):
    super().__init__(name, spec, config, objective, model, mesh, params_shardings)
    predict_step, num_classes = self.predict_step, objective.num_outputs

    def run(params):
      confusion = np.zeros((num_classes, num_classes), np.int64)
      count = 0
      for batch, predicted in dense_predictions(config, predict_step, params, self.source,
                                                mesh):
        for i in np.flatnonzero(batch['mask']):
          h, w = batch['original_size'][i]
          predicted_map = original_region(predicted[i], batch['scale'][i], (h, w))
          confusion += segmentation.confusion_matrix(
              predicted_map, batch['segmentation'][i][:h, :w], num_classes)
          count += 1
      confusion, count = _sum_over_processes(confusion, count)
      _check_count(count, self.source)
      return segmentation.metrics(confusion)
    self.run = run


def _sum_over_processes(*values):
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils
  return tuple(multihost_utils.process_allgather(np.asarray(v)).sum(0) for v in values)


def _check_count(count, source):
  if count != source.num_examples:
    raise RuntimeError(f'Evaluation read {count} examples, the split has {source.num_examples}.')


def _gather_json(items: list) -> list:
  """Every process' list, concatenated (on every process)."""
  if jax.process_count() == 1:
    return items
  import json
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(items).encode(), np.uint8)
  length = int(multihost_utils.process_allgather(np.int64(len(data))).max())
  padded = np.zeros(length, np.uint8)
  padded[:len(data)] = data
  gathered = multihost_utils.process_allgather(padded)
  return [item for row in gathered for item in json.loads(bytes(row).rstrip(b'\0'))]


class Detection(_Dense):

  def __init__(self, name, spec, config, objective, model, mesh, params_shardings):
    super().__init__(name, spec, config, objective, model, mesh, params_shardings)
    predict_step = self.predict_step

    def run(params):
      images, annotations, detections = [], [], []
      for batch, predicted in dense_predictions(config, predict_step, params, self.source,
                                                mesh):
        for i in np.flatnonzero(batch['mask']):
          image_id = jax.process_index() + jax.process_count() * len(images)
          found, truth = coco_records(batch, predicted, i, image_id)
          images.append({'id': image_id, 'height': int(batch['original_size'][i][0]),
                         'width': int(batch['original_size'][i][1])})
          annotations += truth
          detections += found
      images, annotations, detections = (_gather_json(x) for x in
                                         (images, annotations, detections))
      _check_count(len(images), self.source)
      return detection.coco_metrics(images, annotations, detections, objective.num_outputs,
                                    with_masks=objective.instance_masks)
    self.run = run


def coco_records(batch, predicted, i, image_id):
  """Example i of a batch as COCO records in its original pixels: (detections, ground truth);
  masks as RLE where the model predicts them."""
  from pycocotools import mask as mask_utils
  h, w = (int(v) for v in batch['original_size'][i])
  scale = float(batch['scale'][i])

  def rle(mask):  # JSON-able (gathered over processes as JSON): counts as text.
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {'size': [int(s) for s in encoded['size']], 'counts': encoded['counts'].decode()}

  xywh = lambda b: [float(b[1]), float(b[0]), float(b[3] - b[1]), float(b[2] - b[0])]
  truth = []
  for k in np.flatnonzero(batch['classes'][i] >= 0):
    box = batch['boxes'][i][k] * np.array([h, w, h, w])
    record = {'image_id': image_id, 'category_id': int(batch['classes'][i][k]),
              'bbox': xywh(box), 'iscrowd': int(batch['is_crowd'][i][k]),
              'area': float((box[2] - box[0]) * (box[3] - box[1]))}
    if 'masks' in predicted:
      mask = batch['masks'][i][k][:h, :w]
      record['segmentation'] = rle(mask)
      record['area'] = float(mask.sum())
    truth.append(record)
  found = []
  for k in range(len(predicted['scores'][i])):
    box = np.clip(predicted['boxes'][i][k] / scale, 0, [h, w, h, w])
    record = {'image_id': image_id, 'category_id': int(predicted['classes'][i][k]),
              'bbox': xywh(box), 'score': float(predicted['scores'][i][k])}
    if 'masks' in predicted:
      mask = original_region(predicted['masks'][i][k] > 0.5, scale, (h, w),
                       stride=decoders.MASK_STRIDE)
      record['segmentation'] = rle(mask)
    found.append(record)
  return found, truth


class FewShot:

  def __init__(self, name, spec, config, model, mesh, params_shardings):
    from vit_jax import fewshot
    self.every = spec.every
    self.sources = {}
    for dataset_name, (dataset, train_split, test_split) in spec.datasets.items():
      train, test = _open(config, train_split, dataset), _open(config, test_split, dataset)
      if not fewshot.usable_shots(train, spec.shots):
        raise ValueError(f'evals.{name}: some class of {dataset}:{train_split} has fewer '
                         f'examples than the fewest of shots={tuple(spec.shots)}.')
      self.sources[dataset_name] = (train, test)
    embed_step = fewshot.make_embed_step(model, mesh, params_shardings)

    def run(params):
      results = {}
      for dataset_name, (train, test) in self.sources.items():
        accuracies = fewshot.evaluate(
            config, embed_step, params, train, test, mesh, shots=spec.shots, seeds=spec.seeds,
            l2_reg=spec.l2_reg, batch_size=_local_batch(config))
        results.update({f'{dataset_name}_{k}shot': v for k, v in accuracies.items()})
      return results
    self.run = run


def build(config, model, objective, eval_step, mesh, params_shardings) -> dict:
  """{name: evaluator} of every entry of config.evals that is on (every > 0)."""
  built = {}
  for name, spec in config.evals.items():
    if not spec.every:
      continue
    if spec.type == 'classification':
      built[name] = Classification(name, spec, config, objective, eval_step, mesh)
    elif spec.type == 'corruption':
      built[name] = Corruption(name, spec, config, objective, eval_step, mesh)
    elif spec.type == 'segmentation':
      built[name] = Segmentation(name, spec, config, objective, model, mesh, params_shardings)
    elif spec.type == 'detection':
      built[name] = Detection(name, spec, config, objective, model, mesh, params_shardings)
    else:
      built[name] = FewShot(name, spec, config, model, mesh, params_shardings)
    logging.info('Evaluator %s: %s every %d steps.', name, spec.type, spec.every)
  return built
