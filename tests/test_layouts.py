"""Hugging Face and timm checkpoints: synthetic files in each family's exact key names, shapes
and config.json fields (as transformers' and timm's own code reads them), loaded here and checked
against an independent plain-jax.numpy forward pass of that family written below; position
tables resampled as each library does; hf:// through a local Hub cache. No torch needed."""

import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from vit_jax import checkpoint, layouts
from vit_jax.layouts import common
from vit_jax.layouts import timm as timm_layout
from vit_jax.models_vit import VisionTransformer

WIDTH, HEADS, MLP, LAYERS, PATCH, SIZE = 16, 2, 32, 2, 4, 8  # A 2x2 grid.


# ------------------------------------------------ the families' forward passes, independently

def layer_norm(x, w, b, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * w + b


def reference(w, images, names, *, eps, distilled=False, registers=False, layer_scale=False,
              fused_qkv=False, no_embed_class=False, class_token=True, tanh_gelu=False,
              pre_norm=False, quick_gelu=False, swiglu=False):
  """A PyTorch-style ViT (Linear: x W^T + b) over images NHWC; `names` maps roles to keys.
  Returns the final normalised tokens (batch, tokens, D), registers included (not normalised
  where names['norm'] is None: timm's fc_norm models)."""
  x = jnp.asarray(images, jnp.float32)
  b, h, wd, c = x.shape
  patches = x.reshape(b, h // PATCH, PATCH, wd // PATCH, PATCH, c).transpose(0, 1, 3, 5, 2, 4)
  patches = patches.reshape(b, -1, c * PATCH * PATCH)  # (C, P, P): torch's Conv2d order.
  kernel = w[names['patch'] + '.weight'].reshape(WIDTH, -1)
  x = patches @ kernel.T + w[names['patch'] + '.bias']
  prefix = ([w[names['cls']]] if class_token else []) + ([w[names['dist']]] if distilled else [])
  prefix = [jnp.broadcast_to(t, (b, 1, WIDTH)) for t in prefix]
  pos = w[names['pos']]
  if no_embed_class:
    x = jnp.concatenate(prefix + [x + pos], axis=1)
  else:
    x = jnp.concatenate(prefix + [x], axis=1) + pos
  if registers:
    reg = jnp.broadcast_to(w[names['registers']], (b,) + w[names['registers']].shape[1:])
    x = jnp.concatenate([x[:, :len(prefix)], reg, x[:, len(prefix):]], axis=1)
  if pre_norm:
    x = layer_norm(x, w[names['pre_norm'] + '.weight'], w[names['pre_norm'] + '.bias'], eps)
  head_dim = WIDTH // HEADS
  for i in range(LAYERS):
    key = lambda role: names[role].format(i=i)
    y = layer_norm(x, w[key('ln1') + '.weight'], w[key('ln1') + '.bias'], eps)
    if fused_qkv:
      qkv = y @ w[key('qkv') + '.weight'].T + w[key('qkv') + '.bias']
      q, k, v = jnp.split(qkv, 3, axis=-1)
    else:
      q, k, v = (y @ w[key(r) + '.weight'].T + w[key(r) + '.bias'] for r in ('q', 'k', 'v'))
    split = lambda t: t.reshape(b, -1, HEADS, head_dim).transpose(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    attention = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim), axis=-1)
    y = (attention @ v).transpose(0, 2, 1, 3).reshape(b, -1, WIDTH)
    y = y @ w[key('o') + '.weight'].T + w[key('o') + '.bias']
    if layer_scale:
      y = y * w[key('ls1')]
    x = x + y
    y = layer_norm(x, w[key('ln2') + '.weight'], w[key('ln2') + '.bias'], eps)
    y = y @ w[key('fc1') + '.weight'].T + w[key('fc1') + '.bias']
    if swiglu:  # [gate; up] in one weight: SiLU(gate) * up.
      gate, up = y[..., :y.shape[-1] // 2], y[..., y.shape[-1] // 2:]
      y = gate / (1 + jnp.exp(-gate)) * up
    else:
      y = y * jax.nn.sigmoid(1.702 * y) if quick_gelu else jax.nn.gelu(y, approximate=tanh_gelu)
    y = y @ w[key('fc2') + '.weight'].T + w[key('fc2') + '.bias']
    if layer_scale:
      y = y * w[key('ls2')]
    x = x + y
  if names['norm'] is None:
    return x
  return layer_norm(x, w[names['norm'] + '.weight'], w[names['norm'] + '.bias'], eps)


HF_VIT = dict(patch='embeddings.patch_embeddings.projection', cls='embeddings.cls_token',
              dist='embeddings.distillation_token', pos='embeddings.position_embeddings',
              registers='embeddings.register_tokens',
              ln1='encoder.layer.{i}.layernorm_before', ln2='encoder.layer.{i}.layernorm_after',
              q='encoder.layer.{i}.attention.attention.query',
              k='encoder.layer.{i}.attention.attention.key',
              v='encoder.layer.{i}.attention.attention.value',
              o='encoder.layer.{i}.attention.output.dense',
              fc1='encoder.layer.{i}.intermediate.dense', fc2='encoder.layer.{i}.output.dense',
              norm='layernorm')
HF_DINOV2 = dict(HF_VIT, ln1='encoder.layer.{i}.norm1', ln2='encoder.layer.{i}.norm2',
                 fc1='encoder.layer.{i}.mlp.fc1', fc2='encoder.layer.{i}.mlp.fc2',
                 ls1='encoder.layer.{i}.layer_scale1.lambda1',
                 ls2='encoder.layer.{i}.layer_scale2.lambda1')
HF_DINOV2_SWIGLU = dict(HF_DINOV2, fc1='encoder.layer.{i}.mlp.weights_in',
                        fc2='encoder.layer.{i}.mlp.weights_out')
TIMM = dict(patch='patch_embed.proj', cls='cls_token', dist='dist_token', pos='pos_embed',
            registers='reg_token', ln1='blocks.{i}.norm1', ln2='blocks.{i}.norm2',
            qkv='blocks.{i}.attn.qkv', o='blocks.{i}.attn.proj', fc1='blocks.{i}.mlp.fc1',
            fc2='blocks.{i}.mlp.fc2', ls1='blocks.{i}.ls1.gamma', ls2='blocks.{i}.ls2.gamma',
            norm='norm')


def random_weights(names, *, prefix_tokens, pos_tokens, registers=0, layer_scale=False,
                   fused_qkv=False, prefix='', heads=(), seed=0, swiglu=False, fc_norm=False):
  """Every weight the family's model has, in its names and PyTorch shapes (prefix_tokens=0:
  no class token; swiglu: fc1 twice as wide as fc2 reads; fc_norm: timm's norm after pooling)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, scale=0.2: (rng.standard_normal(shape) * scale).astype(np.float32)
  w = {names['patch'] + '.weight': normal(WIDTH, 3, PATCH, PATCH),
       names['patch'] + '.bias': normal(WIDTH), names['pos']: normal(1, pos_tokens, WIDTH)}
  if prefix_tokens:
    w[names['cls']] = normal(1, 1, WIDTH)
  if prefix_tokens == 2:
    w[names['dist']] = normal(1, 1, WIDTH)
  if registers:
    w[names['registers']] = normal(1, registers, WIDTH)
  for i in range(LAYERS):
    key = lambda role: names[role].format(i=i)
    for role in ('ln1', 'ln2'):
      w[key(role) + '.weight'] = 1 + normal(WIDTH)
      w[key(role) + '.bias'] = normal(WIDTH)
    for role in (('qkv',) if fused_qkv else ('q', 'k', 'v')):
      rows = 3 * WIDTH if fused_qkv else WIDTH
      w[key(role) + '.weight'] = normal(rows, WIDTH)
      w[key(role) + '.bias'] = normal(rows)
    w[key('o') + '.weight'], w[key('o') + '.bias'] = normal(WIDTH, WIDTH), normal(WIDTH)
    fc1 = 2 * MLP if swiglu else MLP
    w[key('fc1') + '.weight'], w[key('fc1') + '.bias'] = normal(fc1, WIDTH), normal(fc1)
    w[key('fc2') + '.weight'], w[key('fc2') + '.bias'] = normal(WIDTH, MLP), normal(WIDTH)
    if layer_scale:
      w[key('ls1')], w[key('ls2')] = 1 + normal(WIDTH), 1 + normal(WIDTH)
  for norm in ([names['norm']] if names['norm'] else []) + (['fc_norm'] if fc_norm else []):
    w[norm + '.weight'], w[norm + '.bias'] = 1 + normal(WIDTH), normal(WIDTH)
  for name, outputs, *inputs in heads:
    inputs = inputs[0] if inputs else WIDTH
    w[name + '.weight'], w[name + '.bias'] = normal(outputs, inputs), normal(outputs)
  return {(prefix + k if not k.startswith(tuple(h[0] for h in heads)) else k): v
          for k, v in w.items()}


def unprefixed(w, prefix):
  return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in w.items()}


def images(seed=1):
  return jax.random.uniform(jax.random.PRNGKey(seed), (2, SIZE, SIZE, 3), minval=-1, maxval=1)


def apply(exported, x, num_classes='file'):
  model = VisionTransformer(num_classes=exported.num_classes if num_classes == 'file' else None,
                            **exported.config)
  return model.apply({'params': exported.params}, x, train=False)


def write_hf(directory, weights, config):
  directory.mkdir(parents=True)
  save_file(weights, str(directory / 'model.safetensors'))
  (directory / 'config.json').write_text(json.dumps(config))
  return str(directory)


HF_CONFIG = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 intermediate_size=MLP, patch_size=PATCH, image_size=SIZE, num_channels=3,
                 qkv_bias=True)


# ---------------------------------------------------------------------------- the families

def test_hugging_face_vit_for_image_classification(tmp_path):
  w = random_weights(HF_VIT, prefix_tokens=1, pos_tokens=5, prefix='vit.',
                     heads=[('classifier', 3)])
  path = write_hf(tmp_path / 'vit', w, dict(
      HF_CONFIG, model_type='vit', architectures=['ViTForImageClassification'],
      layer_norm_eps=1e-12, hidden_act='gelu', id2label={'0': 'cat', '1': 'dog', '2': 'owl'}))
  exported = checkpoint.load_model(path)
  assert (exported.num_classes, exported.image_size) == (3, (SIZE, SIZE))
  assert exported.config.transformer.layer_norm_epsilon == 1e-12
  x = images()
  tokens = reference(unprefixed(w, 'vit.'), x, HF_VIT, eps=1e-12)
  expected = tokens[:, 0] @ w['classifier.weight'].T + w['classifier.bias']
  np.testing.assert_allclose(apply(exported, x), expected, atol=1e-5, rtol=0)


def test_hugging_face_vit_model_with_its_pooler(tmp_path):
  w = random_weights(HF_VIT, prefix_tokens=1, pos_tokens=5, heads=[('pooler.dense', WIDTH)])
  path = write_hf(tmp_path / 'vit', w, dict(HF_CONFIG, model_type='vit', hidden_act='gelu',
                                            architectures=['ViTModel']))
  exported = checkpoint.load_model(path)
  assert exported.num_classes is None and exported.config.representation_size == WIDTH
  x = images()
  tokens = reference(w, x, HF_VIT, eps=1e-12)
  pooled = jnp.tanh(tokens[:, 0] @ w['pooler.dense.weight'].T + w['pooler.dense.bias'])
  np.testing.assert_allclose(apply(exported, x, num_classes=None), pooled, atol=1e-5, rtol=0)


def test_hugging_face_deit_with_its_distillation_head(tmp_path):
  w = random_weights(HF_VIT, prefix_tokens=2, pos_tokens=6, prefix='deit.',
                     heads=[('cls_classifier', 4), ('distillation_classifier', 4)])
  path = write_hf(tmp_path / 'deit', w, dict(
      HF_CONFIG, model_type='deit', hidden_act='gelu', layer_norm_eps=1e-12,
      architectures=['DeiTForImageClassificationWithTeacher']))
  exported = checkpoint.load_model(path)
  assert exported.config.distilled and exported.num_classes == 4
  x = images()
  tokens = reference(unprefixed(w, 'deit.'), x, HF_VIT, eps=1e-12, distilled=True)
  expected = ((tokens[:, 0] @ w['cls_classifier.weight'].T + w['cls_classifier.bias']) +
              (tokens[:, 1] @ w['distillation_classifier.weight'].T +
               w['distillation_classifier.bias'])) / 2
  np.testing.assert_allclose(apply(exported, x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize('registers', [0, 4])
def test_hugging_face_dinov2_layer_scale_and_registers(tmp_path, registers):
  w = random_weights(HF_DINOV2, prefix_tokens=1, pos_tokens=5, registers=registers,
                     layer_scale=True)
  model_type = 'dinov2_with_registers' if registers else 'dinov2'
  config = dict(HF_CONFIG, model_type=model_type, mlp_ratio=MLP // WIDTH, hidden_act='gelu',
                layer_norm_eps=1e-6, layerscale_value=1.0)
  if registers:
    config['num_register_tokens'] = registers
  exported = checkpoint.load_model(write_hf(tmp_path / model_type, w, config))
  assert exported.config.get('num_registers', 0) == registers
  x = images()
  tokens = reference(w, x, HF_DINOV2, eps=1e-6, registers=bool(registers), layer_scale=True)
  np.testing.assert_allclose(apply(exported, x), tokens[:, 0], atol=1e-5, rtol=0)  # Pooler.
  # The patch tokens are the backbone's features: the registers are not among them.
  grid = jax.jit(lambda p, x: __import__('vit_jax.features', fromlist=['x']).backbone_features(
      VisionTransformer(num_classes=None, **exported.config), p, x))(exported.params, x)
  np.testing.assert_allclose(grid['encoded'].reshape(2, 4, WIDTH), tokens[:, 1 + registers:],
                             atol=1e-5, rtol=0)


def test_hugging_face_deit_for_image_classification_reads_the_class_token_only(tmp_path):
  """DeiTForImageClassification: the distillation token is in the sequence, one classifier on
  the class token (a distilled DeiT fine-tuned further)."""
  w = random_weights(HF_VIT, prefix_tokens=2, pos_tokens=6, prefix='deit.',
                     heads=[('classifier', 4)])
  path = write_hf(tmp_path / 'deit', w, dict(
      HF_CONFIG, model_type='deit', hidden_act='gelu', layer_norm_eps=1e-12,
      architectures=['DeiTForImageClassification']))
  exported = checkpoint.load_model(path)
  assert exported.config.distilled and not exported.config.distillation_head
  x = images()
  tokens = reference(unprefixed(w, 'deit.'), x, HF_VIT, eps=1e-12, distilled=True)
  expected = tokens[:, 0] @ w['classifier.weight'].T + w['classifier.bias']
  np.testing.assert_allclose(apply(exported, x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize('registers', [0, 4])
def test_hugging_face_dinov2_giant_swiglu_with_its_linear_classifier(tmp_path, registers):
  """DINOv2-giant's SwiGLU MLP (weights_in = [gate; up]; mlp_ratio 3 gives 2/3 * 48 = 32 gated
  units) and Dinov2ForImageClassification's head on [class token; mean patch token]."""
  w = random_weights(HF_DINOV2_SWIGLU, prefix_tokens=1, pos_tokens=5, registers=registers,
                     layer_scale=True, swiglu=True, prefix='dinov2.',
                     heads=[('classifier', 3, 2 * WIDTH)])
  model_type = 'dinov2_with_registers' if registers else 'dinov2'
  w = {k.replace('dinov2.', f'{model_type}.', 1): v for k, v in w.items()}
  config = dict(HF_CONFIG, model_type=model_type, mlp_ratio=3, use_swiglu_ffn=True,
                hidden_act='gelu', layer_norm_eps=1e-6, layerscale_value=1.0)
  if registers:
    config['num_register_tokens'] = registers
  exported = checkpoint.load_model(write_hf(tmp_path / model_type, w, config))
  assert exported.config.transformer.swiglu and exported.config.transformer.mlp_dim == MLP
  assert exported.config.classifier == 'token_and_gap' and exported.num_classes == 3
  x = images()
  tokens = reference(unprefixed(w, f'{model_type}.'), x, HF_DINOV2_SWIGLU, eps=1e-6,
                     registers=bool(registers), layer_scale=True, swiglu=True)
  pooled = jnp.concatenate([tokens[:, 0], tokens[:, 1 + registers:].mean(1)], axis=-1)
  expected = pooled @ w['classifier.weight'].T + w['classifier.bias']
  np.testing.assert_allclose(apply(exported, x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize('family', ['vit', 'deit_distilled', 'dinov2_reg4', 'dinov2_giant',
                                    'reg4_gap'])
def test_timm_state_dicts(tmp_path, monkeypatch, family):
  """vit_*, deit_*_distilled_*, *_reg4_dinov2 (no_embed_class), vit_giant_patch14_dinov2
  (SwiGLUPacked fc1) and the *_reg4_gap_* models (no class token, registers, average pooling,
  fc_norm after it instead of norm)."""
  monkeypatch.setitem(timm_layout.HEADS_BY_WIDTH, WIDTH, HEADS)  # timm's own: 64 channels a head.
  distilled, registers = family == 'deit_distilled', 4 if 'reg4' in family else 0
  gap = family == 'reg4_gap'
  dinov2 = family.startswith('dinov2')
  heads = [('head', 5)] + ([('head_dist', 5)] if distilled else [])
  names = dict(TIMM, norm=None) if gap else TIMM
  w = random_weights(names, prefix_tokens=0 if gap else 1 + distilled,
                     pos_tokens=4 if registers else 5 + distilled, registers=registers,
                     layer_scale=bool(registers) or dinov2, fused_qkv=True,
                     heads=[] if dinov2 else heads, swiglu=family == 'dinov2_giant', fc_norm=gap)
  path = str(tmp_path / f'{family}.safetensors')
  save_file(w, path)
  exported = checkpoint.load_model(path)
  x = images()
  tokens = reference(w, x, names, eps=1e-6, distilled=distilled, registers=bool(registers),
                     layer_scale=bool(registers) or dinov2, fused_qkv=True,
                     no_embed_class=bool(registers), class_token=not gap,
                     swiglu=family == 'dinov2_giant')
  if dinov2:  # DINOv2: features, no head.
    expected = tokens[:, 0]
  elif gap:
    pooled = layer_norm(tokens[:, registers:].mean(1), w['fc_norm.weight'], w['fc_norm.bias'],
                        1e-6)
    expected = pooled @ w['head.weight'].T + w['head.bias']
  else:
    expected = tokens[:, 0] @ w['head.weight'].T + w['head.bias']
    if distilled:
      expected = (expected + tokens[:, 1] @ w['head_dist.weight'].T + w['head_dist.bias']) / 2
  np.testing.assert_allclose(apply(exported, x), expected, atol=1e-5, rtol=0)


def test_a_timm_class_token_with_average_pooling_is_named(tmp_path):
  w = random_weights(dict(TIMM, norm=None), prefix_tokens=1, pos_tokens=5, fused_qkv=True,
                     fc_norm=True)
  path = str(tmp_path / 'mae_finetuned.safetensors')
  save_file(w, path)
  with pytest.raises(ValueError, match=r'averages its tokens \(fc_norm\) but has a class token'):
    checkpoint.load_model(path)


# ---------------------------------------------------------------- position tables resampled

def bicubic_direct(grid, new_shape, a=-0.75):
  """PyTorch's bicubic (align_corners=False, no antialias), one output value at a time."""
  def weight(t):
    t = abs(t)
    if t <= 1:
      return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0
  h, w = grid.shape[:2]
  out = np.zeros(tuple(new_shape) + grid.shape[2:])
  for i in range(new_shape[0]):
    for j in range(new_shape[1]):
      y = (i + 0.5) * h / new_shape[0] - 0.5
      x = (j + 0.5) * w / new_shape[1] - 0.5
      for ty in range(int(np.floor(y)) - 1, int(np.floor(y)) + 3):
        for tx in range(int(np.floor(x)) - 1, int(np.floor(x)) + 3):
          out[i, j] += (weight(y - ty) * weight(x - tx) *
                        grid[min(max(ty, 0), h - 1), min(max(tx, 0), w - 1)])
  return out


@pytest.mark.parametrize('new_shape', [(7, 5), (2, 3)])
def test_hugging_face_tables_resample_as_pytorch_bicubic(new_shape):
  grid = np.random.default_rng(0).standard_normal((4, 4, 3))
  np.testing.assert_allclose(common.resample_bicubic(grid, new_shape),
                             bicubic_direct(grid, new_shape), atol=1e-12)


@pytest.mark.parametrize('new_shape', [(7, 5), (2, 3)])
def test_timm_tables_resample_as_antialiased_bicubic(new_shape):
  """timm resamples with torch's antialiased bicubic, which is PIL's (Keys a=-0.5, widened
  when shrinking)."""
  grid = np.random.default_rng(0).standard_normal((4, 4, 2)).astype(np.float32)
  expected = np.stack([np.asarray(Image.fromarray(grid[..., c], mode='F').resize(
      new_shape[::-1], Image.BICUBIC)) for c in range(2)], axis=-1)
  np.testing.assert_allclose(layouts.resampler('bicubic_antialias')(grid, new_shape),
                             expected, atol=1e-5)


def test_fine_tuning_a_dinov2_at_another_resolution_resamples_bicubically(tmp_path):
  w = random_weights(HF_DINOV2, prefix_tokens=1, pos_tokens=5, layer_scale=True)
  path = write_hf(tmp_path / 'dinov2', w, dict(HF_CONFIG, model_type='dinov2', mlp_ratio=2))
  exported = checkpoint.load_model(path)
  model = VisionTransformer(num_classes=7, **exported.config)
  init = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 16, 3)), train=False)['params']
  params = checkpoint.load_pretrained(pretrained_path=path, init_params=init,
                                      model_config=exported.config, image_size=(12, 16))
  table = np.asarray(params['Transformer']['posembed_input']['pos_embedding'][0])
  old = w['embeddings.position_embeddings'][0]
  np.testing.assert_allclose(table[0], old[0])  # The class token's slot is kept.
  np.testing.assert_allclose(table[1:].reshape(3, 4, WIDTH),
                             bicubic_direct(old[1:].reshape(2, 2, WIDTH), (3, 4)), atol=1e-6)
  assert not np.asarray(params['head']['kernel']).any()  # A fresh head.


# ------------------------------------------------------------------------- hf:// and refusals

def hub_cache(root, repo, files: dict, revision='main'):
  """A Hugging Face Hub cache folder as huggingface_hub lays it out."""
  commit = 'a' * 40
  snapshot = root / f'models--{repo.replace("/", "--")}' / 'snapshots' / commit
  snapshot.mkdir(parents=True)
  for name, write in files.items():
    write(snapshot / name)
  refs = root / f'models--{repo.replace("/", "--")}' / 'refs'
  refs.mkdir()
  (refs / revision).write_text(commit)
  return root


def test_hf_ids_resolve_through_the_local_cache_offline(tmp_path, monkeypatch):
  import huggingface_hub.constants
  w = random_weights(HF_VIT, prefix_tokens=1, pos_tokens=5, prefix='vit.',
                     heads=[('classifier', 3)])
  config = dict(HF_CONFIG, model_type='vit', hidden_act='gelu')
  cache = hub_cache(tmp_path / 'hub', 'org/tiny-vit', {
      'config.json': lambda p: p.write_text(json.dumps(config)),
      'model.safetensors': lambda p: save_file(w, str(p))})
  hub_cache(tmp_path / 'hub', 'org/partial', {  # A download that stopped after config.json.
      'config.json': lambda p: p.write_text(json.dumps(config))})
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
  before = sorted(str(p) for p in cache.rglob('*'))
  exported = checkpoint.load_model('hf://org/tiny-vit')
  assert exported.num_classes == 3
  with pytest.raises(FileNotFoundError, match=r'hf://org/other is not in the local Hugging Face '
                                              r'cache'):
    checkpoint.load_model('hf://org/other')
  with pytest.raises(FileNotFoundError, match=r'hf://org/tiny-vit@v2 is not in the local'):
    checkpoint.load_model('hf://org/tiny-vit@v2')
  with pytest.raises(ValueError, match=r'expected hf://ORG/NAME'):
    checkpoint.load_model('hf://tiny-vit')
  with pytest.raises(FileNotFoundError, match=r'has a config.json but no model.safetensors'):
    checkpoint.load_model('hf://org/partial')
  assert sorted(str(p) for p in cache.rglob('*')) == before  # Nothing written.


def test_pickles_are_refused_with_the_way_to_safetensors(tmp_path):
  directory = tmp_path / 'vit'
  directory.mkdir()
  (directory / 'config.json').write_text(json.dumps(dict(HF_CONFIG, model_type='vit')))
  (directory / 'pytorch_model.bin').write_bytes(pickle.dumps({'w': 1}))
  with pytest.raises(ValueError, match=r'only as Python pickles \(pytorch_model.bin\), which '
                                       r'vit_jax never loads.*model.safetensors'):
    checkpoint.load_model(str(directory))
  (directory / 'model.pth').write_bytes(pickle.dumps({'w': 1}))
  with pytest.raises(ValueError, match=r'model.pth is a Python pickle'):
    checkpoint.load_model(str(directory / 'model.pth'))


def test_a_file_claiming_a_layout_it_lacks_names_the_first_missing_key(tmp_path):
  w = random_weights(HF_VIT, prefix_tokens=1, pos_tokens=5)
  del w['encoder.layer.1.attention.attention.key.weight']
  path = write_hf(tmp_path / 'vit', w, dict(HF_CONFIG, model_type='vit'))
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r"vit does not hold the layout it claims: it has no "
                           r"'encoder.layer.1.attention.attention.key.weight'"):
    checkpoint.load_model(path)
  assert layouts.read(str(tmp_path)) is None  # A folder that is no checkpoint: not claimed.


def test_fine_tuning_a_hugging_face_directory_from_the_recipe(tmp_path):
  from helpers import TINY, parse_config
  from vit_jax import train
  w = random_weights(HF_VIT, prefix_tokens=1, pos_tokens=5, prefix='vit.',
                     heads=[('classifier', 3)])
  path = write_hf(tmp_path / 'vit', w, dict(HF_CONFIG, model_type='vit', hidden_act='gelu',
                                            layer_norm_eps=1e-12))
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DeiT's, say.
  (tmp_path / 'vit' / 'preprocessor_config.json').write_text(json.dumps(
      {'image_mean': mean, 'image_std': std}))
  config = parse_config(f'--config=configs/finetune.py:{path},digits',
                        *[a for a in TINY[1:] if 'model.' not in a])
  assert config.pretrained_path == path and config.model.transformer.layer_norm_epsilon == 1e-12
  assert (config.pp.mean, config.pp.std) == (mean, std)  # The file's normalisation.
  from vit_jax import input_pipeline
  source = input_pipeline.get_source(config, 'test')
  normalised = next(input_pipeline.eval_batches(config, source, batch_size=4, num_steps=1))
  with config.unlocked():
    config.pp.mean = config.pp.std = None
  plain = next(input_pipeline.eval_batches(config, source, batch_size=4, num_steps=1))
  np.testing.assert_allclose(normalised['image'], ((plain['image'] + 1) / 2 - mean) / std,
                             atol=1e-5)
  # Fed [-1, 1] instead of what the file expects: refused, naming both, before any work.
  from helpers import assert_unchanged, snapshot
  (tmp_path / 'refused').mkdir()
  (tmp_path / 'refused' / 'notes.txt').write_text('kept as it is')  # What the workdir held.
  before = snapshot(tmp_path / 'refused')
  with pytest.raises(ValueError, match=r'expects inputs normalised as --config.pp.mean=\(0.485, '
                     r'.*but the config normalises as \[-1, 1\].*Nothing was trained'):
    train.train_and_evaluate(config, str(tmp_path / 'refused'))
  assert not os.path.exists(tmp_path / 'refused' / 'checkpoints')
  assert_unchanged(before, tmp_path / 'refused')
  with config.unlocked():
    config.pp.mean, config.pp.std = mean, std
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['step'] == 6 and 0 <= results['test']['accuracy_test'] <= 1
  export = str(tmp_path / 'run' / 'model.npz')
  tuned = checkpoint.load_model(export)  # Our export of it: its normalisation and class names.
  assert tuned.config.transformer.layer_norm_epsilon == 1e-12 and tuned.num_classes == 10
  assert tuned.preprocessing == {'mean': list(mean), 'std': list(std)}
  assert tuned.class_names == [str(i) for i in range(10)]
  np.testing.assert_array_equal(tuned.params['Transformer']['encoderblock_1']['LayerNorm_0']
                                ['scale'].shape, (WIDTH,))
  # Evaluating the export (or the source) feeds it what it describes, whatever the config says.
  with config.unlocked():
    config.pp.mean = config.pp.std = None
    config.pretrained_path = export
  assert train.with_exported_model(config).pp.mean == mean


# ------------------------------------------------------------------------------ writing back

FAMILIES = {  # name: (key names, random_weights arguments, config.json additions)
    'vit_head': (HF_VIT, dict(prefix_tokens=1, pos_tokens=5, prefix='vit.',
                              heads=[('classifier', 3)]), dict(model_type='vit')),
    'vit_pooler': (HF_VIT, dict(prefix_tokens=1, pos_tokens=5, heads=[('pooler.dense', WIDTH)]),
                   dict(model_type='vit')),
    'deit_teacher': (HF_VIT, dict(prefix_tokens=2, pos_tokens=6, prefix='deit.', heads=[
        ('cls_classifier', 3), ('distillation_classifier', 3)]), dict(model_type='deit')),
    'deit_one_head': (HF_VIT, dict(prefix_tokens=2, pos_tokens=6, prefix='deit.',
                                   heads=[('classifier', 3)]), dict(model_type='deit')),
    'dinov2_reg': (HF_DINOV2, dict(prefix_tokens=1, pos_tokens=5, registers=4, layer_scale=True),
                   dict(model_type='dinov2_with_registers', mlp_ratio=MLP // WIDTH)),
    'dinov2_giant_classifier': (HF_DINOV2_SWIGLU, dict(
        prefix_tokens=1, pos_tokens=5, layer_scale=True, swiglu=True, prefix='dinov2.',
        heads=[('classifier', 3, 2 * WIDTH)]), dict(model_type='dinov2', mlp_ratio=3,
                                                     use_swiglu_ffn=True)),
    'timm_reg4_gap': (dict(TIMM, norm=None), dict(prefix_tokens=0, pos_tokens=4, registers=4,
                                                  layer_scale=True, fused_qkv=True,
                                                  heads=[('head', 3)], fc_norm=True), None),
}
# What a format cannot express, and the error that says so.
REFUSED = {('vit_pooler', 'timm'): 'Cannot write a timm model: a pre-logits layer',
           ('deit_one_head', 'timm'): 'Cannot write a timm model: a distilled model with one head',
           ('dinov2_giant_classifier', 'timm'): "Cannot write a timm model: classifier='token_and_gap'",
           ('timm_reg4_gap', 'hf'): 'Cannot write a Hugging Face model: .*a LayerNorm after pooling'}


@pytest.mark.parametrize('fmt', ['npz', 'hf', 'timm'])
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_every_family_converts_to_every_format_with_the_same_outputs(tmp_path, monkeypatch,
                                                                     family, fmt):
  from vit_jax import convert
  monkeypatch.setitem(timm_layout.HEADS_BY_WIDTH, WIDTH, HEADS)
  names, spec, hf_config = FAMILIES[family]
  weights = random_weights(names, **spec)
  if hf_config is None:  # A timm state dict.
    source = str(tmp_path / 'source.safetensors')
    save_file(weights, source)
  else:
    source = write_hf(tmp_path / 'source', weights, dict(
        HF_CONFIG, hidden_act='gelu', layer_norm_eps=1e-6, **hf_config))
  dest = str(tmp_path / ('dest.safetensors' if fmt == 'timm' else 'dest.npz' if fmt == 'npz'
                         else 'dest'))
  if (family, fmt) in REFUSED:
    with pytest.raises(ValueError, match=REFUSED[family, fmt]):
      convert.convert(source, dest, fmt)
    assert not os.path.exists(dest)
    return
  how = convert.convert(source, dest, fmt)
  assert dest in how
  before, after = checkpoint.load_model(source), checkpoint.load_model(dest)
  assert after.num_classes == before.num_classes and after.image_size == before.image_size
  x = images()
  num_classes = None if family == 'vit_pooler' else 'file'
  np.testing.assert_allclose(apply(after, x, num_classes), apply(before, x, num_classes),
                             atol=1e-6, rtol=0)
  with pytest.raises(FileExistsError, match='nothing was written'):
    convert.convert(source, dest, fmt)


def test_the_tools_read_a_hugging_face_directory_with_its_names_and_normalisation(tmp_path):
  from vit_jax import analysis, fewshot, predict
  w = random_weights(HF_VIT, prefix_tokens=1, pos_tokens=5, prefix='vit.',
                     heads=[('classifier', 3)])
  path = write_hf(tmp_path / 'vit', w, dict(
      HF_CONFIG, model_type='vit', hidden_act='gelu',
      id2label={'0': 'cat', '1': 'dog', '2': 'owl'}))
  mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
  (tmp_path / 'vit' / 'preprocessor_config.json').write_text(json.dumps(
      {'image_mean': mean, 'image_std': std}))
  classifier = predict.load_classifier(path)
  assert classifier.class_names == ['cat', 'dog', 'owl']
  assert predict.label_names(3, from_checkpoint=classifier.class_names) == ['cat', 'dog', 'owl']
  x = images()
  normalised = ((x + 1) / 2 - np.array(mean)) / np.array(std)
  tokens = reference(unprefixed(w, 'vit.'), normalised, HF_VIT, eps=1e-12)
  logits = tokens[:, 0] @ w['classifier.weight'].T + w['classifier.bias']
  np.testing.assert_allclose(classifier.classify(x), jax.nn.softmax(logits), atol=1e-5)
  few = fewshot.evaluate_checkpoint(path, dataset='digits', shots=(1,), seeds=1)
  assert 0 <= few[1] <= 1
  exported = checkpoint.load_model(path)
  figures = analysis.analyse(exported.params, VisionTransformer(num_classes=3, **exported.config),
                             exported.config, x, str(tmp_path / 'figures'), exported.model_inputs)
  assert len(figures) == 4
  # The attention the model computed is on the normalised images.
  weights = analysis.attention_weights(VisionTransformer(num_classes=3, **exported.config),
                                       exported.params, exported.model_inputs(x))
  assert not np.allclose(weights[0], analysis.attention_weights(
      VisionTransformer(num_classes=3, **exported.config), exported.params, x)[0])


def test_analysis_of_models_with_distillation_and_register_tokens(tmp_path):
  """The patches are the last tokens whatever precedes them (class, distillation, registers)."""
  from vit_jax import analysis
  for name, (names, spec, hf_config) in [('deit', FAMILIES['deit_teacher']),
                                         ('dinov2', FAMILIES['dinov2_reg'])]:
    path = write_hf(tmp_path / name, random_weights(names, **spec), dict(
        HF_CONFIG, hidden_act='gelu', **hf_config))
    exported = checkpoint.load_model(path)
    model = VisionTransformer(num_classes=exported.num_classes, **exported.config)
    figures = analysis.analyse(exported.params, model, exported.config, images(),
                               str(tmp_path / f'{name}_figures'))
    assert len(figures) == 4


def attention_pool(tokens, probe, qkv_weight, qkv_bias, h, *, tanh_gelu, names=None):
  """A probe attending to every token, then LayerNorm + MLP with a residual (SigLIP's head);
  h(name) gives the out projection, norm and MLP weights under `names`' spelling."""
  names = names or dict(out='attention.out_proj', norm='layernorm', fc1='mlp.fc1', fc2='mlp.fc2')
  q_w, k_w, v_w = np.split(qkv_weight, 3)
  q_b, k_b, v_b = np.split(qkv_bias, 3)
  split = lambda t: t.reshape(t.shape[0], -1, HEADS, WIDTH // HEADS).transpose(0, 2, 1, 3)
  q = split(jnp.broadcast_to(probe, (tokens.shape[0], 1, WIDTH)) @ q_w.T + q_b)
  k, v = split(tokens @ k_w.T + k_b), split(tokens @ v_w.T + v_b)
  a = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(WIDTH // HEADS), axis=-1)
  pooled = (a @ v).transpose(0, 2, 1, 3).reshape(tokens.shape[0], 1, WIDTH)
  pooled = pooled @ h(names['out'] + '.weight').T + h(names['out'] + '.bias')
  y = layer_norm(pooled, h(names['norm'] + '.weight'), h(names['norm'] + '.bias'), 1e-6)
  y = jax.nn.gelu(y @ h(names['fc1'] + '.weight').T + h(names['fc1'] + '.bias'),
                  approximate=tanh_gelu)
  return (pooled + y @ h(names['fc2'] + '.weight').T + h(names['fc2'] + '.bias'))[:, 0]


SIGLIP = dict(patch='vision_model.embeddings.patch_embedding',
              pos='vision_model.embeddings.position_embedding.weight',
              ln1='vision_model.encoder.layers.{i}.layer_norm1',
              ln2='vision_model.encoder.layers.{i}.layer_norm2',
              q='vision_model.encoder.layers.{i}.self_attn.q_proj',
              k='vision_model.encoder.layers.{i}.self_attn.k_proj',
              v='vision_model.encoder.layers.{i}.self_attn.v_proj',
              o='vision_model.encoder.layers.{i}.self_attn.out_proj',
              fc1='vision_model.encoder.layers.{i}.mlp.fc1',
              fc2='vision_model.encoder.layers.{i}.mlp.fc2', norm='vision_model.post_layernorm')


def test_the_vision_tower_of_a_full_siglip_model(tmp_path):
  """SigLIP: no class token, patches-only table, multi-head attention pooling (torch's
  nn.MultiheadAttention, query / key / value stacked in in_proj)."""
  rng = np.random.default_rng(3)
  normal = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)
  w = random_weights(dict(SIGLIP, cls='unused'), prefix_tokens=1, pos_tokens=4)
  del w['unused']
  w['vision_model.embeddings.position_embedding.weight'] = normal(4, WIDTH)  # nn.Embedding.
  head = {'vision_model.head.probe': normal(1, 1, WIDTH),
          'vision_model.head.attention.in_proj_weight': normal(3 * WIDTH, WIDTH),
          'vision_model.head.attention.in_proj_bias': normal(3 * WIDTH),
          'vision_model.head.attention.out_proj.weight': normal(WIDTH, WIDTH),
          'vision_model.head.attention.out_proj.bias': normal(WIDTH),
          'vision_model.head.layernorm.weight': 1 + normal(WIDTH),
          'vision_model.head.layernorm.bias': normal(WIDTH),
          'vision_model.head.mlp.fc1.weight': normal(MLP, WIDTH),
          'vision_model.head.mlp.fc1.bias': normal(MLP),
          'vision_model.head.mlp.fc2.weight': normal(WIDTH, MLP),
          'vision_model.head.mlp.fc2.bias': normal(WIDTH)}
  text = {'text_model.embeddings.token_embedding.weight': normal(7, WIDTH),
          'logit_scale': normal(1), 'logit_bias': normal(1)}
  vision = {k: v for k, v in HF_CONFIG.items()}
  path = write_hf(tmp_path / 'siglip', {**w, **head, **text}, dict(
      model_type='siglip', architectures=['SiglipModel'], vision_config=dict(
          vision, hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6)))
  exported = checkpoint.load_model(path)
  assert exported.config.classifier == 'map' and exported.num_classes is None
  x = images()
  pos = {**w, 'vision_model.embeddings.position_embedding.weight':
         w['vision_model.embeddings.position_embedding.weight'][None]}
  tokens = reference(pos, x, SIGLIP, eps=1e-6, class_token=False, tanh_gelu=True)
  h = lambda name: head[f'vision_model.head.{name}']
  expected = attention_pool(tokens, h('probe'), h('attention.in_proj_weight'),
                            h('attention.in_proj_bias'), h, tanh_gelu=True)
  np.testing.assert_allclose(apply(exported, x), expected, atol=1e-5, rtol=0)
  from vit_jax import convert  # And back, as a SiglipVisionModel.
  convert.convert(path, str(tmp_path / 'tower'), 'hf')
  np.testing.assert_allclose(apply(checkpoint.load_model(str(tmp_path / 'tower')), x), expected,
                             atol=1e-5, rtol=0)


def test_the_vision_tower_of_a_full_clip_model(tmp_path):
  """CLIP: class embedding (D,), no patch bias, a LayerNorm before the blocks, quick GELU."""
  names = dict(SIGLIP, cls='vision_model.embeddings.class_embedding',
               pre_norm='vision_model.pre_layrnorm')
  w = random_weights(names, prefix_tokens=1, pos_tokens=5)
  rng = np.random.default_rng(4)
  w['vision_model.embeddings.position_embedding.weight'] = rng.standard_normal(
      (5, WIDTH)).astype(np.float32) * 0.2
  w[names['cls']] = w[names['cls']].reshape(WIDTH)
  del w['vision_model.embeddings.patch_embedding.bias']
  w['vision_model.pre_layrnorm.weight'] = 1 + w['vision_model.post_layernorm.bias']
  w['vision_model.pre_layrnorm.bias'] = w['vision_model.post_layernorm.weight'] - 1
  extra = {'visual_projection.weight': w['vision_model.post_layernorm.weight'][None],
           'text_model.final_layer_norm.weight': w['vision_model.post_layernorm.weight']}
  path = write_hf(tmp_path / 'clip', {**w, **extra}, dict(
      model_type='clip', architectures=['CLIPModel'], vision_config=dict(
          HF_CONFIG, hidden_act='quick_gelu', layer_norm_eps=1e-5)))
  exported = checkpoint.load_model(path)
  x = images()
  reshaped = {**w, names['cls']: w[names['cls']].reshape(1, 1, WIDTH),
              'vision_model.embeddings.position_embedding.weight':
              w['vision_model.embeddings.position_embedding.weight'][None],
              'vision_model.embeddings.patch_embedding.bias': np.zeros(WIDTH, np.float32)}
  tokens = reference(reshaped, x, names, eps=1e-5, pre_norm=True, quick_gelu=True)
  np.testing.assert_allclose(apply(exported, x), tokens[:, 0], atol=1e-5, rtol=0)
  from vit_jax import convert
  convert.convert(path, str(tmp_path / 'tower'), 'hf')
  np.testing.assert_allclose(apply(checkpoint.load_model(str(tmp_path / 'tower')), x),
                             tokens[:, 0], atol=1e-5, rtol=0)


def test_sharded_directories_and_missing_files(tmp_path):
  w = random_weights(HF_VIT, prefix_tokens=1, pos_tokens=5, prefix='vit.',
                     heads=[('classifier', 3)])
  directory = tmp_path / 'sharded'
  directory.mkdir()
  names = sorted(w)
  shards = {'model-00001-of-00002.safetensors': names[:len(names) // 2],
            'model-00002-of-00002.safetensors': names[len(names) // 2:]}
  for shard, keys in shards.items():
    save_file({k: w[k] for k in keys}, str(directory / shard))
  (directory / 'model.safetensors.index.json').write_text(json.dumps(
      {'weight_map': {k: shard for shard, keys in shards.items() for k in keys}}))
  (directory / 'config.json').write_text(json.dumps(dict(HF_CONFIG, model_type='vit',
                                                         hidden_act='gelu')))
  x = images()
  tokens = reference(unprefixed(w, 'vit.'), x, HF_VIT, eps=1e-12)
  expected = tokens[:, 0] @ w['classifier.weight'].T + w['classifier.bias']
  np.testing.assert_allclose(apply(checkpoint.load_model(str(directory)), x), expected,
                             atol=1e-5, rtol=0)
  os.remove(directory / 'model-00002-of-00002.safetensors')
  with pytest.raises(FileNotFoundError, match=r"the shards \['model-00002-of-00002.safetensors'\] "
                                              r'named by its model.safetensors.index.json'):
    checkpoint.load_model(str(directory))
  os.remove(directory / 'model.safetensors.index.json')
  with pytest.raises(FileNotFoundError, match=r'has a config.json but no model.safetensors'):
    checkpoint.load_model(str(directory))


def test_timm_siglip_and_clip(tmp_path, monkeypatch):
  """timm's SigLIP (attn_pool: latent, q, kv) and CLIP (norm_pre, no patch bias, quick GELU
  named by the architecture in its Hub config.json)."""
  monkeypatch.setitem(timm_layout.HEADS_BY_WIDTH, WIDTH, HEADS)
  rng = np.random.default_rng(5)
  normal = lambda *shape: (rng.standard_normal(shape) * 0.2).astype(np.float32)
  siglip = random_weights(TIMM, prefix_tokens=1, pos_tokens=4, fused_qkv=True)
  del siglip['cls_token']
  pool = {'attn_pool.latent': normal(1, 1, WIDTH), 'attn_pool.q.weight': normal(WIDTH, WIDTH),
          'attn_pool.q.bias': normal(WIDTH), 'attn_pool.kv.weight': normal(2 * WIDTH, WIDTH),
          'attn_pool.kv.bias': normal(2 * WIDTH), 'attn_pool.proj.weight': normal(WIDTH, WIDTH),
          'attn_pool.proj.bias': normal(WIDTH), 'attn_pool.norm.weight': 1 + normal(WIDTH),
          'attn_pool.norm.bias': normal(WIDTH), 'attn_pool.mlp.fc1.weight': normal(MLP, WIDTH),
          'attn_pool.mlp.fc1.bias': normal(MLP), 'attn_pool.mlp.fc2.weight': normal(WIDTH, MLP),
          'attn_pool.mlp.fc2.bias': normal(WIDTH)}
  save_file({**siglip, **pool}, str(tmp_path / 'siglip.safetensors'))
  exported = checkpoint.load_model(str(tmp_path / 'siglip.safetensors'))
  x = images()
  tokens = reference(siglip, x, TIMM, eps=1e-6, fused_qkv=True, class_token=False)
  expected = attention_pool(
      tokens, pool['attn_pool.latent'],
      np.concatenate([pool['attn_pool.q.weight'], pool['attn_pool.kv.weight']]),
      np.concatenate([pool['attn_pool.q.bias'], pool['attn_pool.kv.bias']]),
      lambda name: pool[f'attn_pool.{name}'], tanh_gelu=False,
      names=dict(out='proj', norm='norm', fc1='mlp.fc1', fc2='mlp.fc2'))
  np.testing.assert_allclose(apply(exported, x), expected, atol=1e-5, rtol=0)

  clip = random_weights(dict(TIMM, pre_norm='norm_pre'), prefix_tokens=1, pos_tokens=5,
                        fused_qkv=True, heads=[('head', 6)])
  del clip['patch_embed.proj.bias']
  clip['norm_pre.weight'], clip['norm_pre.bias'] = 1 + normal(WIDTH), normal(WIDTH)
  directory = tmp_path / 'clip'
  directory.mkdir()
  save_file(clip, str(directory / 'model.safetensors'))
  (directory / 'config.json').write_text(json.dumps(
      {'architecture': 'vit_base_patch16_clip_quickgelu_224', 'num_classes': 6}))
  exported = checkpoint.load_model(str(directory))
  tokens = reference(dict(clip, **{'patch_embed.proj.bias': np.zeros(WIDTH, np.float32)}), x,
                     dict(TIMM, pre_norm='norm_pre'), eps=1e-5, fused_qkv=True, pre_norm=True,
                     quick_gelu=True)
  np.testing.assert_allclose(apply(exported, x), tokens[:, 0] @ clip['head.weight'].T +
                             clip['head.bias'], atol=1e-5, rtol=0)


def test_reading_a_checkpoint_source_leaves_jax_unstarted_for_the_command_line(tmp_path):
  """configs/finetune.py:<checkpoint> reads the file while the flags are parsed, before
  main.start joins the other hosts (jax.distributed.initialize refuses once JAX's backend has
  started): every kind of source is read without starting it, and the command line fine-tunes
  from an export of this codebase."""
  import subprocess
  import sys
  from helpers import ROOT, TINY, run_main
  from vit_jax import checkpoint
  hf = write_hf(tmp_path / 'hf', random_weights(HF_VIT, prefix_tokens=1, pos_tokens=5,
                                                prefix='vit.', heads=[('classifier', 3)]),
                dict(HF_CONFIG, model_type='vit', hidden_act='gelu', layer_norm_eps=1e-12))
  exported = checkpoint.load_model(hf)
  described, official = str(tmp_path / 'described.npz'), str(tmp_path / 'official.npz')
  checkpoint.save(exported.params, described, model_config=exported.config,
                  image_size=exported.image_size)
  checkpoint.save(exported.params, official)
  snippet = ('import sys; sys.path.insert(0, "tests"); from helpers import parse_config; '
             'from jax._src import xla_bridge\n'
             'for source in sys.argv[1:]:\n'
             '  parse_config(f"--config=configs/finetune.py:{source},digits")\n'
             '  print(source, xla_bridge.backends_are_initialized())')
  run = subprocess.run([sys.executable, '-c', snippet, hf, described, official], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.split() == [hf, 'False', described, 'False', official, 'False']
  result = run_main(f'--config=configs/finetune.py:{described},digits',
                    f'--workdir={tmp_path / "w"}', *[a for a in TINY[1:] if 'model.' not in a],
                    '--config.total_steps=3', '--config.eval_every=3')
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / 'w' / 'model.npz').exists()


def test_the_image_processors_resize_and_crop_are_followed_and_written_back(tmp_path):
  """CLIP's, SigLIP's and DINOv2's processors resize the shorter side (bicubic) and crop the
  centre: predict does the same, and convert writes it back (npz description, Hugging Face's
  preprocessor_config.json)."""
  from PIL import Image
  from vit_jax import convert, predict
  w = random_weights(HF_VIT, prefix_tokens=1, pos_tokens=5, prefix='vit.',
                     heads=[('classifier', 3)])
  path = write_hf(tmp_path / 'vit', w, dict(HF_CONFIG, model_type='vit', hidden_act='gelu'))
  mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
  (tmp_path / 'vit' / 'preprocessor_config.json').write_text(json.dumps(dict(
      image_processor_type='CLIPImageProcessor', do_resize=True, size={'shortest_edge': 24},
      resample=3, do_center_crop=True, crop_size={'height': SIZE, 'width': SIZE},
      do_normalize=True, image_mean=mean, image_std=std)))
  read = checkpoint.load_model(path)
  assert read.resize == {'shortest_edge': 24, 'crop': [SIZE, SIZE], 'method': 'bicubic'}

  # A smooth non-square photo, 60 x 107: the processor's own steps with PIL, as reference.
  y, x = np.mgrid[0:60, 0:107]
  photo = np.stack([128 + 100 * np.sin(x / 9), 128 + 100 * np.cos(y / 7),
                    128 + 60 * np.sin((x + y) / 11)], -1).astype(np.uint8)
  Image.fromarray(photo).save(tmp_path / 'photo.png')
  ours = predict.load_image(str(tmp_path / 'photo.png'), read.image_size, read.resize)
  width = int(24 * 107 / 60)
  resized = np.asarray(Image.fromarray(photo).resize((width, 24), Image.BICUBIC), np.float32)
  top, left = (24 - SIZE) // 2, (width - SIZE) // 2
  expected = resized[top:top + SIZE, left:left + SIZE] / 127.5 - 1
  np.testing.assert_allclose(ours, expected, atol=4 / 127.5)
  squashed = predict.load_image(str(tmp_path / 'photo.png'), read.image_size)  # The old way.
  assert np.abs(squashed - expected).mean() > 10 * np.abs(ours - expected).mean()

  # Written back: the export describes it; a Hugging Face directory holds the processor file.
  convert.convert(path, str(tmp_path / 'export.npz'), 'npz')
  assert checkpoint.load_model(str(tmp_path / 'export.npz')).resize == read.resize
  convert.convert(path, str(tmp_path / 'hf'), 'hf')
  written = json.loads((tmp_path / 'hf' / 'preprocessor_config.json').read_text())
  assert (written['size'], written['crop_size'], written['resample']) == (
      {'shortest_edge': 24}, {'height': SIZE, 'width': SIZE}, 3)
  again = checkpoint.load_model(str(tmp_path / 'hf'))
  assert (again.resize, again.preprocessing) == (read.resize, read.preprocessing)
