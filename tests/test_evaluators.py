"""Evaluators as data (config.evals): any number of them, each with its own period, written to
TensorBoard and results.json under its name; ImageNet ReaL's scoring of unlabelled images."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from helpers import tiny_config, write_class_folders
from vit_jax import evaluators, objectives, train


class LocalReal(tfds.core.GeneratorBasedBuilder):
  """Stands in for imagenet2012_real: a list of labels per image, empty for some."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 3)),
        'original_label': tfds.features.ClassLabel(num_classes=10),
        'real_label': tfds.features.Sequence(tfds.features.ClassLabel(num_classes=10))}))

  def _split_generators(self, dl_manager):
    return {'validation': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(20):
      yield i, {'image': rng.integers(0, 255, (8, 8, 3), dtype=np.uint8),
                'original_label': i % 10, 'real_label': [] if i % 4 == 0 else [i % 10, 3]}


def test_unlabelled_examples_are_read_but_not_scored():
  class Model:  # Logits that rank class 2 first, then class 3.
    def apply(self, variables, images, train):
      return jnp.tile(jnp.arange(10.0)[None] * 0 + jnp.eye(10)[2] * 2 + jnp.eye(10)[3], (3, 1))

  labels = np.zeros((3, 10), np.float32)
  labels[0, 2] = 1          # Top-1 right.
  labels[1, [3, 7]] = 1     # Only in the top 5.
  sums = objectives.MultiLabel(10).eval_sums(Model(), None, {
      'image': jnp.zeros((3, 8, 8, 3)), 'labels': jnp.asarray(labels),
      'mask': jnp.ones(3)})  # The third image has no label at all.
  assert (float(sums['count']), float(sums['examples'])) == (2, 3)
  assert (float(sums['top1']), float(sums['top5'])) == (1, 2)


def test_expected_calibration_error_against_an_independent_computation(tmp_path):
  """ECE over 15 equal-width bins of the top-1 softmax confidence, summed over batches whose
  padding (mask 0) is left out; the reliability bins, and the report's diagram of them."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 40, 5)) * 3
  labels = np.eye(5, dtype=np.float32)[rng.integers(0, 5, (2, 40))]
  mask = np.ones((2, 40), np.float32)
  mask[1, 30:] = 0  # The last batch's padding.

  class Model:  # The "images" are the logits.
    def apply(self, variables, images, train):
      return images

  objective = objectives.Classification(5)
  totals = None
  for b in range(2):
    sums = objective.eval_sums(Model(), None, {'image': jnp.asarray(logits[b]),
                                               'labels': jnp.asarray(labels[b]),
                                               'mask': jnp.asarray(mask[b])})
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
  metrics = objective.metrics({k: np.asarray(v) for k, v in totals.items()})

  keep = mask.reshape(-1) > 0
  flat_logits, flat_labels = logits.reshape(-1, 5)[keep], labels.reshape(-1, 5)[keep]
  probs = np.exp(flat_logits - flat_logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  confidence, correct = probs.max(-1), probs.argmax(-1) == flat_labels.argmax(-1)
  edges = np.linspace(0, 1, 16)
  expected = 0.0
  for low, high in zip(edges[:-1], edges[1:]):
    inside = (confidence > low) & (confidence <= high)
    if inside.any():
      expected += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
  assert metrics['ece_test'] == pytest.approx(expected, abs=1e-6)
  assert metrics['loss_test'] == pytest.approx(  # The mean negative log-likelihood.
      -np.log(probs[np.arange(len(probs)), flat_labels.argmax(-1)]).mean(), rel=1e-5)
  bins = metrics['reliability_test']
  assert sum(bins['count']) == 70 and len(bins['accuracy']) == 15
  assert bins['count'][:3] == [0, 0, 0] and bins['accuracy'][0] is None  # Never below 1/5.

  from vit_jax import report
  (tmp_path / 'results.json').write_text(json.dumps(
      {'step': 1, 'wall_time_sec': 1.0, 'test': metrics}))
  report.reliability_diagram([str(tmp_path)], str(tmp_path / 'reliability.png'))
  assert Image.open(tmp_path / 'reliability.png').size[0] > 100


def test_a_run_writes_every_listed_evaluator(tmp_path):
  LocalReal(data_dir=str(tmp_path / 'tfds')).download_and_prepare()
  write_class_folders(tmp_path / 'animals', per_class=6, size=8, suffix='png')  # For few-shot.
  config = tiny_config(f'--config.tfds_data_dir={tmp_path / "tfds"}')
  with config.unlocked():
    config.evals.train = evaluators.classification('train', every=2)
    config.evals.real = evaluators.classification('validation', dataset='local_real',
                                                  label_key='real_label', every=6)
    config.evals.animals = evaluators.few_shot(
        {'animals': (f'folder:{tmp_path / "animals"}', 'train[:50%]', 'train[50%:]')},
        shots=(1, 2), seeds=2, every=3)
  results = train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  written = json.loads((tmp_path / 'workdir' / 'results.json').read_text())
  assert set(written) == {'step', 'train_loss', 'wall_time_sec', 'segments', 'test', 'train',
                          'real', 'animals'}
  assert written['train'].keys() == written['real'].keys() == written['test'].keys() == {
      'accuracy_test', 'accuracy_test_top5', 'loss_test', 'ece_test', 'reliability_test'}
  assert written['animals'].keys() == {'animals_1shot', 'animals_2shot'}
  assert written['real'] == results['real']
  # Each at its own period (and at the last step): 'train' at 2, 4, 6, 'animals' at 3, 6.
  events = (tmp_path / 'workdir').glob('events.out.tfevents*')
  from tensorboard.backend.event_processing import event_accumulator
  tags = {}
  for path in events:
    accumulator = event_accumulator.EventAccumulator(str(path))
    accumulator.Reload()
    for tag in accumulator.Tags()['tensors']:
      tags[tag] = [event.step for event in accumulator.Tensors(tag)]
  assert tags['train/accuracy_test'] == [2, 4, 6] and tags['animals/animals_1shot'] == [3, 6]
  assert tags['test/accuracy_test'] == [3, 6] and tags['real/loss_test'] == [6]
  assert tags['test/ece_test'] == [3, 6] and not any('reliability' in tag for tag in tags)


def test_an_evaluator_of_another_class_count_is_named_before_training(tmp_path):
  config = tiny_config()
  (tmp_path / 'data' / 'a').mkdir(parents=True)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'data' / 'a' / '0.png')
  with config.unlocked():
    config.evals.other = evaluators.classification('train', dataset=f'folder:{tmp_path / "data"}')
  with pytest.raises(ValueError, match=r'evals.other: folder:.* has 1 classes, the model 10'):
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert not list((tmp_path / 'workdir').glob('checkpoints/*'))
