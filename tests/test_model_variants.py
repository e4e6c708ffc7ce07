"""Position-embedding variants, hybrid ResNet stems, stochastic depth, backbone features."""

import re

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import checkpoint, models
from vit_jax.features import backbone_features
from vit_jax.layers import sincos2d
from vit_jax.models_vit import VisionTransformer


def small_config(posemb='learn', **overrides):
  config = models.vit_config('small', hidden_size=16, mlp_dim=32, num_heads=2, num_layers=2,
                             patch=4)
  config.transformer.posemb = posemb
  config.update(overrides)
  return config


def init(config, size=(8, 12), num_classes=3):
  model = VisionTransformer(num_classes=num_classes, **config)
  return model, model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + size + (3,)),
                           train=False)['params']


def posemb_keys(params):
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  return {k: v.shape for k, v in flat.items()
          if 'posembed' in k or 'relative_position' in k}


@pytest.mark.parametrize('posemb, expected', [
    ('learn', {'Transformer/posembed_input/pos_embedding': (1, 7, 16)}),
    ('learn_2d', {'Transformer/posembed_input/row_embedding': (2, 8),
                  'Transformer/posembed_input/column_embedding': (3, 8)}),
    ('relative', {'Transformer/encoderblock_0/relative_position/relative_position_bias': (3, 5, 2),
                  'Transformer/encoderblock_1/relative_position/relative_position_bias': (3, 5, 2)}),
    ('sincos2d', {}),
    ('none', {}),
])
def test_position_embedding_parameters(posemb, expected):
  model, params = init(small_config(posemb))
  assert posemb_keys(params) == expected
  assert model.apply({'params': params}, jnp.ones((2, 8, 12, 3)), train=False).shape == (2, 3)


def test_position_embeddings_change_the_output_only_where_they_should():
  images = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 12, 3))

  def encoded(posemb):
    config = small_config(posemb, classifier='unpooled')
    model, params = init(config, num_classes=None)
    params = jax.tree.map(lambda p: p + 0.3 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
    return model.apply({'params': params}, images, train=False)

  # Without position information the model is permutation-equivariant over patches.
  model, params = init(small_config('none', classifier='unpooled'), num_classes=None)
  tokens = model.apply({'params': params}, images, train=False)
  swapped = images.at[:, :4, :4].set(images[:, :4, 4:8]).at[:, :4, 4:8].set(images[:, :4, :4])
  swapped_tokens = model.apply({'params': params}, swapped, train=False)
  np.testing.assert_allclose(swapped_tokens[:, 0], tokens[:, 1], atol=1e-5)
  for posemb in ('learn', 'learn_2d', 'sincos2d', 'relative'):
    assert not np.allclose(encoded(posemb), encoded('none'), atol=1e-4), posemb


def test_sincos2d_values():
  table = sincos2d((2, 3), 8)
  assert table.shape == (6, 8)
  # Patch (row 1, column 2): sin/cos of the row at frequencies 1 and 1/100, then of the column.
  np.testing.assert_allclose(table[5], [np.sin(1), np.sin(0.01), np.cos(1), np.cos(0.01),
                                        np.sin(2), np.sin(0.02), np.cos(2), np.cos(0.02)],
                             rtol=1e-6)


@pytest.mark.parametrize('posemb', ['learn', 'learn_2d', 'relative', 'sincos2d', 'none'])
def test_every_variant_loads_at_another_resolution(posemb, tmp_path):
  config = small_config(posemb)
  _, params = init(config, size=(8, 8))
  params = jax.tree.map(lambda p: p + jnp.arange(p.size, dtype=p.dtype).reshape(p.shape) / p.size,
                        params)
  path = str(tmp_path / 'model.npz')
  checkpoint.save(params, path)
  model, target = init(config, size=(16, 16))
  loaded = checkpoint.load_pretrained(pretrained_path=path, init_params=target,
                                      model_config=config, image_size=(16, 16))
  assert model.apply({'params': loaded}, jnp.ones((1, 16, 16, 3)), train=False).shape == (1, 3)
  old, new = posemb_keys(params), posemb_keys(loaded)
  for key in old:  # Resampled with aligned corners: the first and last entries are kept.
    old_table = flax.traverse_util.flatten_dict(params, sep='/')[key]
    new_table = flax.traverse_util.flatten_dict(loaded, sep='/')[key]
    if key.endswith('pos_embedding'):
      old_table, new_table = old_table[0, 1:].reshape(2, 2, -1), new_table[0, 1:].reshape(4, 4, -1)
    corners = [(0,), (-1,)] if new_table.ndim == 2 else [(0, 0), (0, -1), (-1, 0), (-1, -1)]
    for corner in corners:
      np.testing.assert_allclose(new_table[corner], old_table[corner], atol=1e-6, err_msg=key)
    assert new[key] != old[key]


def test_hybrid_checkpoint_keys_are_the_official_ones(tmp_path):
  config = small_config()
  config.patches.size = (1, 1)
  config.resnet = ml_collections.ConfigDict({'num_layers': (1, 1), 'width_factor': 1})
  model, params = init(config, size=(16, 16))
  keys = set(flax.traverse_util.flatten_dict(params, sep='/'))
  stem = {k for k in keys if not k.startswith(('Transformer', 'embedding', 'cls', 'head'))}
  unit = ['conv1/kernel', 'conv2/kernel', 'conv3/kernel', 'gn1/scale', 'gn1/bias', 'gn2/scale',
          'gn2/bias', 'gn3/scale', 'gn3/bias', 'conv_proj/kernel', 'gn_proj/scale', 'gn_proj/bias']
  assert stem == {'conv_root/kernel', 'gn_root/scale', 'gn_root/bias'} | {
      f'block{b}/unit1/{k}' for b in (1, 2) for k in unit}
  assert params['embedding']['kernel'].shape == (1, 1, 512, 16)  # 4x the width of stage 2.
  path = str(tmp_path / 'hybrid.npz')
  checkpoint.save(jax.tree.map(lambda p: p + 0.01, params), path)
  restored = checkpoint.load(path)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  np.testing.assert_allclose(model.apply({'params': restored}, images, train=False),
                             model.apply({'params': jax.tree.map(lambda p: p + 0.01, params)},
                                         images, train=False), atol=1e-6)
  inferred, num_classes, image_size = checkpoint.infer_model_config(restored)
  assert (tuple(inferred.resnet.num_layers), num_classes, image_size) == ((1, 1), 3, (16, 16))


def test_weight_standardisation():
  from vit_jax.models_resnet import StdConv
  conv = StdConv(4, (3, 3), use_bias=False)
  variables = conv.init(jax.random.PRNGKey(0), jnp.ones((1, 5, 5, 2)))
  kernel = variables['params']['kernel'] * 7 + 3  # Scale and shift: same standardised conv.
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 5, 2))
  np.testing.assert_allclose(conv.apply({'params': {'kernel': kernel}}, x),
                             conv.apply(variables, x), rtol=1e-3, atol=1e-3)  # Up to the eps on the std.


def test_drop_path_is_off_in_evaluation_and_keeps_the_expected_rate():
  """Layer l of L drops whole examples at rate * l / (L - 1), l traced as under scan, and
  rescales the kept ones."""
  from vit_jax.models_vit import DropPath
  drop = DropPath(rate=0.6, num_layers=4)
  x = jnp.ones((20_000, 3, 4))
  apply = jax.jit(lambda layer, rng: drop.apply({}, x, layer, deterministic=False,
                                                rngs={'dropout': rng}))
  for layer, rate in [(0, 0.0), (2, 0.4), (3, 0.6)]:
    per_example = np.asarray(apply(jnp.int32(layer), jax.random.PRNGKey(layer))).reshape(
        len(x), -1)
    assert np.all(per_example.min(axis=1) == per_example.max(axis=1))  # Whole examples.
    np.testing.assert_allclose(np.unique(per_example[per_example[:, 0] > 0]), 1 / (1 - rate),
                               rtol=1e-6)  # Rescaled when kept.
    assert abs(np.mean(per_example[:, 0] == 0) - rate) < 0.015
  np.testing.assert_array_equal(drop.apply({}, x, 3, deterministic=True), x)

  images = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 12, 3))
  plain_model, params = init(small_config())
  deep_config = small_config()
  deep_config.transformer.stochastic_depth = 0.5
  deep_model = VisionTransformer(num_classes=3, **deep_config)
  params = jax.tree.map(lambda p: p + 0.3 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
  np.testing.assert_array_equal(deep_model.apply({'params': params}, images, train=False),
                                plain_model.apply({'params': params}, images, train=False))
  trained = [deep_model.apply({'params': params}, images, train=True,
                              rngs={'dropout': jax.random.PRNGKey(s)}) for s in range(4)]
  assert not all(np.allclose(trained[0], t) for t in trained[1:])


def test_backbone_features_are_patch_grids():
  model, params = init(small_config(), size=(8, 12))
  images = jnp.ones((2, 8, 12, 3))
  features = backbone_features(model, params, images, layers=(0, 1))
  assert {k: v.shape for k, v in features.items()} == {
      'encoded': (2, 2, 3, 16), 'encoderblock_0': (2, 2, 3, 16), 'encoderblock_1': (2, 2, 3, 16)}
  _, state = model.apply({'params': params}, images, train=False, mutable=['intermediates'])
  last_block = state['intermediates']['Transformer']['encoderblock_1']['output'][0]
  np.testing.assert_array_equal(features['encoderblock_1'].reshape(2, 6, 16), last_block[:, 1:])


def test_relative_tables_of_earlier_exports_load_into_their_blocks(tmp_path):
  """Exports written before the tables moved into the blocks (`Transformer/relative_position_i`)."""
  config = small_config('relative')
  model, params = init(config)
  params = jax.tree.map(lambda p: p + jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  legacy = {re.sub(r'encoderblock_(\d+)/relative_position/', r'relative_position_\1/', k): v
            for k, v in flat.items()}
  assert 'Transformer/relative_position_1/relative_position_bias' in legacy
  np.savez(tmp_path / 'old.npz', **legacy)
  loaded, inferred = checkpoint.load_model(str(tmp_path / 'old.npz'))[:2]
  assert inferred.transformer.posemb == 'relative'
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 12, 3))
  np.testing.assert_array_equal(model.apply({'params': loaded}, images, train=False),
                                model.apply({'params': params}, images, train=False))
