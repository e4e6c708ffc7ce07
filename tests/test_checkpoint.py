"""Official .npz checkpoints: layout, spellings, round trips, adaptation for fine-tuning, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import official_reference
from vit_jax import checkpoint, models
from vit_jax.models_vit import VisionTransformer

WIDTH, MLP, HEADS, LAYERS, PATCH, CLASSES, REPR = 16, 32, 2, 2, 4, 5, 8


def small_config(**overrides):
  config = models.get_config('testing')
  config.hidden_size = WIDTH
  config.patches.size = (PATCH, PATCH)
  config.transformer.update(mlp_dim=MLP, num_heads=HEADS, num_layers=LAYERS)
  config.representation_size = REPR
  config.update(overrides)
  return config


def official_layout_arrays(seed=0, grid=4, newer_spelling=False):
  """Random parameters written key by key the way the official files spell them."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(scale=0.2, size=shape).astype(np.float32)
  head_dim = WIDTH // HEADS
  attention, ln2, mlp = 'MultiHeadDotProductAttention_1', 'LayerNorm_2', 'MlpBlock_3'
  if newer_spelling:
    attention, ln2, mlp = 'MultiHeadDotProductAttention_0', 'LayerNorm_1', 'MlpBlock_0'
  arrays = {
      'embedding/kernel': normal(PATCH, PATCH, 3, WIDTH),
      'embedding/bias': normal(WIDTH),
      'cls': normal(1, 1, WIDTH),
      'Transformer/posembed_input/pos_embedding': normal(1, grid * grid + 1, WIDTH),
      'Transformer/encoder_norm/scale': 1 + normal(WIDTH),
      'Transformer/encoder_norm/bias': normal(WIDTH),
      'pre_logits/kernel': normal(WIDTH, REPR),
      'pre_logits/bias': normal(REPR),
      'head/kernel': normal(REPR, CLASSES),
      'head/bias': normal(CLASSES),
  }
  for i in range(LAYERS):
    block = f'Transformer/encoderblock_{i}'
    for ln in ('LayerNorm_0', ln2):
      arrays[f'{block}/{ln}/scale'] = 1 + normal(WIDTH)
      arrays[f'{block}/{ln}/bias'] = normal(WIDTH)
    for name in ('query', 'key', 'value'):
      arrays[f'{block}/{attention}/{name}/kernel'] = normal(WIDTH, HEADS, head_dim)
      arrays[f'{block}/{attention}/{name}/bias'] = normal(HEADS, head_dim)
    arrays[f'{block}/{attention}/out/kernel'] = normal(HEADS, head_dim, WIDTH)
    arrays[f'{block}/{attention}/out/bias'] = normal(WIDTH)
    arrays[f'{block}/{mlp}/Dense_0/kernel'] = normal(WIDTH, MLP)
    arrays[f'{block}/{mlp}/Dense_0/bias'] = normal(MLP)
    arrays[f'{block}/{mlp}/Dense_1/kernel'] = normal(MLP, WIDTH)
    arrays[f'{block}/{mlp}/Dense_1/bias'] = normal(WIDTH)
  return arrays


def hybrid_layout_arrays(gn_shape):
  """A hybrid (BiT root + one unit of 64 features, 4 pixels per token) in the official layout,
  with small kernels, so that where the standardisation's eps sits matters."""
  rng = np.random.default_rng(1)
  arrays = official_layout_arrays()
  arrays['embedding/kernel'] = rng.normal(scale=0.05, size=(1, 1, 256, WIDTH)).astype(np.float32)
  kernels = {'conv_root': (7, 7, 3, 64), 'block1/unit1/conv1': (1, 1, 64, 64),
             'block1/unit1/conv2': (3, 3, 64, 64), 'block1/unit1/conv3': (1, 1, 64, 256),
             'block1/unit1/conv_proj': (1, 1, 64, 256)}
  for name, shape in kernels.items():
    arrays[f'{name}/kernel'] = rng.normal(scale=1e-4, size=shape).astype(np.float32)
  for name, channels in [('gn_root', 64), ('block1/unit1/gn1', 64), ('block1/unit1/gn2', 64),
                         ('block1/unit1/gn3', 256), ('block1/unit1/gn_proj', 256)]:
    for key, offset in (('scale', 1.0), ('bias', 0.0)):
      value = offset + rng.normal(scale=0.2, size=channels)
      arrays[f'{name}/{key}'] = value.reshape(gn_shape(channels)).astype(np.float32)
  return arrays


@pytest.mark.slow  # Seconds each, many of them: the full tier.
@pytest.mark.parametrize('gn_shape', [lambda c: (c,), lambda c: (1, 1, 1, c)],
                         ids=['gn (C,)', 'gn (1, 1, 1, C), AugReg'])
def test_hybrid_official_layout_gives_reference_logits(tmp_path, images, gn_shape):
  config = small_config()
  config.patches.size = (1, 1)
  config.resnet = {'num_layers': (1,), 'width_factor': 1}
  model = VisionTransformer(num_classes=CLASSES, **config)
  path = str(tmp_path / 'hybrid.npz')
  arrays = hybrid_layout_arrays(gn_shape)
  np.savez(path, **arrays)
  params = checkpoint.load_pretrained(pretrained_path=path, init_params=init_params(config),
                                      model_config=config, reinit_head=False)
  logits = model.apply({'params': params}, images, train=False)
  expected = official_reference.logits(arrays, images, num_heads=HEADS)
  assert np.abs(expected).max() > 0.1  # Logits that carry signal.
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)


def big_vision_arrays(pool: str, scan: bool, grid=4):
  """A ViT as big_vision writes it (big_vision/models/vit.py): newer Flax module names, the
  position embedding at the top level without a class-token slot, `MAPHead_0` for pool 'map',
  and with scan=True one `Transformer/encoderblock` whose arrays have a leading layer axis."""
  arrays = official_layout_arrays(seed=2, grid=grid, newer_spelling=True)
  del arrays['pre_logits/kernel'], arrays['pre_logits/bias'], arrays['cls']
  posemb = arrays.pop('Transformer/posembed_input/pos_embedding')
  arrays['pos_embedding'] = posemb[:, 1:]
  arrays['head/kernel'] = np.random.default_rng(3).normal(size=(WIDTH, CLASSES)).astype(np.float32)
  if pool == 'tok':
    arrays['cls'] = np.random.default_rng(4).normal(size=(1, 1, WIDTH)).astype(np.float32)
  if pool == 'map':
    rng = np.random.default_rng(5)
    normal = lambda *shape: rng.normal(scale=0.2, size=shape).astype(np.float32)
    head = 'MAPHead_0'
    arrays[f'{head}/probe'] = normal(1, 1, WIDTH)
    for name in ('query', 'key', 'value'):
      arrays[f'{head}/MultiHeadDotProductAttention_0/{name}/kernel'] = normal(
          WIDTH, HEADS, WIDTH // HEADS)
      arrays[f'{head}/MultiHeadDotProductAttention_0/{name}/bias'] = normal(HEADS, WIDTH // HEADS)
    arrays[f'{head}/MultiHeadDotProductAttention_0/out/kernel'] = normal(HEADS, WIDTH // HEADS,
                                                                          WIDTH)
    arrays[f'{head}/MultiHeadDotProductAttention_0/out/bias'] = normal(WIDTH)
    arrays[f'{head}/LayerNorm_0/scale'] = 1 + normal(WIDTH)
    arrays[f'{head}/LayerNorm_0/bias'] = normal(WIDTH)
    arrays[f'{head}/MlpBlock_0/Dense_0/kernel'] = normal(WIDTH, MLP)
    arrays[f'{head}/MlpBlock_0/Dense_0/bias'] = normal(MLP)
    arrays[f'{head}/MlpBlock_0/Dense_1/kernel'] = normal(MLP, WIDTH)
    arrays[f'{head}/MlpBlock_0/Dense_1/bias'] = normal(WIDTH)
  if scan:
    prefix = 'Transformer/encoderblock_0/'
    for key in [k for k in arrays if k.startswith(prefix)]:
      rest = key[len(prefix):]
      arrays[f'Transformer/encoderblock/{rest}'] = np.stack(
          [arrays.pop(f'Transformer/encoderblock_{i}/{rest}') for i in range(LAYERS)])
  return arrays


def big_vision_reference_logits(p, images, pool):
  """big_vision's ViT forward pass in plain jax.numpy over per-layer big_vision arrays:
  position embeddings added before the class token is prepended; 'tok', 'gap' or 'map'
  pooling; no representation layer."""
  layer_norm = lambda x, name: official_reference.layer_norm(p, x, name)

  def attention(queries, inputs, prefix):
    q, k, v = (jnp.einsum('bnd,dhk->bnhk', x, p[f'{prefix}/{n}/kernel']) + p[f'{prefix}/{n}/bias']
               for x, n in ((queries, 'query'), (inputs, 'key'), (inputs, 'value')))
    weights = jax.nn.softmax(jnp.einsum('bqhk,bshk->bhqs', q, k) / jnp.sqrt(WIDTH // HEADS))
    y = jnp.einsum('bhqs,bshk->bqhk', weights, v)
    return jnp.einsum('bqhk,hkd->bqd', y, p[f'{prefix}/out/kernel']) + p[f'{prefix}/out/bias']

  def mlp(x, prefix):
    y = jax.nn.gelu(x @ p[f'{prefix}/Dense_0/kernel'] + p[f'{prefix}/Dense_0/bias'])
    return y @ p[f'{prefix}/Dense_1/kernel'] + p[f'{prefix}/Dense_1/bias']

  b, h, w, c = images.shape
  patches = images.reshape(b, h // PATCH, PATCH, w // PATCH, PATCH, c)
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, PATCH * PATCH * c)
  x = patches @ p['embedding/kernel'].reshape(-1, WIDTH) + p['embedding/bias'] + p['pos_embedding']
  if pool == 'tok':
    x = jnp.concatenate([jnp.broadcast_to(p['cls'], (b, 1, WIDTH)), x], axis=1)
  for i in range(LAYERS):
    block = f'Transformer/encoderblock_{i}'
    y = layer_norm(x, f'{block}/LayerNorm_0')
    x = x + attention(y, y, f'{block}/MultiHeadDotProductAttention_0')
    x = x + mlp(layer_norm(x, f'{block}/LayerNorm_1'), f'{block}/MlpBlock_0')
  x = layer_norm(x, 'Transformer/encoder_norm')
  if pool == 'map':
    probe = jnp.broadcast_to(p['MAPHead_0/probe'], (b, 1, WIDTH))
    x = attention(probe, x, 'MAPHead_0/MultiHeadDotProductAttention_0')
    x = (x + mlp(layer_norm(x, 'MAPHead_0/LayerNorm_0'), 'MAPHead_0/MlpBlock_0'))[:, 0]
  else:
    x = x[:, 0] if pool == 'tok' else x.mean(axis=1)
  return x @ p['head/kernel'] + p['head/bias']


@pytest.mark.parametrize('scan', [False, True], ids=['per-layer', 'scanned'])
@pytest.mark.parametrize('pool', ['tok', 'gap', 'map'])
def test_big_vision_layout_gives_reference_logits(tmp_path, images, pool, scan):
  path = str(tmp_path / 'big_vision.npz')
  np.savez(path, **big_vision_arrays(pool, scan))
  params, config, num_classes, image_size = checkpoint.load_model(path)[:4]
  assert (config.classifier, num_classes, image_size) == (
      {'tok': 'token', 'gap': 'gap', 'map': 'map'}[pool], CLASSES, (16, 16))
  config.transformer.gelu_approximate = True  # big_vision's nn.gelu default, as the official.
  model = VisionTransformer(num_classes=CLASSES, **config)
  expected = big_vision_reference_logits(big_vision_arrays(pool, scan=False), images, pool)
  assert np.abs(expected).max() > 0.1
  np.testing.assert_allclose(model.apply({'params': params}, images, train=False), expected,
                             atol=1e-5, rtol=1e-5)
  # And as a pretrained checkpoint for fine-tuning a model of the same pooling.
  fine_tuned = checkpoint.load_pretrained(pretrained_path=path, init_params=jax.tree.map(
      np.zeros_like, params), model_config=config, reinit_head=False)
  np.testing.assert_array_equal(model.apply({'params': fine_tuned}, images, train=False),
                                model.apply({'params': params}, images, train=False))


@pytest.fixture(scope='module')
def model():
  return VisionTransformer(num_classes=CLASSES, **small_config())


@pytest.fixture(scope='module')
def images():
  return jax.random.normal(jax.random.PRNGKey(42), (3, 16, 16, 3))


@pytest.fixture(scope='module')
def apply(model):
  return jax.jit(lambda params, x: model.apply({'params': params}, x, train=False))


def init_params(config, num_classes=CLASSES, image_size=16):
  model = VisionTransformer(num_classes=num_classes, **config)
  return model.init(jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)),
                    train=False)['params']


@pytest.mark.parametrize('newer_spelling', [False, True])
def test_official_layout_gives_reference_logits(tmp_path, apply, images, newer_spelling):
  path = str(tmp_path / 'official.npz')
  np.savez(path, **official_layout_arrays(newer_spelling=newer_spelling))
  params = checkpoint.load(path)
  block = params['Transformer']['encoderblock_1']
  assert sorted(block) == ['LayerNorm_0', 'LayerNorm_2', 'MlpBlock_3',
                           'MultiHeadDotProductAttention_1']
  expected = official_reference.logits(official_layout_arrays(), images, num_heads=HEADS)
  np.testing.assert_allclose(apply(params, images), expected, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_gives_identical_logits(tmp_path, apply, images):
  params = init_params(small_config())
  params = jax.tree.map(lambda p: p + 0.1, params)  # A non-zero head, so logits carry signal.
  path = str(tmp_path / 'model.npz')
  checkpoint.save(params, path)
  np.testing.assert_array_equal(apply(checkpoint.load(path), images), apply(params, images))
  with np.load(path) as npz:  # The official spelling and layout, readable by other tools.
    assert 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel' in npz.files
    assert npz['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'].shape == (WIDTH, MLP)


def test_remote_paths_go_through_gfile(tmp_path):
  """gs:// paths use tf.io.gfile; TensorFlow's in-memory ram:// filesystem stands in for GCS."""
  params = init_params(small_config())
  checkpoint.save(params, 'ram://bucket/model.npz')
  restored = checkpoint.load('ram://bucket/model.npz')
  jax.tree.map(np.testing.assert_array_equal, restored, jax.device_get(params))
  with pytest.raises(FileNotFoundError, match='ram://bucket/absent.npz'):
    checkpoint.load('ram://bucket/absent.npz')


def test_load_pretrained_keeps_the_head_only_when_asked(tmp_path):
  path = str(tmp_path / 'official.npz')
  np.savez(path, **official_layout_arrays())
  kept = checkpoint.load_pretrained(pretrained_path=path, init_params=init_params(small_config()),
                                    model_config=small_config(), reinit_head=False)
  np.testing.assert_array_equal(kept['head']['kernel'], official_layout_arrays()['head/kernel'])
  # By default, as the official load_pretrained: the fresh (zero) head, even where one fits.
  fresh = checkpoint.load_pretrained(pretrained_path=path, init_params=init_params(small_config()),
                                     model_config=small_config())
  np.testing.assert_array_equal(fresh['head']['kernel'], 0.0)
  np.testing.assert_array_equal(fresh['embedding']['kernel'],
                                official_layout_arrays()['embedding/kernel'])


def test_posemb_resampled_14x14_to_24x24_keeps_class_token_and_corners(tmp_path):
  config = small_config()
  path = str(tmp_path / 'official.npz')
  arrays = official_layout_arrays(grid=14)
  np.savez(path, **arrays)
  params = checkpoint.load_pretrained(
      pretrained_path=path, init_params=init_params(config, image_size=24 * PATCH),
      model_config=config)
  old = arrays['Transformer/posembed_input/pos_embedding'][0]
  new = np.asarray(params['Transformer']['posembed_input']['pos_embedding'][0])
  assert new.shape == (24 * 24 + 1, WIDTH)
  np.testing.assert_array_equal(new[0], old[0])
  old_grid, new_grid = old[1:].reshape(14, 14, WIDTH), new[1:].reshape(24, 24, WIDTH)
  for i, j in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
    np.testing.assert_allclose(new_grid[i, j], old_grid[i, j], atol=1e-6)
  # Interpolated, not copied: the middle lies between its neighbours in the old grid.
  assert np.all(new_grid.min(axis=(0, 1)) >= old_grid.min(axis=(0, 1)) - 1e-6)
  assert np.all(new_grid.max(axis=(0, 1)) <= old_grid.max(axis=(0, 1)) + 1e-6)


def test_posemb_resampled_to_non_square_grid(tmp_path):
  config = small_config()
  path = str(tmp_path / 'official.npz')
  np.savez(path, **official_layout_arrays(grid=4))
  model = VisionTransformer(num_classes=CLASSES, **config)
  init = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 24, 3)), train=False)['params']
  with pytest.raises(checkpoint.CheckpointMismatchError, match='not a square grid'):
    checkpoint.load_pretrained(pretrained_path=path, init_params=init, model_config=config)
  params = checkpoint.load_pretrained(pretrained_path=path, init_params=init,
                                      model_config=config, image_size=(8, 24))
  grid = np.asarray(params['Transformer']['posembed_input']['pos_embedding'][0, 1:])
  old = official_layout_arrays()['Transformer/posembed_input/pos_embedding'][0, 1:]
  np.testing.assert_allclose(grid.reshape(2, 6, WIDTH)[-1, -1], old.reshape(4, 4, WIDTH)[-1, -1],
                             atol=1e-6)
  assert model.apply({'params': params}, jnp.ones((3, 8, 24, 3)), train=False).shape == (3, CLASSES)


def test_new_head_and_no_representation_layer(tmp_path):
  path = str(tmp_path / 'official.npz')
  arrays = official_layout_arrays()
  np.savez(path, **arrays)
  config = small_config(representation_size=None, head_bias_init=-3.0)
  init = init_params(config, num_classes=10)
  params = checkpoint.load_pretrained(pretrained_path=path, init_params=init, model_config=config)
  assert 'pre_logits' not in params
  np.testing.assert_array_equal(params['head']['kernel'], np.zeros((WIDTH, 10)))
  np.testing.assert_array_equal(params['head']['bias'], np.full(10, -3.0))
  np.testing.assert_array_equal(params['embedding']['kernel'], arrays['embedding/kernel'])


def test_token_to_gap_and_back(tmp_path):
  token_path, gap_path = str(tmp_path / 'token.npz'), str(tmp_path / 'gap.npz')
  arrays = official_layout_arrays()
  np.savez(token_path, **arrays)
  gap_config = small_config(classifier='gap')
  gap = checkpoint.load_pretrained(pretrained_path=token_path,
                                   init_params=init_params(gap_config), model_config=gap_config)
  assert 'cls' not in gap
  posemb = arrays['Transformer/posembed_input/pos_embedding']
  np.testing.assert_array_equal(gap['Transformer']['posembed_input']['pos_embedding'],
                                posemb[:, 1:])

  checkpoint.save(gap, gap_path)
  token_init = init_params(small_config())
  token = checkpoint.load_pretrained(pretrained_path=gap_path, init_params=token_init,
                                     model_config=small_config())
  np.testing.assert_array_equal(token['cls'], 0.0)
  token_posemb = token['Transformer']['posembed_input']['pos_embedding']
  np.testing.assert_array_equal(token_posemb[:, 1:], posemb[:, 1:])
  np.testing.assert_array_equal(token_posemb[:, :1],
                                token_init['Transformer']['posembed_input']['pos_embedding'][:, :1])


def test_mismatch_lists_every_missing_unexpected_and_misshaped_key(tmp_path):
  arrays = official_layout_arrays()
  del arrays['Transformer/encoderblock_1/LayerNorm_0/scale']
  arrays['Transformer/encoderblock_7/LayerNorm_0/scale'] = np.ones(WIDTH, np.float32)
  arrays['embedding/bias'] = np.ones(WIDTH + 1, np.float32)
  path = str(tmp_path / 'broken.npz')
  np.savez(path, **arrays)
  with pytest.raises(checkpoint.CheckpointMismatchError) as error:
    checkpoint.load_pretrained(pretrained_path=path, init_params=init_params(small_config()),
                               model_config=small_config())
  message = str(error.value)
  assert path in message
  assert 'missing (in the model, not in the checkpoint): 1' in message
  assert 'Transformer/encoderblock_1/LayerNorm_0/scale' in message
  assert 'unexpected (in the checkpoint, not in the model): 1' in message
  assert 'Transformer/encoderblock_7/LayerNorm_0/scale' in message
  assert f'embedding/bias: checkpoint ({WIDTH + 1},), model ({WIDTH},)' in message


def test_checkpoint_of_a_wider_model_is_named(tmp_path):
  path = str(tmp_path / 'wide.npz')
  checkpoint.save(init_params(small_config(hidden_size=2 * WIDTH)), path)
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=rf'embedding/kernel: checkpoint \(4, 4, 3, {2 * WIDTH}\)'):
    checkpoint.load_pretrained(pretrained_path=path, init_params=init_params(small_config()),
                               model_config=small_config())


def test_missing_and_unreadable_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='absent.npz'):
    checkpoint.load(str(tmp_path / 'absent.npz'))
  not_npz = tmp_path / 'model.npz'
  not_npz.write_bytes(b'this is not a zip archive')
  with pytest.raises(ValueError, match=r'model.npz is not an .npz archive'):
    checkpoint.load(str(not_npz))
  truncated = tmp_path / 'truncated.npz'
  np.savez(truncated, **official_layout_arrays())
  truncated.write_bytes(truncated.read_bytes()[:500])
  with pytest.raises(ValueError, match='truncated.npz is not a readable .npz checkpoint'):
    checkpoint.load(str(truncated))
