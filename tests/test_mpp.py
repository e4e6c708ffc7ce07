"""Masked patch prediction: targets, corruption statistics, a short run, fine-tuning from it."""

import logging

import jax
import jax.numpy as jnp
import numpy as np

from helpers import parse_config
from vit_jax import checkpoint, mpp, train
from vit_jax.models_vit import VisionTransformer


def test_colour_targets_of_a_constructed_image():
  # Two 2x2 patches: pure red (255, 0, 0) and a mid grey (128, 128, 128) -> levels (7,0,0), (4,4,4).
  red = np.tile(np.array([1.0, -1.0, -1.0]), (2, 2, 1))
  grey = np.full((2, 2, 3), 128 / 127.5 - 1)
  image = np.concatenate([red, grey], axis=1)[None]
  np.testing.assert_array_equal(mpp.colour_targets(jnp.asarray(image), (2, 2)),
                                [[7 * 64, 4 * 64 + 4 * 8 + 4]])


def test_corruption_fractions():
  corruption = mpp.sample_corruption(jax.random.PRNGKey(0), 4000, 196)
  assert np.all(np.asarray(corruption['corrupted']).sum(axis=1) == 98)  # Exactly half.
  corrupted = np.asarray(corruption['corrupted'])
  masked, replaced = np.asarray(corruption['masked']), np.asarray(corruption['replaced'])
  assert not np.any((masked | replaced) & ~corrupted) and not np.any(masked & replaced)
  assert abs(masked.sum() / corrupted.sum() - 0.8) < 0.005
  assert abs(replaced.sum() / corrupted.sum() - 0.1) < 0.005
  assert np.all(np.asarray(corruption['source']) != np.arange(196)[None])


def test_short_mpp_run_lowers_its_loss_and_fine_tunes(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  config = parse_config('--config=configs/mpp.py:digits', '--config.total_steps=60',
                        '--config.warmup_steps=5', '--config.progress_every=10',
                        '--config.eval_every=60', '--config.checkpoint_every=60',
                        '--config.model.transformer.num_layers=2')
  results = train.train_and_evaluate(config, str(tmp_path))
  losses = [float(r.getMessage().split('train_loss ')[1].split(',')[0])
            for r in caplog.records if ', train_loss ' in r.getMessage()]
  assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
  assert results['test']['mpp_accuracy_test'] > 1 / 512

  exported = checkpoint.load(str(tmp_path / 'model.npz'))
  assert exported['mask_token'].shape == (1, 1, 64) and exported['head']['kernel'].shape == (64, 512)
  target_config = config.model.copy_and_resolve_references()
  target_config.classifier = 'token'
  model = VisionTransformer(num_classes=10, **target_config)
  init = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)['params']
  params = checkpoint.load_pretrained(pretrained_path=str(tmp_path / 'model.npz'),
                                      init_params=init, model_config=target_config)
  assert 'mask_token' not in params and params['head']['kernel'].shape == (64, 10)
  np.testing.assert_array_equal(params['embedding']['kernel'], exported['embedding']['kernel'])
