"""The layers the Vision Transformer is built of (models_vit.py puts them together): position
embeddings (learned 1D and 2D, fixed sincos, a relative bias; paper App. D.4), multi-head
self-attention (App. A), the MLP, attention pooling (MAP), LayerScale and stochastic depth.

Module names are the official checkpoints' keys (models_vit.py's docstring).
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.cpu_tuning import over_tokens

Dtype = Any
LAYER_NORM_EPSILON = 1e-6  # As in the official checkpoints; Flax's default is 1e-5.


def _check_shape(module: nn.Module, name: str, shape):
  """Flax's own error on a shape mismatch does not say what to do about it."""
  if module.has_variable('params', name):
    existing = tuple(module.get_variable('params', name).shape)
    if existing != tuple(shape):
      raise ValueError(
          f'{name} has shape {existing}, but this input needs {tuple(shape)}: to run at another '
          'resolution, resample the position embeddings with checkpoint.load_pretrained().')


class AddPositionEmbs(nn.Module):
  """Adds learned 1D position embeddings E_pos of shape (1, tokens, D), Eq. (1)."""
  posemb_init: Callable = nn.initializers.normal(stddev=0.02)
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = (1,) + x.shape[1:]
    _check_shape(self, 'pos_embedding', shape)
    pos_embedding = self.param('pos_embedding', self.posemb_init, shape, self.param_dtype)
    return x + pos_embedding.astype(x.dtype)


class AddPositionEmbs2D(nn.Module):
  """Adds [row embedding; column embedding] (each D/2) to each patch; prefix tokens get none."""
  grid: Sequence[int]
  num_prefix_tokens: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    shapes = {'row_embedding': (self.grid[0], width // 2),
              'column_embedding': (self.grid[1], width - width // 2)}
    for name, shape in shapes.items():
      _check_shape(self, name, shape)
    init = nn.initializers.normal(stddev=0.02)
    rows = self.param('row_embedding', init, shapes['row_embedding'], self.param_dtype)
    columns = self.param('column_embedding', init, shapes['column_embedding'], self.param_dtype)
    grid_h, grid_w = self.grid
    table = jnp.concatenate([jnp.broadcast_to(rows[:, None], (grid_h, grid_w, rows.shape[-1])),
                             jnp.broadcast_to(columns[None], (grid_h, grid_w, columns.shape[-1]))],
                            axis=-1).reshape(grid_h * grid_w, width)
    table = jnp.pad(table, ((self.num_prefix_tokens, 0), (0, 0)))
    return x + table[None].astype(x.dtype)


def sincos2d(grid, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2D sine-cosine embeddings (grid_h * grid_w, width): a quarter of the channels each for
  sin and cos of the row and of the column, at geometrically spaced frequencies."""
  if width % 4:
    raise ValueError(f'sincos2d position embeddings need a width divisible by 4, not {width}.')
  rows, columns = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing='ij')
  omega = 1.0 / temperature**(np.arange(width // 4) / (width // 4))
  rows = rows.reshape(-1, 1) * omega
  columns = columns.reshape(-1, 1) * omega
  return np.concatenate([np.sin(rows), np.cos(rows), np.sin(columns), np.cos(columns)], axis=1)


class RelativePositionBias(nn.Module):
  """A learned bias per head for each relative offset (dy, dx) between two patches, shaped
  (heads, tokens, tokens) to add to the attention logits; prefix tokens get no bias."""
  grid: Sequence[int]
  num_heads: int
  num_prefix_tokens: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    grid_h, grid_w = self.grid
    shape = (2 * grid_h - 1, 2 * grid_w - 1, self.num_heads)
    _check_shape(self, 'relative_position_bias', shape)
    table = self.param('relative_position_bias', nn.initializers.zeros, shape, self.param_dtype)
    rows, columns = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing='ij')
    rows, columns = rows.ravel(), columns.ravel()
    dy = rows[:, None] - rows[None] + grid_h - 1
    dx = columns[:, None] - columns[None] + grid_w - 1
    bias = jnp.moveaxis(table[dy, dx], -1, 0)  # (heads, patches, patches)
    prefix = self.num_prefix_tokens
    return jnp.pad(bias, ((0, 0), (prefix, 0), (prefix, 0)))


class MultiHeadDotProductAttention(nn.Module):
  """softmax(q k^T / sqrt(d_head) + bias) v over `num_heads` heads (paper App. A, Eq. 5-8).

  The attention probabilities are sown as intermediates/attention_weights, which the analysis
  tools read (attention rollout, mean attention distance).
  """
  num_heads: int
  attention_dropout_rate: float = 0.0
  implementation: str = 'einsum'  # or 'dot_product': see models_vit.ATTENTIONS.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool, bias=None, inputs_kv=None):
    """Self-attention over x, or x's queries attending to `inputs_kv` (attention pooling)."""
    inputs_kv = x if inputs_kv is None else inputs_kv
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'hidden_size {width} is not divisible by num_heads {self.num_heads}.')
    head_dim = width // self.num_heads
    projection = functools.partial(
        nn.DenseGeneral, features=(self.num_heads, head_dim), dtype=self.dtype,
        param_dtype=self.param_dtype, kernel_init=nn.initializers.xavier_uniform())
    query = over_tokens(projection(name='query'), x) / jnp.sqrt(head_dim).astype(self.dtype)
    key = over_tokens(projection(name='key'), inputs_kv)
    value = over_tokens(projection(name='value'), inputs_kv)

    if self.implementation == 'dot_product':
      # The same softmax(q k^T + bias) v as one call that XLA or cuDNN may fuse (flash attention):
      # the (heads, tokens, tokens) probabilities are then never stored, nor sown.
      heads = jax.nn.dot_product_attention(
          query, key, value, bias=None if bias is None else bias[None].astype(query.dtype),
          scale=1.0)
    else:
      logits = jnp.einsum('bqhd,bkhd->bhqk', query, key)
      if bias is not None:
        logits = logits + bias.astype(logits.dtype)
      # The softmax runs in float32 (at least) even for bfloat16 activations: its sum is not
      # robust to rounding.
      precise = jnp.promote_types(logits.dtype, jnp.float32)
      weights = jax.nn.softmax(logits.astype(precise), axis=-1).astype(self.dtype)
      self.sow('intermediates', 'attention_weights', weights)
      weights = nn.Dropout(self.attention_dropout_rate)(weights, deterministic=deterministic)
      heads = jnp.einsum('bhqk,bkhd->bqhd', weights, value)

    return over_tokens(nn.DenseGeneral(
        features=width, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), name='out'), heads)


class MlpBlock(nn.Module):
  """Dense(D->M) -> GELU -> dropout -> Dense(M->D) -> dropout.

  With `swiglu` (DINOv2-giant) the first Dense is twice as wide, (D->2M), and its halves gate
  each other: SiLU(first half) * second half, the gated linear unit of Shazeer (2020).
  """
  mlp_dim: int
  dropout_rate: float = 0.0
  gelu_approximate: bool = True
  quick_gelu: bool = False  # CLIP's x * sigmoid(1.702 x) instead.
  swiglu: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    dense = functools.partial(
        nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6))
    width = x.shape[-1]
    x = dense(2 * self.mlp_dim if self.swiglu else self.mlp_dim, name='Dense_0')(x)
    if self.swiglu:
      gate, x = jnp.split(x, 2, axis=-1)
      x = nn.silu(gate) * x
    elif self.quick_gelu:
      x = x * jax.nn.sigmoid(1.702 * x)
    else:
      x = nn.gelu(x, approximate=self.gelu_approximate)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = dense(width, name='Dense_1')(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class MAPHead(nn.Module):
  """Multi-head attention pooling (big_vision's `MAPHead`): a learned probe token attends to
  every token, then an MLP with a pre-LayerNorm residual; (batch, tokens, D) -> (batch, D)."""
  num_heads: int
  mlp_dim: int
  gelu_approximate: bool = True
  layer_norm_epsilon: float = LAYER_NORM_EPSILON
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, _, width = x.shape
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, width), self.param_dtype)
    probe = jnp.broadcast_to(probe.astype(x.dtype), (batch, 1, width))
    x = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
        name='MultiHeadDotProductAttention_0')(probe, deterministic=True, inputs_kv=x)
    y = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                     param_dtype=self.param_dtype, name='LayerNorm_0')(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim, gelu_approximate=self.gelu_approximate,
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     name='MlpBlock_0')(y, deterministic=True)
    return x[:, 0]


class LayerScale(nn.Module):
  """A learned per-channel scale of a residual branch (CaiT, DINOv2), initialised to `init`."""
  init: float
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.constant(self.init), (x.shape[-1],),
                       self.param_dtype)
    return x * scale.astype(x.dtype)


class DropPath(nn.Module):
  """Stochastic depth: drops a residual branch for whole examples (rescaling the kept ones).

  The rate grows linearly with depth, from 0 for the first block to `rate` for the last; `layer`
  may be traced (a scanned encoder's layer index).
  """
  rate: float
  num_layers: int

  @nn.compact
  def __call__(self, x, layer, *, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate * layer / max(self.num_layers - 1, 1)
    kept = jax.random.bernoulli(self.make_rng('dropout'), keep, (x.shape[0], 1, 1))
    return jnp.where(kept, x / keep, 0).astype(x.dtype)
