"""ViT as a dense backbone: decoders on the patch-token grid for segmentation and detection.

`DenseVisionTransformer` is the VisionTransformer (same parameter names, so any checkpoint
`load_pretrained` reads is its backbone) whose pooling and head are replaced by `decoder`
(config.model.decoder), a module named 'decoder':

  linear            Segmenter's linear decoder (Strudel et al. 2021): class logits per patch.
  mask_transformer  Segmenter's mask transformer: K learned class embeddings processed jointly
                    with the patch tokens; the logits are the products of the L2-normalised
                    patch and class embeddings.
  detection         ViTDet's simple feature pyramid (Li et al. 2022: from the last grid alone,
                    deconvolutions up and pooling down to strides 4-32, no lateral path) and one
                    anchor-free head shared by the levels: a CenterNet heat map per class and the
                    box's distances to the four sides (FCOS), and, with `instance_masks`, the
                    CondInst controller (Tian et al. 2020) whose dynamic 1x1 convolutions read
                    the stride-4 mask features.

Segmentation outputs logits at patch resolution (batch, H/P, W/P, K), upsampled by the
objective; detection outputs a dict of per-location outputs of every level, flattened
(`detection.py` reads it).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models_vit

DECODERS = ('linear', 'mask_transformer', 'detection')
MASK_CHANNELS = 8  # CondInst: the mask branch's width and the dynamic head's hidden width.
MASK_STRIDE = 4  # Instance masks are predicted at 1/4 of the image size.


def dynamic_mask_head_size(channels: int = MASK_CHANNELS) -> int:
  """Parameters of one instance's dynamic mask head: three 1x1 convolutions, (channels + 2
  relative coordinates) -> channels -> channels -> 1, with biases."""
  return (channels + 2) * channels + channels + channels * channels + channels + channels + 1


class LinearDecoder(nn.Module):
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, grid, *, train: bool):
    del train
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(grid)


class MaskTransformer(nn.Module):
  """Segmenter's mask transformer: `num_layers` Transformer layers over [patches; classes]."""
  num_classes: int
  num_layers: int = 2
  hidden_size: int = 0  # 0: the backbone's width.
  num_heads: int = 0    # 0: the backbone's heads.
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, grid, *, train: bool, backbone_heads: int = 1):
    batch, height, width, channels = grid.shape
    width_d = self.hidden_size or channels
    x = nn.Dense(width_d, dtype=self.dtype, name='proj_dec')(
        grid.reshape(batch, height * width, channels))
    classes = self.param('cls_emb', nn.initializers.normal(0.02), (1, self.num_classes, width_d))
    x = jnp.concatenate([x, jnp.broadcast_to(classes.astype(x.dtype),
                                             (batch,) + classes.shape[1:])], axis=1)
    for i in range(self.num_layers):
      x = models_vit.Encoder1DBlock(
          mlp_dim=4 * width_d, num_heads=self.num_heads or backbone_heads,
          num_layers=self.num_layers, dropout_rate=self.dropout_rate, dtype=self.dtype,
          name=f'encoderblock_{i}')(x, i, deterministic=not train)
    x = nn.LayerNorm(epsilon=models_vit.LAYER_NORM_EPSILON, dtype=self.dtype,
                     name='decoder_norm')(x)
    patches, class_features = x[:, :height * width], x[:, height * width:]
    patches = nn.Dense(width_d, use_bias=False, dtype=self.dtype, name='proj_patch')(patches)
    class_features = nn.Dense(width_d, use_bias=False, dtype=self.dtype,
                              name='proj_classes')(class_features)
    normalise = lambda v: v / jnp.linalg.norm(v.astype(jnp.float32), axis=-1,
                                              keepdims=True).astype(v.dtype)
    masks = jnp.einsum('bnd,bkd->bnk', normalise(patches), normalise(class_features))
    masks = nn.LayerNorm(epsilon=models_vit.LAYER_NORM_EPSILON, dtype=self.dtype,
                         name='mask_norm')(masks)
    return masks.reshape(batch, height, width, self.num_classes)


def level_scales(patch: int, strides: Sequence[int]) -> list:
  """Each pyramid level's resampling of the patch grid: its stride must be the patch size times
  a power of two (4 and 8 from 16: up by 4 and 2; 32: down by 2)."""
  scales = []
  for stride in strides:
    ratio = patch / stride
    if ratio <= 0 or abs(np.log2(ratio) - round(np.log2(ratio))) > 1e-9:
      raise ValueError(f'Pyramid stride {stride} is not the patch size {patch} times a power '
                       f'of two.')
    scales.append(int(round(np.log2(ratio))))
  return scales


class SimpleFeaturePyramid(nn.Module):
  """ViTDet's pyramid: level s of the grid up-sampled by 2^s (2x2 deconvolutions with LayerNorm
  and GELU between) or pooled down by 2^-s, then a 1x1 and a 3x3 convolution, each followed by
  a LayerNorm, to `width` channels."""
  strides: Sequence[int]
  patch: int
  width: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, grid):
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)
    levels = []
    for stride, scale in zip(self.strides, level_scales(self.patch, self.strides)):
      x, channels = grid, grid.shape[-1]
      for step in range(max(scale, 0)):
        channels = max(channels // 2, self.width // 2)
        if step:
          x = nn.gelu(norm(f'p{stride}_up_norm{step}')(x))
        x = nn.ConvTranspose(channels, (2, 2), strides=(2, 2), dtype=self.dtype,
                             name=f'p{stride}_up{step}')(x)
      for _ in range(max(-scale, 0)):
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = norm(f'p{stride}_norm0')(nn.Conv(self.width, (1, 1), use_bias=False, dtype=self.dtype,
                                           name=f'p{stride}_conv0')(x))
      x = norm(f'p{stride}_norm1')(nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype,
                                           name=f'p{stride}_conv1')(x))
      levels.append(x)
    return levels


class DetectionHead(nn.Module):
  """The pyramid and the head shared by its levels: a tower of 3x3 convolutions (GroupNorm,
  ReLU) for classification and one for boxes; outputs flattened over levels and locations."""
  num_classes: int
  strides: Sequence[int] = (4, 8, 16, 32)
  patch: int = 16
  width: int = 256
  tower_depth: int = 2
  instance_masks: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, grid, *, train: bool):
    del train
    levels = SimpleFeaturePyramid(self.strides, self.patch, self.width, self.dtype,
                                  name='pyramid')(grid)

    def tower(name):
      layers = []
      for i in range(self.tower_depth):
        # No bias: the GroupNorm after it removes any (its gradient would be zero).
        layers += [nn.Conv(self.width, (3, 3), use_bias=False, dtype=self.dtype,
                           name=f'{name}_conv{i}'),
                   nn.GroupNorm(num_groups=min(32, self.width), dtype=self.dtype,
                                name=f'{name}_gn{i}'), nn.relu]
      return nn.Sequential(layers)

    # Focal-loss prior (Lin et al. 2017): every location starts at probability 0.01.
    prior = -np.log((1 - 0.01) / 0.01)
    cls_tower, box_tower = tower('cls_tower'), tower('box_tower')
    heatmap = nn.Conv(self.num_classes, (3, 3), dtype=self.dtype,
                      bias_init=nn.initializers.constant(prior), name='heatmap')
    box = nn.Conv(4, (3, 3), dtype=self.dtype, name='box')
    controller = nn.Conv(dynamic_mask_head_size(), (3, 3), dtype=self.dtype,
                         kernel_init=nn.initializers.normal(0.01), name='controller')
    flat = lambda x: x.reshape(x.shape[0], -1, x.shape[-1])
    outputs = {'heatmap': [], 'box': [], 'controller': []}
    for x in levels:
      c, b = cls_tower(x), box_tower(x)
      outputs['heatmap'].append(flat(heatmap(c)))
      outputs['box'].append(flat(box(b)))  # log(distance / stride) to top, left, bottom, right.
      if self.instance_masks:
        outputs['controller'].append(flat(controller(b)))
    outputs = {k: jnp.concatenate(v, axis=1) for k, v in outputs.items() if v}
    if self.instance_masks:
      # The mask branch: the finest level, brought to stride MASK_STRIDE.
      x = levels[0]
      up = int(round(np.log2(self.strides[0] / MASK_STRIDE)))
      for i in range(up):
        x = nn.ConvTranspose(self.width, (2, 2), strides=(2, 2), dtype=self.dtype,
                             name=f'mask_up{i}')(x)
      for i in range(2):
        x = nn.relu(nn.Conv(self.width // 2, (3, 3), dtype=self.dtype, name=f'mask_conv{i}')(x))
      outputs['mask_features'] = nn.Conv(MASK_CHANNELS, (1, 1), dtype=self.dtype,
                                         name='mask_features')(x)
    return outputs


class DenseVisionTransformer(models_vit.VisionTransformer):
  """The ViT encoder and a dense decoder (its `num_classes`: segmentation or detection classes).
  `decoder`: {'type': one of DECODERS, and that decoder's fields}."""
  decoder: Any = None

  @nn.compact
  def __call__(self, inputs, *, train: bool, patch_corruption=None):
    del patch_corruption
    _, grid = self.encode(inputs, train=train)
    kind = self.decoder['type']
    # The options of this decoder type: a recipe's options of another type (the mask
    # transformer's depth when --config.model.decoder.type=linear) are not its own.
    known = {'linear': LinearDecoder, 'mask_transformer': MaskTransformer,
             'detection': DetectionHead}.get(kind)
    options = {k: v for k, v in dict(self.decoder).items()
               if known and k in known.__dataclass_fields__ and k not in ('type', 'name')}
    if kind == 'linear':
      return LinearDecoder(self.num_classes, dtype=self.dtype, name='decoder',
                           **options)(grid, train=train)
    if kind == 'mask_transformer':
      return MaskTransformer(self.num_classes, dtype=self.dtype, name='decoder', **options)(
          grid, train=train, backbone_heads=self.transformer['num_heads'])
    if kind == 'detection':
      stride = self.patches.size[0] * (16 if self.resnet is not None else 1)
      return DetectionHead(self.num_classes, patch=stride, dtype=self.dtype, name='decoder',
                           **options)(grid, train=train)
    raise ValueError(f'model.decoder.type={kind!r}; expected one of {DECODERS}.')


def dynamic_mask_logits(controller, mask_features, centres, mask_stride: int = MASK_STRIDE):
  """CondInst's dynamic mask head: per instance, its controller's parameters (batch, N, P) as
  three 1x1 convolutions over the mask features (batch, h, w, C) concatenated with the pixels'
  offsets from the instance's centre (batch, N, 2; in pixels, divided by 64 pixels) -> mask
  logits (batch, N, h, w)."""
  batch, h, w, channels = mask_features.shape
  yy, xx = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing='ij')
  pixels = (jnp.stack([yy, xx], -1) * mask_stride + mask_stride / 2).astype(jnp.float32)
  relative = (pixels[None, None] - centres[:, :, None, None, :]) / 64.0  # (B, N, h, w, 2)
  sizes = [(channels + 2, channels), (channels, channels), (channels, 1)]
  layers, offset = [], 0
  for fan_in, fan_out in sizes:
    kernel = controller[..., offset:offset + fan_in * fan_out].reshape(
        controller.shape[:2] + (fan_in, fan_out)).astype(jnp.float32)
    offset += fan_in * fan_out
    layers.append((kernel, controller[..., offset:offset + fan_out].astype(jnp.float32)))
    offset += fan_out
  # The first layer reads the shared features once (not a copy per instance) and the offsets.
  kernel, bias = layers[0]
  x = (jnp.einsum('bhwc,bnco->bnhwo', mask_features.astype(jnp.float32), kernel[:, :, :channels])
       + jnp.einsum('bnhwr,bnro->bnhwo', relative, kernel[:, :, channels:])
       + bias[:, :, None, None])
  for kernel, bias in layers[1:]:
    x = jnp.einsum('bnhwi,bnio->bnhwo', jax.nn.relu(x), kernel) + bias[:, :, None, None]
  return x[..., 0]
