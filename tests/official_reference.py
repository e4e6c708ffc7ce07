"""The official ViT forward pass (google-research/vision_transformer, models_vit.py and
models_resnet.py), written again in plain jax.numpy over official-layout arrays.

It shares no code with vit_jax: the tests and benchmarks/reference_check.py compare the model's
logits with it, so that a formula that drifts from the released checkpoints' (the eps of the
weight standardisation, a GroupNorm's groups, a padding) shows as a difference.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np


def layer_norm(p, x, name, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * p[f'{name}/scale'] + p[f'{name}/bias']


def gelu_tanh(x):  # flax.linen.gelu's default (approximate=True), which the official code uses.
  return 0.5 * x * (1 + jnp.tanh(jnp.sqrt(2 / jnp.pi) * (x + 0.044715 * x ** 3)))


def std_conv(p, x, name, stride=1):
  """BiT's weight-standardised convolution: (w - mean) / (std + 1e-5), 'SAME' padding."""
  w = p[f'{name}/kernel'] - p[f'{name}/kernel'].mean(axis=(0, 1, 2))
  w = w / (w.std(axis=(0, 1, 2)) + 1e-5)
  return jax.lax.conv_general_dilated(x, w, (stride, stride), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def group_norm(p, x, name, groups=32, eps=1e-6):
  g = x.reshape(x.shape[:3] + (groups, -1))
  g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / jnp.sqrt(
      g.var(axis=(1, 2, 4), keepdims=True) + eps)
  # AugReg's hybrids store the GroupNorm parameters as (1, 1, 1, C).
  return g.reshape(x.shape) * p[f'{name}/scale'].reshape(-1) + p[f'{name}/bias'].reshape(-1)


def resnet_stem(p, x):
  """Root (7x7/2 convolution, GroupNorm, ReLU, 3x3/2 max-pool), then the stages `blockS` of
  bottleneck units `unitU`, as many as the arrays hold; the first unit of each stage after the
  first has stride 2."""
  relu = jax.nn.relu
  x = relu(group_norm(p, std_conv(p, x, 'conv_root', stride=2), 'gn_root'))
  x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), 'SAME')
  stages = sorted({int(m.group(1)) for k in p if (m := re.match(r'block(\d+)/', k))})
  for s in stages:
    units = sorted({int(m.group(1)) for k in p if (m := re.match(rf'block{s}/unit(\d+)/', k))})
    for u in units:
      unit = f'block{s}/unit{u}'
      stride = 2 if (s > 1 and u == 1) else 1
      residual = x
      if f'{unit}/conv_proj/kernel' in p:
        residual = group_norm(p, std_conv(p, x, f'{unit}/conv_proj', stride), f'{unit}/gn_proj')
      y = relu(group_norm(p, std_conv(p, x, f'{unit}/conv1'), f'{unit}/gn1'))
      y = relu(group_norm(p, std_conv(p, y, f'{unit}/conv2', stride), f'{unit}/gn2'))
      x = relu(residual + group_norm(p, std_conv(p, y, f'{unit}/conv3'), f'{unit}/gn3'))
  return x


def attention(p, x, name, num_heads):
  width = x.shape[-1]
  q, k, v = (jnp.einsum('bnd,dhk->bnhk', x, p[f'{name}/{n}/kernel']) + p[f'{name}/{n}/bias']
             for n in ('query', 'key', 'value'))
  weights = jax.nn.softmax(jnp.einsum('bqhk,bshk->bhqs', q, k) / jnp.sqrt(width // num_heads))
  y = jnp.einsum('bhqs,bshk->bqhk', weights, v)
  return jnp.einsum('bqhk,hkd->bqd', y, p[f'{name}/out/kernel']) + p[f'{name}/out/bias']


def logits(p, images, *, num_heads: int):
  """The paper's Eq. (1)-(4) over a dict of official-layout arrays ('Transformer/encoderblock_0/
  MlpBlock_3/Dense_0/kernel', ...). A hybrid when the arrays hold `conv_root`; class token when
  they hold `cls`, global average pooling otherwise; a tanh representation layer when they hold
  `pre_logits`."""
  p = {k: jnp.asarray(v) for k, v in p.items()}
  x = resnet_stem(p, images) if 'conv_root/kernel' in p else images
  kernel = p['embedding/kernel']  # (patch_h, patch_w, channels, D)
  (ph, pw, c, width), (b, h, w, _) = kernel.shape, x.shape
  patches = x.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
  x = patches.reshape(b, -1, ph * pw * c) @ kernel.reshape(-1, width) + p['embedding/bias']
  if 'cls' in p:
    x = jnp.concatenate([jnp.broadcast_to(p['cls'], (b, 1, width)), x], axis=1)
  x = x + p['Transformer/posembed_input/pos_embedding']
  layers = sum(1 for k in p if re.fullmatch(r'Transformer/encoderblock_\d+/LayerNorm_0/scale', k))
  for i in range(layers):
    block = f'Transformer/encoderblock_{i}'
    x = x + attention(p, layer_norm(p, x, f'{block}/LayerNorm_0'),
                      f'{block}/MultiHeadDotProductAttention_1', num_heads)
    y = layer_norm(p, x, f'{block}/LayerNorm_2')
    y = gelu_tanh(y @ p[f'{block}/MlpBlock_3/Dense_0/kernel'] + p[f'{block}/MlpBlock_3/Dense_0/bias'])
    x = x + y @ p[f'{block}/MlpBlock_3/Dense_1/kernel'] + p[f'{block}/MlpBlock_3/Dense_1/bias']
  x = layer_norm(p, x, 'Transformer/encoder_norm')
  x = x[:, 0] if 'cls' in p else x.mean(axis=1)
  if 'pre_logits/kernel' in p:
    x = jnp.tanh(x @ p['pre_logits/kernel'] + p['pre_logits/bias'])
  return x @ p['head/kernel'] + p['head/bias']


def compare_registry_model(name: str, path: str, *, num_layers=None, image_size=None,
                           num_classes=7, seed=0, dtype='float32', conv_scale=1e-3):
  """(max |logit difference|, max |logit|) between vit_jax's registry model `name` and the
  reference above, on random images, over random parameters written to `path` as official
  .npz. Token models get a representation layer (as the ImageNet-21k releases); hybrids' kernels
  are scaled by `conv_scale` (small: where the standardisation's eps matters). `num_layers` / `image_size` (default:
  the registry's depth, 224 px) make it cheaper. With dtype='float64' (under
  jax.enable_x64) both sides compute in double precision: what remains is a formula difference,
  not float32 rounding in another summation order."""
  from vit_jax import checkpoint, models
  config = models.get_config(name)
  if num_layers:
    config.transformer.num_layers = num_layers
  if config.classifier == 'token':
    config.representation_size = config.hidden_size
  model = models.VisionTransformer(num_classes=num_classes, dtype=dtype, param_dtype=dtype,
                                   **config)
  size = image_size or (224, 224)
  images = jax.random.normal(jax.random.PRNGKey(seed + 1), (2,) + tuple(size) + (3,), dtype)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                          images[:1])['params']
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    name = path[-1].key
    value = rng.normal(scale=0.02, size=leaf.shape).astype(leaf.dtype)
    if name == 'scale':  # LayerNorm / GroupNorm gains around 1.
      value += 1
    if name == 'kernel' and len(leaf.shape) == 4 and path[0].key != 'embedding':
      value *= conv_scale  # ResNet kernels (hybrids): small, where eps placement matters.
    return value
  params = jax.tree_util.tree_map_with_path(draw, shapes)
  checkpoint.save(params, path)
  with np.load(path) as npz:
    arrays = dict(npz)
  actual = np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
      params, images))
  expected = jax.jit(logits, static_argnames='num_heads')(
      arrays, images, num_heads=config.transformer.num_heads)
  expected = np.asarray(expected)
  return float(np.abs(actual - expected).max()), float(np.abs(expected).max())
