"""Few-shot linear evaluation: the closed-form solver, and the periodic evaluator."""

import logging

import numpy as np

from helpers import tiny_config
from vit_jax import fewshot, train


def test_solver_is_exact_on_a_separable_problem():
  rng = np.random.default_rng(0)
  num_classes, dims = 4, 6
  centres = rng.normal(size=(num_classes, dims)) * 5
  labels = np.repeat(np.arange(num_classes), 30)
  features = centres[labels] + rng.normal(scale=0.1, size=(len(labels), dims))
  for shots in (1, 5):
    accuracy = fewshot.fewshot_accuracy(features, labels, features, labels,
                                        num_classes=num_classes, shots=shots, seeds=3,
                                        l2_reg=1e-3)
    assert accuracy == 1.0


def test_solver_matches_ridge_regression_in_closed_form():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(12, 3)), rng.integers(0, 3, 12)
  weights = fewshot.solve(x, y, 3, l2_reg=0.5)
  design = np.concatenate([x, np.ones((12, 1))], axis=1)
  targets = 2 * np.eye(3)[y] - 1
  gradient = design.T @ (design @ weights - targets) + 0.5 * weights  # Zero at the minimum.
  np.testing.assert_allclose(gradient, 0, atol=1e-10)


def test_periodic_fewshot_evaluation_during_training(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  config = tiny_config('--config.evals.fewshot.every=6', '--config.evals.fewshot.seeds=2')
  config.evals.fewshot.shots = (1, 5)
  results = train.train_and_evaluate(config, str(tmp_path))
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('step 6: fewshot')]
  assert len(lines) == 1 and 'digits_5shot' in lines[0]
  assert results['fewshot'].keys() == {'digits_1shot', 'digits_5shot'}
  assert 0.0 < results['fewshot']['digits_1shot'] <= 1.0
