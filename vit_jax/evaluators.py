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
  fewshot         few-shot linear evaluation (paper Sec. 4.1) on other, small datasets:
                  `datasets` = {name: (dataset, train_split, test_split)} (the train split a
                  fixed slice that holds enough examples per class), `shots`, `seeds`, `l2_reg`

Every evaluator's data is opened when the run starts: a misspelt dataset or split fails then.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import sharding
# The specs (plain data: recipes and config_lib build them) live below the modules that run them.
from vit_jax.evaluator_specs import (  # pylint: disable=unused-import
    CORRUPTION_ALEXNET_ERRORS, TYPES, classification, corruption, few_shot, robustness)

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
    else:
      built[name] = FewShot(name, spec, config, model, mesh, params_shardings)
    logging.info('Evaluator %s: %s every %d steps.', name, spec.type, spec.every)
  return built
