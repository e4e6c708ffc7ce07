"""Data: the embedded digits, image folders, a local TFDS dataset; determinism; shards; eval."""

import logging

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from helpers import write_class_folders
from vit_jax import config_lib, input_pipeline


def make_config(dataset='digits', crop=8, **kwargs):
  c = config_lib.base_config()
  c.dataset = dataset
  c.pp.crop = crop
  c.pp.flip = True
  c.shuffle_buffer = 500
  c.folder_index_dir = ''  # No index written outside the test's folders.
  c.update(kwargs)
  return c


def test_digits_fixed_split_and_disjoint_process_shards():
  config = make_config()
  train = input_pipeline.get_source(config, 'train')
  test = input_pipeline.get_source(config, 'test')
  assert (train.num_examples, test.num_examples, train.num_classes) == (1438, 359, 10)
  shards = [input_pipeline.get_source(config, 'test', process_index=i, process_count=3)
            for i in range(3)]
  images = [np.stack([ex['image'] for ex in s.shard().as_numpy_iterator()]) for s in shards]
  assert [len(x) for x in images] == [120, 120, 119]
  all_images = np.concatenate(images).reshape(359, -1)
  whole = test.examples['image'].reshape(359, -1)
  assert sorted(map(bytes, all_images)) == sorted(map(bytes, whole))


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_batches_are_a_function_of_seed_and_step():
  config = make_config()
  source = input_pipeline.get_source(config, 'train')
  first = take(input_pipeline.train_batches(config, source, batch_size=100), 20)
  again = take(input_pipeline.train_batches(config, source, batch_size=100), 20)
  resumed = take(input_pipeline.train_batches(config, source, batch_size=100, start_step=17), 3)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  for a, b in zip(first[17:], resumed):  # Step 17 lies in the second epoch (1438 / 100).
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['labels'], b['labels'])
  other_seed = take(input_pipeline.train_batches(make_config(seed=1), source, batch_size=100), 1)
  assert not np.array_equal(first[0]['image'], other_seed[0]['image'])
  batch = first[0]
  assert batch['image'].shape == (100, 8, 8, 3) and batch['labels'].shape == (100, 10)
  assert batch['image'].min() >= -1 and batch['image'].max() <= 1
  np.testing.assert_array_equal(batch['labels'].sum(-1), 1)


def test_global_batches_do_not_depend_on_the_process_count():
  config = make_config()
  one = take(input_pipeline.train_batches(
      config, input_pipeline.get_source(config, 'train'), batch_size=96, start_step=14), 2)
  parts = [take(input_pipeline.train_batches(
      config, input_pipeline.get_source(config, 'train', process_index=i, process_count=3),
      batch_size=32, start_step=14), 2) for i in range(3)]
  for step in range(2):  # Step 14 straddles the end of the first epoch (1438 / 96 = 14.98).
    for key in ('image', 'labels'):
      np.testing.assert_array_equal(
          np.concatenate([part[step][key] for part in parts]), one[step][key])


def test_each_epoch_visits_every_example_once():
  config = make_config()
  config.pp.crop_min_area = 1.0
  config.pp.flip = False
  source = input_pipeline.get_source(config, 'test')  # 359 examples
  batches = take(input_pipeline.train_batches(config, source, batch_size=359), 2)
  for batch in batches:
    assert len({bytes(x) for x in batch['image']}) == len(
        {bytes(x) for x in source.examples['image']})
  assert not np.array_equal(batches[0]['labels'], batches[1]['labels'])  # Reshuffled.


@pytest.mark.parametrize('process_count', [1, 3])
def test_eval_counts_every_example_once(process_count):
  config = make_config()
  shards = [input_pipeline.get_source(config, 'test', process_index=i, process_count=process_count)
            for i in range(process_count)]
  steps = input_pipeline.eval_steps(shards[0], batch_size=64, process_count=process_count)
  labels, count = np.zeros(10), 0
  for source in shards:
    batches = list(input_pipeline.eval_batches(config, source, batch_size=64, num_steps=steps))
    assert len(batches) == steps  # The same for every process.
    for batch in batches:
      assert batch['image'].shape == (64, 8, 8, 3)
      labels += (batch['labels'] * batch['mask'][:, None]).sum(0)
      count += batch['mask'].sum()
  assert count == 359
  whole = input_pipeline.get_source(config, 'test').examples['label']
  np.testing.assert_array_equal(labels, np.bincount(whole, minlength=10))


def write_image_folder(root, classes=('cat', 'dog'), per_class=3, size=(20, 30)):
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for name in classes:
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(per_class):
        pixels = rng.integers(0, 255, size + (3,), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f'{i}.{"png" if i % 2 else "jpg"}')
  return root


def test_image_folder(tmp_path):
  root = write_image_folder(tmp_path / 'pets')
  config = make_config(f'folder:{root}', crop=16)
  source = input_pipeline.get_source(config, 'train')
  assert (source.num_examples, source.num_classes) == (6, 2)
  batch = next(input_pipeline.train_batches(config, source, batch_size=4))
  assert batch['image'].shape == (4, 16, 16, 3)
  eval_batch = next(input_pipeline.eval_batches(config, source, batch_size=8, num_steps=1))
  np.testing.assert_array_equal(eval_batch['mask'], [1] * 6 + [0] * 2)
  np.testing.assert_array_equal(sorted(eval_batch['labels'][:6].argmax(-1)), [0, 0, 0, 1, 1, 1])
  both = input_pipeline.get_source(config, 'train+test[:50%]')  # Files named under the root.
  assert sorted(n.decode().split('/')[0] for n in both.examples['image']) == ['test'] * 3 + [
      'train'] * 6
  assert len(list(both.shard().map(lambda ex: both.decode(ex['image'])))) == 9


def test_class_folders_without_splits_are_sliced_like_tfds(tmp_path):
  root = write_class_folders(tmp_path / 'in21k')
  config = make_config(f'folder:{root}')
  train = input_pipeline.get_source(config, 'train[:80%]')
  held_out = input_pipeline.get_source(config, 'train[80%:]')
  whole = input_pipeline.get_source(config, 'train')
  assert (train.num_examples, held_out.num_examples, whole.num_examples) == (24, 6, 30)
  assert train.num_classes == held_out.num_classes == 3
  assert not set(train.examples['image']) & set(held_out.examples['image'])
  assert set(train.examples['image']) | set(held_out.examples['image']) == set(
      whole.examples['image'])
  # Ordered by a hash of the path, not by class: the held-out part draws from every class.
  assert len(set(held_out.examples['label'])) > 1
  for path, label in zip(whole.examples['image'], whole.examples['label']):
    assert path.decode().split('/')[-2] == ['cat', 'dog', 'owl'][label]
  with pytest.raises(ValueError, match=r"has no split 'test'; it has no split folders: its one "
                                       r"split is 'train'"):
    input_pipeline.get_source(config, 'test')
  with pytest.raises(ValueError, match=r"Split 'train\[x\]' of image folder .*in21k"):
    input_pipeline.get_source(config, 'train[x]')


def test_folder_listing_is_indexed_once(tmp_path, monkeypatch, caplog):
  root = write_class_folders(tmp_path / 'in21k')
  config = make_config(f'folder:{root}', folder_index_dir=str(tmp_path / 'index'))
  first = input_pipeline.get_source(config, 'train[:50%]')
  assert len(list((tmp_path / 'index').iterdir())) == 1
  listed = []
  listdir = tf.io.gfile.listdir
  monkeypatch.setattr(tf.io.gfile, 'listdir', lambda d: listed.append(d) or listdir(d))
  again = input_pipeline.get_source(config, 'train[:50%]')
  np.testing.assert_array_equal(again.examples['image'], first.examples['image'])
  # The layout costs two listings (the root, its first folder); the classes are not listed.
  assert str(root / 'owl') not in listed and len(listed) == 2
  Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(root / 'cat' / 'new.jpg')
  assert input_pipeline.get_source(config, 'train').num_examples == 31  # Out of date: relisted.
  index, = (tmp_path / 'index').iterdir()
  index.write_bytes(index.read_bytes()[:100])  # Torn (a full disk): listed again, not fatal.
  assert input_pipeline.get_source(config, 'train').num_examples == 31
  assert index.stat().st_size > 100
  not_a_folder = tmp_path / 'file'
  not_a_folder.write_text('kept')
  config.folder_index_dir = str(not_a_folder)  # Cannot be written (not even by root): no index.
  with caplog.at_level(logging.WARNING):
    assert input_pipeline.get_source(config, 'train').num_examples == 31
  assert f'Cannot write the file index {not_a_folder}' in caplog.text
  assert not_a_folder.read_text() == 'kept'


def test_image_folder_errors_name_the_place(tmp_path):
  root = write_image_folder(tmp_path / 'pets')
  with pytest.raises(ValueError, match=r"has no split 'validation'"):
    input_pipeline.get_source(make_config(f'folder:{root}'), 'validation')
  (root / 'train' / 'bird').mkdir()
  with pytest.raises(ValueError, match=r'Class folder .*train/bird holds no'):
    input_pipeline.get_source(make_config(f'folder:{root}'), 'train')
  with pytest.raises(ValueError, match=r'Image folder .*nowhere does not exist'):
    input_pipeline.get_source(make_config(f'folder:{tmp_path}/nowhere'), 'train')
  with pytest.raises(ValueError, match=r'num_classes=5, but folder:.* has 3'):
    input_pipeline.get_source(make_config(f'folder:{root}', num_classes=5), 'test')


class LocalShapes(tfds.core.GeneratorBasedBuilder):
  """A TFDS dataset built from generated images: stands in for TFDS downloads in tests."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(12, 12, 3)),
        'label': tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(30, 0), 'test': self._generate_examples(11, 1)}

  def _generate_examples(self, count, seed):
    rng = np.random.default_rng(seed)
    for i in range(count):
      yield i, {'image': rng.integers(0, 255, (12, 12, 3), dtype=np.uint8), 'label': i % 3}


def test_local_tfds_dataset(tmp_path):
  LocalShapes(data_dir=str(tmp_path)).download_and_prepare()
  config = make_config('local_shapes', crop=8, tfds_data_dir=str(tmp_path))
  source = input_pipeline.get_source(config, 'train[:20]', process_index=1, process_count=2)
  assert (source.num_examples, source.stream_size, source.num_classes) == (20, 10, 3)
  batches = take(input_pipeline.train_batches(config, source, batch_size=4), 6)
  again = take(input_pipeline.train_batches(config, source, batch_size=4, start_step=4), 2)
  np.testing.assert_array_equal(batches[4]['image'], again[0]['image'])
  test = input_pipeline.get_source(config, 'test')
  batch = next(input_pipeline.eval_batches(config, test, batch_size=16, num_steps=1))
  assert batch['mask'].sum() == 11 and batch['image'].shape == (16, 8, 8, 3)


def test_tfds_errors(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown dataset 'no_such_dataset'"):
    input_pipeline.get_source(make_config('no_such_dataset', tfds_data_dir=str(tmp_path)), 'train')
  with pytest.raises(ValueError, match=r"'local_shapes' is not prepared in .*tfds_download"):
    input_pipeline.get_source(make_config('local_shapes', tfds_data_dir=str(tmp_path / 'empty')),
                              'train')
  LocalShapes(data_dir=str(tmp_path)).download_and_prepare()
  with pytest.raises(ValueError, match=r"Unknown split 'validation' of TFDS dataset 'local_shapes'"):
    input_pipeline.get_source(make_config('local_shapes', tfds_data_dir=str(tmp_path)),
                              'validation')


def test_tfds_download_gets_as_far_as_the_network(tmp_path, monkeypatch):
  """Every import the download path needs is installed (TFDS needs importlib_resources): a real
  builder's download_and_prepare, through get_source, fails only at the network, here a
  stand-in that refuses every request."""
  import requests

  def offline(*args, **kwargs):
    raise requests.exceptions.ConnectionError('no network in the tests')

  monkeypatch.setattr(requests.adapters.HTTPAdapter, 'send', offline)
  config = make_config('mnist', tfds_data_dir=str(tmp_path))
  config.tfds_download = True
  with pytest.raises(requests.exceptions.ConnectionError, match='no network in the tests'):
    input_pipeline.get_source(config, 'train')


def test_decode_handles_grayscale_and_alpha(tmp_path):
  gray = tmp_path / 'gray.png'
  Image.fromarray(np.full((5, 7), 200, np.uint8)).save(gray)
  rgba = tmp_path / 'rgba.png'
  Image.fromarray(np.full((5, 7, 4), 100, np.uint8)).save(rgba)
  for path in (gray, rgba):
    image = input_pipeline.preprocess.decode(tf.io.read_file(str(path))).numpy()
    assert image.shape == (5, 7, 3)


def write_imagenet2012_archives(manual_dir, rng):
  """ILSVRC2012_img_train.tar (one tar of JPEGs per synset) and ILSVRC2012_img_val.tar (flat
  JPEGs, labelled by TFDS's bundled validation_labels.txt in file-name order), as image-net.org
  ships them, with a few tiny images."""
  import io
  import tarfile

  def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))

  def jpeg():
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buffer, 'JPEG')
    return buffer.getvalue()

  manual_dir.mkdir()
  with tarfile.open(manual_dir / 'ILSVRC2012_img_train.tar', 'w') as train:
    for synset in ('n01440764', 'n01443537'):  # Classes 0 and 1 of labels.txt.
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as images:
        for i in range(3):
          add(images, f'{synset}_{i}.JPEG', jpeg())
      add(train, f'{synset}.tar', inner.getvalue())
  with tarfile.open(manual_dir / 'ILSVRC2012_img_val.tar', 'w') as val:
    for i in range(1, 3):
      add(val, f'ILSVRC2012_val_{i:08d}.JPEG', jpeg())


def test_imagenet2012_prepared_from_a_manual_dir(tmp_path):
  """The real TFDS imagenet2012 builder, from archives in config.tfds_manual_dir."""
  config = make_config('imagenet2012', crop=16, tfds_data_dir=str(tmp_path / 'data'),
                       tfds_download=True)
  with pytest.raises(ValueError, match=r"(?s)'imagenet2012' cannot be prepared: .*ILSVRC2012_"
                                       r"img_train.tar.*set tfds_manual_dir"):
    input_pipeline.get_source(config, 'train')
  write_imagenet2012_archives(tmp_path / 'manual', np.random.default_rng(0))
  config.tfds_manual_dir = str(tmp_path / 'manual')
  train = input_pipeline.get_source(config, 'train')
  validation = input_pipeline.get_source(config, 'validation')
  assert (train.num_examples, validation.num_examples, train.num_classes) == (6, 2, 1000)
  batch = next(input_pipeline.train_batches(config, train, batch_size=6))
  assert batch['image'].shape == (6, 16, 16, 3)
  assert sorted(batch['labels'].argmax(-1)) == [0, 0, 0, 1, 1, 1]
  labels = [tfds.builder('imagenet2012').info.features['label'].str2int(synset)
            for synset in ('n01751748', 'n09193705')]  # validation_labels.txt, lines 1 and 2.
  batch = next(input_pipeline.eval_batches(config, validation, batch_size=2, num_steps=1))
  assert sorted(batch['labels'].argmax(-1)) == sorted(labels)


def photo_jpeg(rng, size):
  """A JPEG cut from one of the photographs scikit-learn ships (china.jpg, flower.jpg)."""
  import io
  from sklearn.datasets import load_sample_images
  photo = load_sample_images().images[rng.integers(2)]  # (427, 640, 3)
  top, left = rng.integers(0, 427 - size[0]), rng.integers(0, 640 - size[1])
  buffer = io.BytesIO()
  Image.fromarray(photo[top:top + size[0], left:left + size[1]]).save(buffer, 'JPEG', quality=90)
  return buffer.getvalue()


def test_crop_decode_gives_the_full_decodes_crop():
  """Training decodes only the crop of a JPEG: for every seed the same window as cropping the
  fully decoded image, and the same pixels (up to the decoder's rounding at the window's edge)."""
  from vit_jax import preprocess
  rng = np.random.default_rng(0)
  for i in range(20):
    data = photo_jpeg(rng, (int(rng.integers(60, 200)), int(rng.integers(60, 200))))
    seed = tf.constant([7, i], tf.int64)
    crop = preprocess.decode_and_inception_crop(tf.constant(data), (32, 32), seed).numpy()
    full = preprocess.inception_crop(preprocess.decode(tf.constant(data)), (32, 32), seed).numpy()
    assert np.abs(crop - full).mean() < 0.5 and np.abs(crop - full).max() < 12, i
  png = tf.io.encode_png(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
  seed = tf.constant([1, 2], tf.int64)
  np.testing.assert_array_equal(
      preprocess.decode_and_inception_crop(png, (16, 16), seed),
      preprocess.inception_crop(preprocess.decode(png), (16, 16), seed))


@pytest.mark.parametrize('suffix', ['jpg', 'png'])
def test_antialias_reaches_training_crops_and_eval(tmp_path, suffix):
  """pp.antialias=False (the paper's pipeline) shrinks 1-pixel stripes by sampling them: much of
  their contrast stays (all of it in eval's exact 3x shrink); True averages them: near grey. Both
  on the train crop (the crop-decode path for a JPEG) and the eval resize."""
  stripes = np.broadcast_to(np.tile([0, 255], 48)[None, :, None], (96, 96, 3)).astype(np.uint8)
  folder = tmp_path / 'stripes' / 'train' / 'only'
  folder.mkdir(parents=True)
  Image.fromarray(stripes).save(folder / f'0.{suffix}', quality=100)
  spread = {}
  for antialias in (False, True):
    config = make_config(f'folder:{tmp_path / "stripes"}', crop=32, flip=False, crop_min_area=1.0)
    config.pp.antialias = antialias
    source = input_pipeline.get_source(config, 'train')
    train = next(input_pipeline.train_batches(config, source, batch_size=1))['image']
    test = next(input_pipeline.eval_batches(config, source, batch_size=1, num_steps=1))['image']
    spread[antialias] = train.std(), test.std()
  assert min(spread[False]) > 0.4 and max(spread[True]) < 0.2, spread
