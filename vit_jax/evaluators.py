"""Evaluators: what a training run measures, listed by name in `config.evals`.

Each entry has a `type` and its own `every` (steps; 0 = off; an evaluator also runs at the last
step). Its metrics go to TensorBoard as `<name>/<metric>` and to results.json under `<name>`.

  classification  the objective's metrics on a (dataset, split): `dataset` ('' = config.dataset),
                  `split`, `label_key` (a TFDS feature; '' = 'label', e.g. 'real_label' for
                  ImageNet ReaL, whose unlabelled images are not scored)
  fewshot         few-shot linear evaluation (paper Sec. 4.1) on other, small datasets:
                  `datasets` = {name: (dataset, train_split, test_split)} (the train split a
                  fixed slice that holds enough examples per class), `shots`, `seeds`, `l2_reg`

Every evaluator's data is opened when the run starts: a misspelt dataset or split fails then.
"""

import logging

import jax
import jax.numpy as jnp

from vit_jax import sharding
# The specs (plain data: recipes and config_lib build them) live below the modules that run them.
from vit_jax.evaluator_specs import TYPES, classification, few_shot  # pylint: disable=unused-import

def _local_batch(config) -> int:
  return config.batch_eval // jax.process_count()


def _open(config, split, dataset, label_key=''):
  """This process' shard of an evaluator's split."""
  from vit_jax import input_pipeline
  return input_pipeline.get_source(config, split, process_index=jax.process_index(),
                                   process_count=jax.process_count(), dataset=dataset,
                                   label_key=label_key)


def evaluate_split(config, eval_step, params, source, mesh, objective):
  """The objective's metrics over every example of the split, each read once."""
  from vit_jax import input_pipeline
  local_batch = _local_batch(config)
  num_steps = input_pipeline.eval_steps(source, batch_size=local_batch,
                                        process_count=jax.process_count())
  totals = None
  for batch in input_pipeline.eval_batches(config, source, batch_size=local_batch,
                                           num_steps=num_steps):
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
    self.run = lambda params: evaluate_split(config, eval_step, params, self.source, mesh,
                                             objective)


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
    else:
      built[name] = FewShot(name, spec, config, model, mesh, params_shardings)
    logging.info('Evaluator %s: %s every %d steps.', name, spec.type, spec.every)
  return built
