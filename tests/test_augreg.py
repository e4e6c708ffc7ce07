"""The AugReg regularisers in the input pipeline: RandAugment and mixup."""

import numpy as np
import tensorflow as tf

from vit_jax import config_lib, input_pipeline, preprocess


def test_randaugment_is_deterministic_per_seed_and_stays_an_image():
  image = tf.cast(tf.random.stateless_uniform([24, 32, 3], [0, 1], 0, 256, tf.int32), tf.float32)
  outputs = []
  for seed in range(60):
    out = preprocess.randaugment(image, tf.constant([seed, 7], tf.int64)).numpy()
    again = preprocess.randaugment(image, tf.constant([seed, 7], tf.int64)).numpy()
    np.testing.assert_array_equal(out, again)
    assert out.shape == (24, 32, 3) and out.min() >= 0 and out.max() <= 255
    outputs.append(out)
  distinct = {o.tobytes() for o in outputs}
  assert len(distinct) > 30  # 14 operations x 2 layers x signs: most draws differ.


def test_mixup_keeps_the_label_mass_and_mixes_images_and_labels_alike():
  images = tf.reshape(tf.range(4 * 2 * 2 * 3, dtype=tf.float32), (4, 2, 2, 3))
  labels = tf.one_hot([0, 1, 2, 3], 5)
  mixed = preprocess.mixup({'image': images, 'labels': labels}, tf.constant([1, 2], tf.int64),
                           alpha=0.4)
  np.testing.assert_allclose(mixed['labels'].numpy().sum(-1), 1.0, rtol=1e-6)
  weight = float(mixed['labels'][0, 0])
  assert 0 < weight < 1
  np.testing.assert_allclose(mixed['labels'][0, 3], 1 - weight, rtol=1e-6)  # Rolled neighbour.
  np.testing.assert_allclose(mixed['image'][0], weight * images[0] + (1 - weight) * images[3],
                             rtol=1e-5)


def test_pipeline_with_randaugment_and_mixup_is_resumable():
  config = config_lib.base_config()
  config.dataset, config.pp.crop = 'digits', 8
  config.pp.randaug_layers, config.pp.mixup_alpha = 2, 0.5
  source = input_pipeline.get_source(config, 'train')
  batches = input_pipeline.train_batches(config, source, batch_size=16)
  first = [next(batches) for _ in range(4)]
  resumed = next(input_pipeline.train_batches(config, source, batch_size=16, start_step=3))
  np.testing.assert_array_equal(first[3]['image'], resumed['image'])
  np.testing.assert_array_equal(first[3]['labels'], resumed['labels'])
  np.testing.assert_allclose(resumed['labels'].sum(-1), 1.0, rtol=1e-6)
  assert np.count_nonzero(resumed['labels'][0]) in (1, 2)
