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


class LocalCorrupted(tfds.core.GeneratorBasedBuilder):
  """Stands in for imagenet2012_corrupted: one config per corruption and severity; its labels
  use 3 of its 10 classes (as ImageNet-A/R use 200 of 1000)."""
  VERSION = tfds.core.Version('1.0.0')
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=f'{c}_{s}') for c in ('fog', 'snow')
                     for s in (1, 2)]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 3)),
        'label': tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {'validation': self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(len(self.builder_config.name))
    for i in range(12):
      yield i, {'image': rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), 'label': i % 3 * 3}


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


def test_only_the_present_classes_are_predicted():
  """ImageNet-A/R scoring: the logits of classes absent from the split are masked out."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(16, 10)).astype(np.float32)
  labels = np.eye(10, dtype=np.float32)[rng.choice([0, 3, 6], 16)]
  present = np.isin(np.arange(10), [0, 3, 6]).astype(np.float32)

  class Model:
    def apply(self, variables, images, train):
      return images

  batch = {'image': jnp.asarray(logits), 'labels': jnp.asarray(labels), 'mask': jnp.ones(16),
           'classes': jnp.asarray(np.tile(present, (16, 1)))}
  sums = objectives.Classification(10).eval_sums(Model(), None, batch)
  subset = logits[:, [0, 3, 6]]
  predicted = np.array([0, 3, 6])[subset.argmax(-1)]
  assert float(sums['top1']) == (predicted == labels.argmax(-1)).sum()
  log_softmax = subset - np.log(np.exp(subset).sum(-1, keepdims=True))
  nll = -log_softmax[np.arange(16), [[0, 3, 6].index(c) for c in labels.argmax(-1)]]
  assert float(sums['loss']) == pytest.approx(nll.sum(), rel=1e-5)


def test_mean_corruption_error_is_normalised_by_alexnet():
  # AlexNet's published top-1 errors per severity (Hendrycks & Dietterich 2019) average to the
  # normalisers, so AlexNet's own errors give CE = mCE = 1.
  published = {'gaussian_noise': (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
               'shot_noise': (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
               'impulse_noise': (0.78374, 0.89808, 0.9487, 0.9872, 0.99548),
               'defocus_blur': (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
               'glass_blur': (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
               'motion_blur': (0.5843, 0.70048, 0.82108, 0.8975, 0.92638)}
  severities = (1, 2, 3, 4, 5)
  errors = {(c, s): e[s - 1] for c, e in published.items() for s in severities}
  results = evaluators.corruption_errors(errors, severities)
  assert results['mce'] == pytest.approx(1.0, abs=1e-6)
  assert all(results[f'{c}_ce'] == pytest.approx(1.0, abs=1e-6) for c in published)
  halved = evaluators.corruption_errors({k: e / 2 for k, e in errors.items()}, severities)
  assert halved['mce'] == pytest.approx(0.5) and halved['gaussian_noise_error'] == pytest.approx(
      0.886428 / 2)
  assert len(evaluators.CORRUPTION_ALEXNET_ERRORS) == 15


def test_a_run_writes_every_listed_evaluator(tmp_path):
  LocalReal(data_dir=str(tmp_path / 'tfds')).download_and_prepare()
  for name in ('fog_1', 'fog_2', 'snow_1', 'snow_2'):
    LocalCorrupted(config=name, data_dir=str(tmp_path / 'tfds')).download_and_prepare()
  write_class_folders(tmp_path / 'animals', per_class=6, size=8, suffix='png')  # For few-shot.
  config = tiny_config(f'--config.tfds_data_dir={tmp_path / "tfds"}')
  with config.unlocked():
    config.evals.train = evaluators.classification('train', every=2)
    config.evals.real = evaluators.classification('validation', dataset='local_real',
                                                  label_key='real_label', every=6)
    config.evals.animals = evaluators.few_shot(
        {'animals': (f'folder:{tmp_path / "animals"}', 'train[:50%]', 'train[50%:]')},
        shots=(1, 2), seeds=2, every=3)
    config.evals.corrupted = evaluators.corruption(dataset='local_corrupted',
                                                   corruptions=('fog', 'snow'),
                                                   severities=(1, 2), every=6)
    config.evals.subset = evaluators.classification('validation', dataset='local_corrupted/fog_1',
                                                    classes='present', every=6)
  results = train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  written = json.loads((tmp_path / 'workdir' / 'results.json').read_text())
  assert set(written) == {'step', 'train_loss', 'wall_time_sec', 'segments', 'test', 'train',
                          'real', 'animals', 'corrupted', 'subset'}
  corrupted = written['corrupted']
  assert corrupted.keys() == {'fog_error', 'fog_ce', 'snow_error', 'snow_ce', 'mce'}
  assert corrupted['fog_ce'] == pytest.approx(corrupted['fog_error'] / 0.819324)
  assert corrupted['mce'] == pytest.approx((corrupted['fog_ce'] + corrupted['snow_ce']) / 2)
  # Only classes 0, 3 and 6 can be predicted: every label is among the top 3 of them.
  assert written['subset']['accuracy_test_top5'] == 1.0
  assert sum(written['subset']['reliability_test']['count']) == 12
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


def test_report_puts_the_published_result_beside_the_run(tmp_path, capsys):
  from vit_jax import published, report

  def workdir(name, pretrained_path, dataset, model='ViT-B_16', dropout=0.1, top1=0.9801,
              steps=10_000):
    path = tmp_path / name
    path.mkdir()
    (path / 'config.json').write_text(json.dumps({
        'pretrained_path': pretrained_path, 'dataset': dataset, 'total_steps': steps,
        'pp': {'crop': 384}, 'model': {'model_name': model, 'transformer': {'dropout_rate': dropout}}}))
    (path / 'results.json').write_text(json.dumps(
        {'step': 10_000, 'wall_time_sec': 5.0, 'test': {'accuracy_test': top1}}))
    return str(path)

  official = workdir('b16', 'gs://vit_models/imagenet21k/ViT-B_16.npz', 'cifar10')
  augreg = workdir('s16', '/data/vit_models/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-'
                   'do_0.0-sd_0.0.npz', 'imagenet2012', model='ViT-S_16', dropout=0.0,
                   steps=20_000)
  scratch = workdir('scratch', None, 'cifar10')
  short = workdir('short', 'gs://vit_models/imagenet21k/ViT-B_16.npz', 'cifar100', dropout=0.0,
                  steps=500)
  other_steps = workdir('other', 'gs://vit_models/imagenet21k/ViT-B_16.npz', 'cifar10',
                        steps=2000)
  assert published.for_workdir(official) == published.Published(0.9876, 'official repository',
                                                                 '7.8h V100')
  assert published.for_workdir(official, 'imagenet2012') is None  # Not this run's dataset.
  assert published.for_workdir(augreg).top1 == 0.8373
  assert published.for_workdir(scratch) is None and published.for_workdir(other_steps) is None
  assert published.for_workdir(short) == published.Published(0.8917, 'official repository',
                                                              '17m')
  report.main([official, scratch])
  lines = capsys.readouterr().out.splitlines()
  assert lines[1].split()[1:5] == ['10000', '98.01%', '98.76%', '-0.75%']
  assert lines[2] == '  paper: official repository, 7.8h V100'
  assert lines[3].split()[1:5] == ['10000', '98.01%', '-', '-']
