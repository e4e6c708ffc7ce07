"""What an evaluator of `config.evals` is, as plain data (see evaluators.py, which runs them):
recipes and config_lib build these without importing the code that runs them."""

import ml_collections

TYPES = ('classification', 'fewshot')


def classification(split, *, dataset='', every=1000, label_key='') -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(type='classification', dataset=dataset, split=split,
                                        every=every, label_key=label_key))


def few_shot(datasets: dict, *, every=0, shots=(1, 5, 10, 25), seeds=3,
             l2_reg=1.0) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(type='fewshot', datasets=datasets, every=every,
                                        shots=shots, seeds=seeds, l2_reg=l2_reg))
