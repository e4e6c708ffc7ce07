"""VTAB-1k: each task's splits and labels as the benchmark defines them, read through a TFDS
stand-in with the real features; the sweep's choice of learning rate, its table, and a killed
sweep that resumes without redoing finished runs (on the embedded digits)."""

import json

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from helpers import ROOT, parse_config, run_main, snapshot
from vit_jax import input_pipeline, vtab, vtab_tasks

# The real datasets' split sizes (TFDS), from which the benchmark slices its splits.
SIZES = {
    'caltech101': dict(train=3060, test=6084), 'cifar100': dict(train=50000, test=10000),
    'dtd': dict(train=1880, validation=1880, test=1880),
    'oxford_flowers102': dict(train=1020, validation=1020, test=6149),
    'oxford_iiit_pet': dict(train=3680, test=3669),
    'sun397/tfds': dict(train=76128, validation=10875, test=21750),
    'svhn_cropped': dict(train=73257, test=26032, extra=531131),
    'patch_camelyon': dict(train=262144, validation=32768, test=32768),
    'eurosat/rgb': dict(train=27000), 'resisc45': dict(train=31500),
    'diabetic_retinopathy_detection/btgraham-300': dict(train=35126, validation=10906,
                                                        test=42670),
    'clevr': dict(train=70000, validation=15000, test=15000),
    'dmlab': dict(train=65550, validation=22628, test=22735), 'dsprites': dict(train=737280),
    'kitti': dict(train=6347, validation=423, test=711),
    'smallnorb': dict(train=24300, test=24300)}
# Where task_adaptation takes val200 and test from, and the test split's size.
EXPECTED = {
    'caltech101': ('train', 'test', 6084), 'cifar100': ('train', 'test', 10000),
    'dtd': ('validation', 'test', 1880), 'oxford_flowers102': ('validation', 'test', 6149),
    'oxford_iiit_pet': ('train', 'test', 3669), 'sun397': ('validation', 'test', 21750),
    'svhn': ('train', 'test', 26032), 'patch_camelyon': ('validation', 'test', 32768),
    'eurosat': ('train', 'train', 5400), 'resisc45': ('train', 'train', 6300),
    'diabetic_retinopathy': ('validation', 'test', 42670),
    'clevr_count': ('train', 'validation', 15000), 'clevr_distance': ('train', 'validation', 15000),
    'dmlab': ('validation', 'test', 22735), 'dsprites_location': ('train', 'train', 73728),
    'dsprites_orientation': ('train', 'train', 73728),
    'kitti_distance': ('validation', 'test', 711),
    'smallnorb_azimuth': ('test', 'test', 12150), 'smallnorb_elevation': ('test', 'test', 12150)}


def absolute(split: str, sizes: dict):
  infos = {k: tfds.core.SplitInfo(name=k, shard_lengths=[v], num_bytes=0)
           for k, v in sizes.items()}
  return [(i.splitname, i.from_ or 0, sizes[i.splitname] if i.to is None else i.to)
          for i in tfds.core.ReadInstruction.from_spec(split).to_absolute(infos)]


def count(ranges):
  return sum(end - start for _, start, end in ranges)


@pytest.mark.parametrize('name', vtab_tasks.VTAB_1K)
def test_every_task_has_the_benchmark_splits(name):
  task = vtab_tasks.get(name)
  sizes = SIZES[task.dataset]
  splits = {s: absolute(vtab_tasks.tfds_split(task, s, sizes), sizes) for s in vtab_tasks.SPLITS}
  assert (count(splits['train800']), count(splits['val200']),
          count(splits['train800val200'])) == (800, 200, 1000)
  assert sorted(splits['train800val200']) == sorted(splits['train800'] + splits['val200'])
  val_from, test_from, test_size = EXPECTED[name]
  assert {s for s, _, _ in splits['val200']} == {val_from}
  assert {s for s, _, _ in splits['test']} == {test_from} and count(splits['test']) == test_size
  # No example is in two of train800, val200 and test.
  for a, b in [('train800', 'val200'), ('train800', 'test'), ('val200', 'test')]:
    for split_a, start_a, end_a in splits[a]:
      for split_b, start_b, end_b in splits[b]:
        assert split_a != split_b or end_a <= start_b or end_b <= start_a, (a, b)
  assert len(vtab_tasks.VTAB_1K) == 19
  assert {t.group for t in vtab_tasks.TASKS.values()} == set(vtab_tasks.GROUPS)


def test_derived_labels_equal_an_independent_computation():
  rng = np.random.default_rng(0)
  for _ in range(20):
    n = int(rng.integers(3, 11))
    depth = rng.uniform(6, 12, n).astype(np.float32)
    clevr = {'objects': {'size': tf.constant(rng.integers(0, 2, n)),
                         'pixel_coords': tf.constant(np.stack([depth, depth, depth], 1))}}
    assert int(vtab_tasks.clevr_count(clevr)) == n - 3
    bins = [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0]
    assert int(vtab_tasks.clevr_distance(clevr)) == max(
        i for i, t in enumerate(bins) if t < depth.min())

    m = int(rng.integers(0, 6))
    types = rng.integers(0, 8, m)
    z = rng.uniform(0, 40, m).astype(np.float32)
    kitti = {'objects': {'type': tf.constant(types, tf.int64),
                         'location': tf.constant(np.stack([z, z, z], 1).reshape(m, 3))}}
    vehicles = z[types < 3]
    closest = vehicles.min() if len(vehicles) else 1000.0
    expected = 0 if closest <= 8 else 1 if closest <= 20 else 2 if closest <= 999 else 3
    assert int(vtab_tasks.kitti_distance(kitti)) == expected

    x, orientation = int(rng.integers(0, 32)), int(rng.integers(0, 40))
    sprite = {'label_x_position': tf.constant(x, tf.int64),
              'label_orientation': tf.constant(orientation, tf.int64)}
    assert int(vtab_tasks.get('dsprites_location').label(sprite)) == x // 2
    assert int(vtab_tasks.get('dsprites_orientation').label(sprite)) == int(orientation // 2.5)


class Dsprites(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Stands in for TFDS dsprites: its name, version and features, 2,000 synthetic examples."""
  name = 'dsprites'
  VERSION = tfds.builder_cls('dsprites').VERSION

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.builder('dsprites').info.features)

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(2000):
      image = np.zeros((64, 64, 1), np.uint8)
      image[i % 64, :, 0] = 1  # dSprites' pixels are 0 or 1.
      yield i, {'image': image, 'label_orientation': i % 40, 'label_scale': 0, 'label_shape': 0,
                'label_x_position': i % 32, 'label_y_position': 0, 'value_orientation': 0.0,
                'value_scale': 0.0, 'value_shape': 0.0, 'value_x_position': 0.0,
                'value_y_position': 0.0}


def test_a_tfds_task_through_a_stand_in_with_the_real_features(tmp_path):
  Dsprites(data_dir=str(tmp_path)).download_and_prepare()
  config = parse_config('--config=configs/vtab.py:testing,dsprites_location',
                        f'--config.tfds_data_dir={tmp_path}', '--config.pp.crop=8')
  sizes = {}
  for split in vtab_tasks.SPLITS:
    source = input_pipeline.get_source(config, split)
    sizes[split] = source.num_examples
    assert source.num_classes == 16
    examples = list(source.shard().as_numpy_iterator())
    # Example i has x position i % 32 (class i % 32 // 2) and row i % 64 lit, at 255 now.
    rows = [int(np.argmax(e['image'][:, 0, 0])) for e in examples]
    assert [e['label'] for e in examples] == [row % 32 // 2 for row in rows]
    assert examples[3]['image'].shape == (64, 64, 3) and examples[3]['image'].max() == 255
  assert sizes == {'train800': 800, 'val200': 200, 'train800val200': 1000, 'test': 200}


def test_the_sweep_picks_the_best_val200_learning_rate(monkeypatch, tmp_path):
  accuracies = {('digits', 0.01, 'val200'): 0.5, ('digits', 0.1, 'val200'): 0.7,
                ('digits', 0.1, 'test'): 0.65, ('digits_parity', 0.01, 'val200'): 0.9,
                ('digits_parity', 0.1, 'val200'): 0.8, ('digits_parity', 0.01, 'test'): 0.85}
  monkeypatch.setattr(vtab, 'run', lambda config, workdir: accuracies[
      config.dataset[len('vtab:'):], config.base_lr, config.test_split])
  config = parse_config('--config=configs/vtab.py:testing,digits')
  results = vtab.sweep(config, str(tmp_path), ['digits', 'digits_parity'], [0.01, 0.1])
  assert (results['digits']['lr'], results['digits']['test']) == (0.1, 0.65)
  assert (results['digits_parity']['lr'], results['digits_parity']['test']) == (0.01, 0.85)
  means = vtab.summary({'a': {'group': 'natural', 'test': 0.5},
                        'b': {'group': 'natural', 'test': 0.7},
                        'c': {'group': 'structured', 'test': 0.3}})
  assert means == pytest.approx({'natural': 0.6, 'structured': 0.3, 'all': 0.5})


def test_a_killed_sweep_resumes_without_redoing_finished_runs(tmp_path, monkeypatch):
  """2 tasks x 2 learning rates on the digits, end to end; killed during its third run, then
  started again from the command line."""
  from vit_jax import train
  args = ['--config.pp.crop=16', '--config.batch=16', '--config.batch_eval=100',
          '--config.total_steps=3', '--config.warmup_steps=1', '--config.eval_every=3',
          '--config.checkpoint_every=3', '--config.compilation_cache_dir=']
  config = parse_config('--config=configs/vtab.py:testing,digits', *args)
  trained = []
  real = train.train_and_evaluate

  def killed_at_the_third(config, workdir):
    if len(trained) == 2:
      raise KeyboardInterrupt
    trained.append(workdir)
    return real(config, workdir)

  monkeypatch.setattr(train, 'train_and_evaluate', killed_at_the_third)
  with pytest.raises(KeyboardInterrupt):
    vtab.sweep(config, str(tmp_path), ['digits', 'digits_parity'], [0.01, 0.3])
  assert [w.split('/')[-1] for w in trained] == ['lr_0.01', 'lr_0.3']
  before = {w: (tmp_path / w / 'results.json').stat().st_mtime_ns for w in trained}

  result = run_main('--pretrained=testing', f'--workdir={tmp_path}',
                    '--tasks=digits,digits_parity', '--lrs=0.01,0.3', *args,
                    module='vit_jax.vtab')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'finished before with this setting, skipped' in result.stderr
  assert {w: (tmp_path / w / 'results.json').stat().st_mtime_ns for w in trained} == before
  written = json.loads((tmp_path / 'vtab.json').read_text())
  for name, task in written['tasks'].items():
    val = {float(lr): acc for lr, acc in task['val200'].items()}
    assert task['lr'] == max(val, key=val.get)
    final = json.loads((tmp_path / name / 'final' / 'results.json').read_text())
    assert task['test'] == final['test']['accuracy_test']
  assert written['means']['all'] == pytest.approx(
      np.mean([t['test'] for t in written['tasks'].values()]))
  assert 'mean all' in result.stdout and 'digits_parity' in result.stdout

  # Finished runs of another setting are refused, not reported: nothing trains, nothing changes.
  monkeypatch.setattr(train, 'train_and_evaluate', lambda *a: pytest.fail('trained'))
  before = snapshot(tmp_path)
  longer = parse_config('--config=configs/vtab.py:testing,digits', *args,
                        '--config.total_steps=4')
  with pytest.raises(vtab.SweepMismatchError, match=r'lr_0.01 holds a run of another setting '
                     r'.*total_steps: 3 there, 4 now'):
    vtab.sweep(longer, str(tmp_path), ['digits'], [0.01, 0.3])
  chosen = written['tasks']['digits']['lr']
  other = 0.3 if chosen == 0.01 else 0.01  # Its val200 run finished: it becomes the choice.
  with pytest.raises(vtab.SweepMismatchError,
                     match=rf'final holds a run .*base_lr: {chosen!r} there, {other!r} now'):
    vtab.sweep(config, str(tmp_path), ['digits'], [other])
  assert snapshot(tmp_path) == before


def test_learning_rates_and_tasks_are_refused_before_anything_trains():
  from absl import app
  for bad in ([], [''], ['abc'], ['0.01', 'nan'], ['-1']):
    with pytest.raises(app.UsageError, match='--lrs'):
      vtab.parse_lrs(bad)
  assert vtab.parse_lrs(['0.01', '3e-2']) == [0.01, 0.03]
  assert vtab.with_pretrained_flag(['vtab', '--pretrained=B_16', '--tasks=']) == [
      'vtab', f'--config={ROOT}/configs/vtab.py:B_16,{vtab_tasks.VTAB_1K[0]}', '--tasks=']


# ------------------------------------------------- every task through a stand-in of its dataset

def encode_index(shape, index: int) -> np.ndarray:
  """An image that says which example it is: RGB levels 16 x (3 hex digits of index); grey
  images in three bands; 0/1 images (dSprites) in binary along the first row."""
  digits = [index // 256 % 16, index // 16 % 16, index % 16]
  image = np.zeros(shape, np.uint8)
  if shape[-1] == 3:
    image[:] = np.asarray(digits, np.uint8) * 16
  elif shape[0] == 64:
    image[0, :12, 0] = [(index >> bit) & 1 for bit in range(12)]
  else:
    for band, digit in enumerate(digits):
      image[band * shape[0] // 3:(band + 1) * shape[0] // 3] = digit * 16
  return image


def decode_index(image: np.ndarray, binary: bool) -> int:
  if binary:  # Scaled to 255 by the pipeline.
    return sum(1 << bit for bit in range(12) if image[0, bit, 0] > 127)
  height = image.shape[0]
  levels = [image[height // 6, 0], image[height // 2, 0], image[5 * height // 6, 0]]
  if np.ptp(image[:, :, 0]) < 8:  # Solid colour: the digits are the channels.
    digits = [int(round(float(image[..., c].mean()) / 16)) for c in range(3)]
  else:  # Grey bands.
    digits = [int(round(float(v[0]) / 16)) for v in levels]
  return digits[0] * 256 + digits[1] * 16 + digits[2]


def synthetic(feature, rng, index: int):
  """A value of a TFDS feature: images that encode `index`, sequences of 3 to 10 elements
  (CLEVR counts 3 to 10 objects)."""
  features = tfds.features
  if isinstance(feature, features.FeaturesDict):
    return {k: synthetic(v, rng, index) for k, v in feature.items()}
  if isinstance(feature, features.Sequence):
    return [synthetic(feature.feature, rng, index) for _ in range(int(rng.integers(3, 11)))]
  if isinstance(feature, features.Image):
    return encode_index(tuple(48 if d is None else d for d in feature.shape), index)
  if isinstance(feature, features.ClassLabel):
    return int(rng.integers(0, feature.num_classes))
  if isinstance(feature, features.BBoxFeature):
    low, high = sorted(rng.uniform(0, 1, 2))
    return features.BBox(low, low, high, high)
  if isinstance(feature, features.Text):
    return f'example {index}'
  shape = tuple(3 if d is None else d for d in feature.shape)
  return rng.uniform(0, 40, shape).astype(np.float32)


# Split sizes of the stand-ins: enough for the benchmark's slices of each kind of dataset.
STAND_IN_SIZES = {'train': 2000, 'validation': 200, 'test': 400}


def stand_in(dataset: str, splits, data_dir) -> dict:
  """Prepares `dataset` (a TFDS name, maybe with its config) under data_dir with the real
  builder's name, version, config and features and STAND_IN_SIZES synthetic examples in each of
  `splits`; returns {split: [examples]}, example i's image encoding i."""
  real = tfds.builder(dataset)
  rng = np.random.default_rng(0)
  generated = {s: [synthetic(real.info.features, rng, i) for i in range(STAND_IN_SIZES[s])]
               for s in splits}

  class StandIn(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = real.name
    VERSION = real.version
    BUILDER_CONFIGS = [real.builder_config] if real.builder_config else []

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=real.info.features)

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(s) for s in splits}

    def _generate_examples(self, split):
      yield from enumerate(generated[split])

  config = real.builder_config.name if real.builder_config else None
  StandIn(config=config, data_dir=str(data_dir)).download_and_prepare()
  return generated


def expected_label(task_name: str, example: dict) -> int:
  """The benchmark's label, computed here from the generated example with numpy."""
  if task_name == 'clevr_count':
    return len(example['objects']) - 3
  if task_name == 'clevr_distance':
    depth = min(o['pixel_coords'][2] for o in example['objects'])
    return max(i for i, t in enumerate([0, 8, 8.5, 9, 9.5, 10, 100]) if t < depth)
  if task_name == 'kitti_distance':
    depths = [o['location'][2] for o in example['objects'] if o['type'] < 3] + [1000.0]
    return max(i for i, t in enumerate([-100, 8, 20, 999]) if t < min(depths))
  if task_name == 'dsprites_location':
    return example['label_x_position'] // 2
  if task_name == 'dsprites_orientation':
    return int(example['label_orientation'] // 2.5)
  if task_name.startswith('smallnorb_'):
    return example['label_' + task_name.split('_')[1]]
  return example['label']


@pytest.mark.slow
def test_every_task_reads_a_stand_in_of_its_dataset(tmp_path):
  """Each of the 19 tasks through get_source on a stand-in with its dataset's real TFDS name,
  version, config and features: every VTAB split opens with its 800 / 200 / 1000 examples, and
  each example read has the label the benchmark derives from that example."""
  prepared = {}
  for name in vtab_tasks.VTAB_1K:
    task = vtab_tasks.get(name)
    if task.dataset not in prepared:
      wanted = {s.split('[')[0] for split in task.splits({'train': 2000}).values()
                for s in split.split('+')}
      prepared[task.dataset] = stand_in(task.dataset, sorted(wanted), tmp_path)
    generated = prepared[task.dataset]
    config = parse_config(f'--config=configs/vtab.py:testing,{name}',
                          f'--config.tfds_data_dir={tmp_path}')
    sizes = {k: len(v) for k, v in generated.items()}
    for split in vtab_tasks.SPLITS:
      source = input_pipeline.get_source(config, split)
      tfds_split = vtab_tasks.tfds_split(task, split, sizes)
      assert source.num_examples == count(absolute(tfds_split, sizes)), (name, split)
      if split != 'test':
        assert source.num_examples == {'train800': 800, 'val200': 200}.get(split, 1000)
      origin = {s.split('[')[0] for s in tfds_split.split('+')}
      for example in source.shard().take(8).as_numpy_iterator():
        image = np.asarray(source.decode(example['image']))
        index = decode_index(image, binary=task.scale_pixels != 1)
        assert int(example['label']) in [expected_label(name, generated[s][index])
                                         for s in origin if index < len(generated[s])], (name,
                                                                                           split)
