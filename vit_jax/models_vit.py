"""Vision Transformer (Dosovitskiy et al. 2020, arXiv:2010.11929, Sec. 3.1), Flax linen.

The forward pass follows the paper's equations:

  z_0  = [x_class; x_p^1 E; ...; x_p^N E] + E_pos      (1)  VisionTransformer.embedding, cls, posembed_input
  z'_l = MSA(LN(z_{l-1})) + z_{l-1}                    (2)  Encoder1DBlock, first half
  z_l  = MLP(LN(z'_l)) + z'_l                          (3)  Encoder1DBlock, second half
  y    = LN(z_L^0)                                     (4)  encoder_norm, then pooling and head

Module names are the keys of the official checkpoints (see checkpoint.py), which is why some of
them carry the numeric suffixes that old Flax versions generated (`LayerNorm_2`, `MlpBlock_3`).
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
LAYER_NORM_EPSILON = 1e-6  # As in the official checkpoints; Flax's default is 1e-5.


class AddPositionEmbs(nn.Module):
  """Adds learned 1D position embeddings E_pos of shape (1, tokens, D), Eq. (1)."""
  posemb_init: Callable = nn.initializers.normal(stddev=0.02)
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = (1,) + x.shape[1:]
    if self.has_variable('params', 'pos_embedding'):
      existing = self.get_variable('params', 'pos_embedding').shape
      if tuple(existing) != shape:
        raise ValueError(
            f'The position embeddings hold {existing[1]} tokens of width {existing[2]}, but the '
            f'input has {shape[1]} of width {shape[2]}: to run at another resolution, resample '
            'them with checkpoint.load_pretrained().')
    pos_embedding = self.param('pos_embedding', self.posemb_init, shape, self.param_dtype)
    return x + pos_embedding.astype(x.dtype)


class MultiHeadDotProductAttention(nn.Module):
  """softmax(q k^T / sqrt(d_head)) v over `num_heads` heads (paper App. A, Eq. 5-8).

  The attention probabilities are sown as intermediates/attention_weights, which the analysis
  tools read (attention rollout, mean attention distance).
  """
  num_heads: int
  attention_dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'hidden_size {width} is not divisible by num_heads {self.num_heads}.')
    head_dim = width // self.num_heads
    projection = functools.partial(
        nn.DenseGeneral, features=(self.num_heads, head_dim), dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=nn.initializers.xavier_uniform())
    query = projection(name='query')(x) / jnp.sqrt(head_dim).astype(self.dtype)
    key = projection(name='key')(x)
    value = projection(name='value')(x)

    logits = jnp.einsum('bqhd,bkhd->bhqk', query, key)
    # The softmax runs in float32 even for bfloat16 activations: its sum is not robust to rounding.
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    self.sow('intermediates', 'attention_weights', weights)
    weights = nn.Dropout(self.attention_dropout_rate)(weights, deterministic=deterministic)
    heads = jnp.einsum('bhqk,bkhd->bqhd', weights, value)

    return nn.DenseGeneral(
        features=width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), name='out')(heads)


class MlpBlock(nn.Module):
  """Dense(D->M) -> GELU -> dropout -> Dense(M->D) -> dropout."""
  mlp_dim: int
  dropout_rate: float = 0.0
  gelu_approximate: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    dense = functools.partial(
        nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6))
    width = x.shape[-1]
    x = dense(self.mlp_dim, name='Dense_0')(x)
    x = nn.gelu(x, approximate=self.gelu_approximate)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = dense(width, name='Dense_1')(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
  """One pre-LayerNorm Transformer layer, Eq. (2) and (3)."""
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  gelu_approximate: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    layer_norm = functools.partial(nn.LayerNorm, epsilon=LAYER_NORM_EPSILON, dtype=self.dtype,
                                   param_dtype=self.param_dtype)
    y = layer_norm(name='LayerNorm_0')(x)
    y = MultiHeadDotProductAttention(
        num_heads=self.num_heads, attention_dropout_rate=self.attention_dropout_rate,
        dtype=self.dtype, param_dtype=self.param_dtype,
        name='MultiHeadDotProductAttention_1')(y, deterministic=deterministic)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    x = x + y

    y = layer_norm(name='LayerNorm_2')(x)
    y = MlpBlock(
        mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
        gelu_approximate=self.gelu_approximate, dtype=self.dtype, param_dtype=self.param_dtype,
        name='MlpBlock_3')(y, deterministic=deterministic)
    return x + y


class Encoder(nn.Module):
  """Position embeddings, `num_layers` blocks and the final LayerNorm (named 'Transformer')."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  gelu_approximate: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = AddPositionEmbs(param_dtype=self.param_dtype, name='posembed_input')(x)
    # Dropout right after adding the position embeddings (paper App. B.1).
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    for i in range(self.num_layers):
      x = Encoder1DBlock(
          mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate,
          gelu_approximate=self.gelu_approximate, dtype=self.dtype, param_dtype=self.param_dtype,
          name=f'encoderblock_{i}')(x, deterministic=not train)
    return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype,
                        param_dtype=self.param_dtype, name='encoder_norm')(x)


CLASSIFIERS = ('token', 'gap', 'unpooled')


class VisionTransformer(nn.Module):
  """ViT for images (batch, height, width, channels); height and width divisible by the patch.

  Returns logits (batch, num_classes); with `num_classes=None` the (pre-logits) representation;
  with `classifier='unpooled'` one output per patch token (batch, tokens, ...).
  """
  num_classes: Optional[int]
  patches: Any  # .size = (patch height, patch width)
  hidden_size: int
  transformer: Any  # keyword arguments of Encoder
  classifier: str = 'token'
  representation_size: Optional[int] = None
  head_bias_init: float = 0.0
  model_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'classifier={self.classifier!r}; expected one of {CLASSIFIERS}.')
    patch_h, patch_w = self.patches.size
    _, height, width, _ = images.shape
    if height % patch_h or width % patch_w:
      raise ValueError(f'Image size {height}x{width} is not divisible by the patch size '
                       f'{patch_h}x{patch_w}.')

    # Linear projection E of flattened patches == a convolution with kernel = stride = patch.
    x = nn.Conv(self.hidden_size, (patch_h, patch_w), strides=(patch_h, patch_w),
                padding='VALID', dtype=self.dtype, param_dtype=self.param_dtype,
                name='embedding')(images.astype(self.dtype))
    batch, grid_h, grid_w, _ = x.shape
    x = x.reshape(batch, grid_h * grid_w, self.hidden_size)

    if self.classifier == 'token':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, self.hidden_size), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (batch, 1, self.hidden_size)), x],
                          axis=1)

    x = Encoder(name='Transformer', dtype=self.dtype, param_dtype=self.param_dtype,
                **self.transformer)(x, train=train)

    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(x, axis=1)

    if self.representation_size is not None:
      x = nn.Dense(self.representation_size, dtype=self.dtype, param_dtype=self.param_dtype,
                   name='pre_logits')(x)
      x = jnp.tanh(x)

    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.constant(self.head_bias_init), name='head')(x)
    return x
