"""The BiT ResNet (Kolesnikov et al. 2020) stem of the hybrid ViT (paper Sec. 3.1, App. D.2).

Weight-standardised convolutions with GroupNorm; a 7x7/2 root convolution and 3x3/2 max-pool,
then stages of bottleneck units. Its feature map, not the image, is cut into "patches" (for
'R50+ViT-B_16': stages (3, 4, 9) reduce 224 px by 16, and patches of 1x1 give 14x14 tokens).
Module names are the official hybrid checkpoints' keys.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any


class StdConv(nn.Conv):
  """A convolution whose kernel is standardised per output channel: (w - mean) / (std + 1e-5).

  The eps is added to the standard deviation, not the variance, as in BiT and the released
  hybrid checkpoints: for small kernels the two differ a lot.
  """

  def param(self, name, *args, **kwargs):
    param = super().param(name, *args, **kwargs)
    if name == 'kernel':
      param = param - jnp.mean(param, axis=(0, 1, 2), keepdims=True)
      param = param / (jnp.std(param, axis=(0, 1, 2), keepdims=True) + 1e-5)
    return param


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1 convolutions, each with GroupNorm."""
  features: int
  strides: Sequence[int] = (1, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = lambda features, kernel, strides, name: StdConv(
        features, kernel, strides, use_bias=False, padding='SAME' if kernel != (1, 1) else 'VALID',
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    norm = lambda name, **kwargs: nn.GroupNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                                               name=name, **kwargs)

    residual = x
    if x.shape[-1] != self.features * 4 or self.strides != (1, 1):
      residual = conv(self.features * 4, (1, 1), self.strides, 'conv_proj')(residual)
      residual = norm('gn_proj')(residual)
    y = nn.relu(norm('gn1')(conv(self.features, (1, 1), (1, 1), 'conv1')(x)))
    y = nn.relu(norm('gn2')(conv(self.features, (3, 3), self.strides, 'conv2')(y)))
    # gn3 starts at zero scale: each unit starts as the identity on its residual (as in BiT).
    y = norm('gn3', scale_init=nn.initializers.zeros)(
        conv(self.features * 4, (1, 1), (1, 1), 'conv3')(y))
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  block_size: int
  features: int
  first_stride: Sequence[int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.block_size):
      x = ResidualUnit(self.features, strides=self.first_stride if i == 0 else (1, 1),
                       dtype=self.dtype, param_dtype=self.param_dtype, name=f'unit{i + 1}')(x)
    return x


def resnet_stem(x, *, num_layers: Sequence[int], width_factor: int = 1,
                dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
  """Root, then one stage per entry of `num_layers` (the first at stride 1, the others at 2).

  A function, not a Module: called inside VisionTransformer, its parameters sit at the top level
  of the tree, where the official hybrid checkpoints have them.
  """
  width = 64 * width_factor
  x = StdConv(width, (7, 7), (2, 2), use_bias=False, padding='SAME', dtype=dtype,
              param_dtype=param_dtype, name='conv_root')(x)
  x = nn.relu(nn.GroupNorm(dtype=dtype, param_dtype=param_dtype, name='gn_root')(x))
  x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
  for i, block_size in enumerate(num_layers):
    x = ResNetStage(block_size, width * 2**i, first_stride=(1, 1) if i == 0 else (2, 2),
                    dtype=dtype, param_dtype=param_dtype, name=f'block{i + 1}')(x)
  return x
