"""The ViT model family: published parameter counts, shapes, dropout, dtypes."""

import functools
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import cpu_tuning, layers, models, sharding
from vit_jax.models_vit import VisionTransformer

# Published counts at 224x224 with a 1000-class head (official ViT repository, models_test.py).
PUBLISHED_PARAMETER_COUNTS = {
    'ViT-Ti_16': 5_717_416,
    'ViT-S_16': 22_050_664,
    'ViT-S_32': 22_878_952,
    'ViT-B_8': 86_576_872,
    'ViT-B_16': 86_567_656,
    'ViT-B_32': 88_224_232,
    'ViT-L_16': 304_326_632,
    'ViT-L_32': 306_535_400,
    'ViT-H_14': 632_045_800,
    'ViT-S_16-gap-norep': 22_049_896,
    'ViT-S_32-gap-norep': 22_878_184,
    'ViT-B_16-gap-norep': 86_566_120,
    'ViT-B_32-gap-norep': 88_222_696,
    'R+ViT-Ti_16': 6_337_704,
    'R26+ViT-S_32': 36_431_912,
    'R26+ViT-B_32': 101_383_976,
    'R50+ViT-B_16': 98_659_112,
    'R50+ViT-L_32': 328_994_856,
    'testing': 21_390,
    'testing-unpooled': 21_370,
}


def count_parameters(model, image_shape=(1, 224, 224, 3)):
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(image_shape), train=False))
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def test_every_registry_entry_has_a_published_count():
  assert set(models.MODEL_CONFIGS) == set(PUBLISHED_PARAMETER_COUNTS)


@pytest.mark.parametrize('name', sorted(PUBLISHED_PARAMETER_COUNTS))
def test_parameter_count_equals_published(name):
  model = VisionTransformer(num_classes=1000, **models.MODEL_CONFIGS[name])
  assert count_parameters(model) == PUBLISHED_PARAMETER_COUNTS[name]


def test_get_config_unknown_name_lists_known_models():
  with pytest.raises(ValueError, match=r"Unknown model 'ViT-X_16'.*ViT-B_16"):
    models.get_config('ViT-X_16')
  with pytest.raises(ValueError, match=r"Unknown model 'b17'. Did you mean 'b16'\?"):
    models.get_config('b17')


@pytest.mark.parametrize('official, ours', [
    ('b16', 'ViT-B_16'), ('ti16', 'ViT-Ti_16'), ('h14', 'ViT-H_14'),  # configs/models.py's
    ('s16_gap_norep', 'ViT-S_16-gap-norep'), ('r50_b16', 'R50+ViT-B_16'),  # get_<name>_config
    ('r_ti16', 'R+ViT-Ti_16'), ('R_Ti_16', 'R+ViT-Ti_16'), ('R26_S_32', 'R26+ViT-S_32'),  # AugReg
    ('B_32-gap-norep', 'ViT-B_32-gap-norep'), ('L_16', 'ViT-L_16'), ('ViT-L_16', 'ViT-L_16')])
def test_the_official_repositorys_model_names_are_understood(official, ours):
  assert models.get_config(official) == models.MODEL_CONFIGS[ours]
  assert models.registry_name(official) == ours


def tiny_config(**overrides):
  config = models.get_config('testing')
  config.hidden_size = 16
  config.patches.size = (4, 4)
  config.transformer.update(mlp_dim=32, num_heads=2, num_layers=2)
  config.update(overrides)
  return config


@pytest.mark.parametrize('classifier, num_classes, representation_size, expected', [
    ('token', 7, None, (2, 7)),
    ('gap', 7, None, (2, 7)),
    ('unpooled', 7, None, (2, 12, 7)),
    ('token', None, 5, (2, 5)),
    ('gap', None, None, (2, 16)),
])
def test_output_shapes(classifier, num_classes, representation_size, expected):
  config = tiny_config(classifier=classifier, representation_size=representation_size)
  model = VisionTransformer(num_classes=num_classes, **config)
  images = jnp.ones((2, 12, 16, 3))  # Non-square: a 3x4 patch grid.
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  assert model.apply(variables, images, train=False).shape == expected
  assert ('cls' in variables['params']) == (classifier == 'token')
  assert ('pre_logits' in variables['params']) == (representation_size is not None)


def test_head_is_zero_with_configured_bias():
  model = VisionTransformer(num_classes=3, **tiny_config(head_bias_init=-10.0))
  variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 3)), train=False)
  np.testing.assert_array_equal(variables['params']['head']['kernel'], 0.0)
  np.testing.assert_array_equal(variables['params']['head']['bias'], -10.0)


def test_dropout_only_in_training():
  config = tiny_config()
  config.transformer.update(dropout_rate=0.3, attention_dropout_rate=0.3)
  model = VisionTransformer(num_classes=None, **config)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(0), images, train=False)

  def run(train, seed):
    return model.apply(variables, images, train=train,
                       rngs={'dropout': jax.random.PRNGKey(seed)})

  np.testing.assert_array_equal(run(False, 0), run(False, 1))
  assert not np.allclose(run(True, 0), run(True, 1))
  assert not np.allclose(run(True, 0), run(False, 0))
  np.testing.assert_array_equal(run(True, 2), run(True, 2))


def test_dtype_and_param_dtype_are_honoured():
  model = VisionTransformer(num_classes=3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                            **tiny_config(representation_size=8))
  images = jnp.ones((1, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
  assert model.apply(variables, images, train=False).dtype == jnp.bfloat16


def test_exact_gelu_is_selectable():
  images = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 3))

  def representation(gelu_approximate):
    config = tiny_config()
    config.transformer.gelu_approximate = gelu_approximate
    model = VisionTransformer(num_classes=None, **config)
    variables = model.init(jax.random.PRNGKey(0), images, train=False)
    return model.apply(variables, images, train=False)

  difference = np.abs(representation(True) - representation(False)).max()
  assert 0 < difference < 1e-2


def test_bad_image_size_is_named():
  model = VisionTransformer(num_classes=3, **tiny_config())
  with pytest.raises(ValueError, match='Image size 10x8 is not divisible by the patch size 4x4'):
    model.init(jax.random.PRNGKey(0), jnp.ones((1, 10, 8, 3)), train=False)


def test_other_resolution_needs_resampled_position_embeddings():
  model = VisionTransformer(num_classes=3, **tiny_config())
  variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 3)), train=False)
  with pytest.raises(ValueError, match=r'pos_embedding has shape \(1, 5, 16\), but this input needs \(1, 7, 16\).*load_pretrained'):
    model.apply(variables, jnp.ones((1, 12, 8, 3)), train=False)


def test_registry_entries_are_independent_copies():
  config = models.get_config('ViT-B_16')
  config.transformer.num_layers = 1
  assert models.MODEL_CONFIGS['ViT-B_16'].transformer.num_layers == 12
  assert isinstance(config, ml_collections.ConfigDict)


def test_remat_changes_memory_not_results():
  """Rematerialised blocks: the same parameters, loss, gradients and sown attention weights."""
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))

  def run(remat):
    config = tiny_config()
    config.transformer.update(remat=remat, dropout_rate=0.1)
    model = VisionTransformer(num_classes=3, **config)
    params = jax.jit(model.init, static_argnames='train')(jax.random.PRNGKey(0), images,
                                                         train=False)['params']

    def loss(params):
      logits, state = model.apply({'params': params}, images, train=True, mutable='intermediates',
                                  rngs={'dropout': jax.random.PRNGKey(2)})
      return jnp.sum(logits ** 2), state['intermediates']

    (value, intermediates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return params, value, grads, intermediates

  params, value, grads, intermediates = run('none')
  params_remat, value_remat, grads_remat, intermediates_remat = run('full')
  assert jax.tree.structure(params_remat) == jax.tree.structure(params)
  np.testing.assert_allclose(value_remat, value, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               grads_remat, grads)
  weights = lambda tree: tree['Transformer']['encoderblock_1'][
      'MultiHeadDotProductAttention_1']['attention_weights'][0]
  np.testing.assert_allclose(weights(intermediates_remat), weights(intermediates), atol=1e-6)


def test_registry_dropout_equals_the_official_configs():
  with_dropout = {'ViT-L_16', 'ViT-H_14', 'R50+ViT-B_16', 'R50+ViT-L_32', 'testing',
                  'testing-unpooled'}
  for name, config in models.MODEL_CONFIGS.items():
    assert config.transformer.dropout_rate == (0.1 if name in with_dropout else 0.0), name
    assert config.transformer.attention_dropout_rate == 0.0, name


def test_get_model_builds_the_registry_model():
  model = models.get_model('B_16', num_classes=1000)
  assert count_parameters(model) == PUBLISHED_PARAMETER_COUNTS['ViT-B_16']


def test_recipe_configs_are_locked_against_misspelt_keys():
  from helpers import parse_config
  config = parse_config('--config=configs/finetune.py:B_16,cifar10')
  with pytest.raises(AttributeError, match='crop_size'):
    config.pp.crop_size = 32
  config.pp.crop = 32  # Existing keys stay settable.


def test_the_model_runs_under_pmap_and_shard_map():
  """Under jax.pmap and shard_map the batch axis is manual: the activations' sharding constraint
  (for the jit-over-a-mesh steps) must leave it alone, as the official model code does. On 4
  simulated devices (a process of its own), the forward pass and a gradient step equal jit's."""
  import subprocess
  import sys
  result = subprocess.run(
      [sys.executable, os.path.join(os.path.dirname(__file__), 'pmap_check.py')],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'pmap and shard_map equal jit on 4 devices' in result.stdout


def test_dense_layers_train_without_transposed_copies_on_cpu():
  """On CPU the encoder's Dense layers see (batch x tokens, D) matrices (over_tokens): XLA then
  computes their weight gradients from the activations as they lie, where over (batch, tokens)
  it copied both operands into transposed layouts first (half of an MLP's training step)."""
  mlp = layers.MlpBlock(mlp_dim=64)
  x = jnp.ones((4, 5, 32))
  params = mlp.init(jax.random.PRNGKey(0), x, deterministic=True)

  cpu = sharding.make_mesh(jax.devices()[:1])  # The mesh's devices decide, not the host.

  def transposes(apply, mesh=cpu):
    grad = jax.grad(lambda p, x: (apply(p, x) ** 2).sum())
    grad = jax.jit(sharding.under_mesh(grad, mesh) if mesh else grad)
    return len(re.findall(r' transpose\(', grad.lower(params, x).compile().as_text()))

  over_tokens = lambda p, x: cpu_tuning.over_tokens(
      functools.partial(mlp.apply, p, deterministic=True), x)
  assert transposes(over_tokens) == 0
  assert transposes(over_tokens, mesh=None) > 0  # What it avoids (no mesh: the plain layer).
  np.testing.assert_allclose(jax.jit(sharding.under_mesh(over_tokens, cpu))(params, x),
                             mlp.apply(params, x, deterministic=True), rtol=1e-6)
