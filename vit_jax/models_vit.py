"""Vision Transformer (Dosovitskiy et al. 2020, arXiv:2010.11929, Sec. 3.1), Flax linen.

The forward pass follows the paper's equations:

  z_0  = [x_class; x_p^1 E; ...; x_p^N E] + E_pos      (1)  VisionTransformer.embedding, cls, posembed_input
  z'_l = MSA(LN(z_{l-1})) + z_{l-1}                    (2)  Encoder1DBlock, first half
  z_l  = MLP(LN(z'_l)) + z'_l                          (3)  Encoder1DBlock, second half
  y    = LN(z_L^0)                                     (4)  encoder_norm, then pooling and head

Module names are the keys of the official checkpoints (see checkpoint.py), which is why some of
them carry the numeric suffixes that old Flax versions generated (`LayerNorm_2`, `MlpBlock_3`).

Position embeddings (paper App. D.4), `transformer.posemb`: 'learn' (1D, the default), 'learn_2d'
(row and column tables of D/2, concatenated), 'sincos2d' (fixed), 'relative' (a learned bias per
relative 2D offset and head, added to the attention logits) or 'none'.

Pooling, `classifier`: 'token' (the class token), 'gap' (mean of the tokens), 'map' (multi-head
attention pooling, as big_vision's ViTs: a learned probe attends to all tokens), 'token_and_gap'
(the class token beside the mean patch token, as DINOv2's linear classifiers read them) or
'unpooled'.
"""

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models_resnet

Dtype = Any
LAYER_NORM_EPSILON = 1e-6  # As in the official checkpoints; Flax's default is 1e-5.
POSEMBS = ('learn', 'learn_2d', 'sincos2d', 'relative', 'none')
CLASSIFIERS = ('token', 'gap', 'map', 'token_and_gap', 'unpooled')


def batch_sharded(x):
  """x, split along its batch over every device when traced under a mesh (train.py's steps):
  XLA then gathers an FSDP-sharded weight where it is used instead of gathering the batch."""
  mesh = jax.sharding.get_abstract_mesh()
  # Only the mesh's automatic axes: under jax.pmap or shard_map the batch axis is manual, and
  # each device already holds its own examples.
  axes = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
               if kind == jax.sharding.AxisType.Auto) if not mesh.empty else ()
  if not axes:
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def over_tokens(layer, x):
  """layer(x) for x (batch, tokens, ...); on CPU applied to x as one (batch x tokens, ...) matrix.

  The products are the same, but XLA's CPU backend computes a weight's gradient (a contraction
  over batch and tokens together) by first copying both operands into transposed layouts unless
  batch and tokens are one axis: flattened, a ViT-Ti/16 block's forward + backward took 247
  instead of 297 ms on a 2-core Xeon, its MLP half the time (benchmarks/cpu_speed.md).
  Elsewhere the layer sees x as it is: on TPU, merging the axes can cost a copy between tiled
  layouts, and nothing was measured there.
  """
  if not _compiling_for_cpu():
    return layer(x)
  y = layer(x.reshape((-1,) + x.shape[2:]))
  return y.reshape(x.shape[:2] + y.shape[1:])


def _compiling_for_cpu() -> bool:
  # Asking for the backend starts JAX's runtime, which a command line must not do before it
  # joins the other hosts; until then only shapes are evaluated, the same either way.
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  started = getattr(xla_bridge, 'backends_are_initialized', lambda: True)()
  return started and jax.default_backend() == 'cpu'


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
  implementation: str = 'einsum'  # or 'dot_product': see ATTENTIONS.
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


class Encoder1DBlock(nn.Module):
  """One pre-LayerNorm Transformer layer, Eq. (2) and (3); layer number `layer` of the encoder.

  With posemb='relative' the layer holds its own relative position table (`relative_grid` is
  then the patch grid). The block's output is sown as intermediates/output.
  """
  mlp_dim: int
  num_heads: int
  num_layers: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  gelu_approximate: bool = True
  attention: str = 'einsum'
  relative_grid: Optional[Sequence[int]] = None
  num_prefix_tokens: int = 0
  layer_norm_epsilon: float = LAYER_NORM_EPSILON
  layer_scale: Optional[float] = None
  quick_gelu: bool = False
  swiglu: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, layer, deterministic: bool):
    x = batch_sharded(x)
    layer_norm = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_epsilon,
                                   dtype=self.dtype, param_dtype=self.param_dtype)
    scaled = lambda y, name: y if self.layer_scale is None else LayerScale(
        self.layer_scale, param_dtype=self.param_dtype, name=name)(y)
    drop_path = DropPath(self.stochastic_depth, self.num_layers)
    bias = None
    if self.relative_grid is not None:
      bias = RelativePositionBias(self.relative_grid, self.num_heads, self.num_prefix_tokens,
                                  param_dtype=self.param_dtype, name='relative_position')()
    y = layer_norm(name='LayerNorm_0')(x)
    y = MultiHeadDotProductAttention(
        num_heads=self.num_heads, attention_dropout_rate=self.attention_dropout_rate,
        implementation=self.attention, dtype=self.dtype, param_dtype=self.param_dtype,
        name='MultiHeadDotProductAttention_1')(y, deterministic=deterministic, bias=bias)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    x = x + drop_path(scaled(y, 'layer_scale_attention'), layer, deterministic=deterministic)

    y = layer_norm(name='LayerNorm_2')(x)
    mlp = MlpBlock(
        mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
        gelu_approximate=self.gelu_approximate, quick_gelu=self.quick_gelu, swiglu=self.swiglu,
        dtype=self.dtype, param_dtype=self.param_dtype, name='MlpBlock_3')
    y = over_tokens(functools.partial(mlp, deterministic=deterministic), y)
    x = x + drop_path(scaled(y, 'layer_scale_mlp'), layer, deterministic=deterministic)
    self.sow('intermediates', 'output', x)
    return x


class ScannedEncoder1DBlock(Encoder1DBlock):
  """Encoder1DBlock as the body of nn.scan: (carry, layer) -> (carry, nothing stacked)."""

  def __call__(self, x, layer, deterministic: bool):
    return super().__call__(x, layer, deterministic), None


# model.transformer.remat: what the backward pass keeps of a block (the rest is recomputed).
REMAT_POLICIES = {
    'none': None,  # Everything: no recomputation.
    'full': jax.checkpoint_policies.nothing_saveable,  # Only the block's input.
    'dots': jax.checkpoint_policies.dots_saveable,  # Matmul outputs; elementwise recomputed.
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # Weight matmuls.
}
# model.transformer.attention: 'einsum' (explicit probabilities: analysis needs them) or
# 'dot_product' (jax.nn.dot_product_attention: fused kernels where the platform has them).
ATTENTIONS = ('einsum', 'dot_product')
SCANNED_BLOCK = 'encoderblock'  # The name of a scanned encoder's one block.


class Encoder(nn.Module):
  """Position embeddings, `num_layers` blocks and the final LayerNorm (named 'Transformer').

  The blocks are Python-unrolled (`encoderblock_{i}`, the official layout) or, with `scan`, one
  `encoderblock` run by nn.scan, whose parameters have a leading layer axis: compilation time
  and buffer liveness then no longer grow with depth. checkpoint.py converts between the two.
  """
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0  # Drop-path rate of the last block; it grows linearly from 0.
  posemb: str = 'learn'
  gelu_approximate: bool = True
  remat: str = 'none'  # A key of REMAT_POLICIES.
  scan: bool = False
  attention: str = 'einsum'  # One of ATTENTIONS.
  # Options of other ViT families (Hugging Face, timm, DINOv2); the defaults are the paper's.
  layer_norm_epsilon: float = LAYER_NORM_EPSILON  # Hugging Face's ViT and DeiT: 1e-12.
  layer_scale: Optional[float] = None  # LayerScale's initial value (DINOv2: 1e-5 or 1.0).
  pre_norm: bool = False  # CLIP: a LayerNorm of the tokens before the first block.
  quick_gelu: bool = False  # CLIP's MLP activation, x * sigmoid(1.702 x).
  swiglu: bool = False  # DINOv2-giant's gated MLP (see MlpBlock).
  final_norm: bool = True  # False where the model normalises after pooling (timm's fc_norm).
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool, grid: Sequence[int], num_prefix_tokens: int,
               registers=None):
    """`registers` (1, R, D): tokens inserted after the `num_prefix_tokens` (class and
    distillation tokens) once the position embeddings are added: they have no position."""
    for name, value, allowed in [('posemb', self.posemb, POSEMBS),
                                 ('remat', self.remat, tuple(REMAT_POLICIES)),
                                 ('attention', self.attention, ATTENTIONS)]:
      if value not in allowed:
        raise ValueError(f'transformer.{name}={value!r}; expected one of {allowed}.')
    if self.posemb == 'learn':
      x = AddPositionEmbs(param_dtype=self.param_dtype, name='posembed_input')(x)
    elif self.posemb == 'learn_2d':
      x = AddPositionEmbs2D(grid, num_prefix_tokens, param_dtype=self.param_dtype,
                            name='posembed_input')(x)
    elif self.posemb == 'sincos2d':
      table = np.pad(sincos2d(grid, x.shape[-1]), ((num_prefix_tokens, 0), (0, 0)))
      x = x + jnp.asarray(table, x.dtype)[None]
    # Dropout right after adding the position embeddings (paper App. B.1).
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    if self.pre_norm:
      x = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                       param_dtype=self.param_dtype, name='pre_norm')(x)
    if registers is not None:
      x = jnp.concatenate([x[:, :num_prefix_tokens], jnp.broadcast_to(
          registers.astype(x.dtype), (x.shape[0],) + registers.shape[1:]),
                           x[:, num_prefix_tokens:]], axis=1)
      num_prefix_tokens += registers.shape[1]

    block = ScannedEncoder1DBlock if self.scan else Encoder1DBlock
    if self.remat != 'none':
      # Rematerialisation keeps what the policy saves of each block for the backward pass and
      # recomputes the rest; the parameters are the same. (Under scan, XLA cannot merge the
      # recomputation with the forward pass anyway, so CSE prevention is not needed.)
      block = nn.remat(block, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan,
                       static_argnums=(3,))
    block_args = dict(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads, num_layers=self.num_layers,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        stochastic_depth=self.stochastic_depth, gelu_approximate=self.gelu_approximate,
        attention=self.attention, num_prefix_tokens=num_prefix_tokens,
        relative_grid=tuple(grid) if self.posemb == 'relative' else None,
        layer_norm_epsilon=self.layer_norm_epsilon, layer_scale=self.layer_scale,
        quick_gelu=self.quick_gelu, swiglu=self.swiglu, dtype=self.dtype,
        param_dtype=self.param_dtype)
    if self.scan:
      block = nn.scan(block, variable_axes={'params': 0, 'intermediates': 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=(0, nn.broadcast), length=self.num_layers)
      x, _ = block(name=SCANNED_BLOCK, **block_args)(x, jnp.arange(self.num_layers), not train)
    else:
      for i in range(self.num_layers):
        x = block(name=f'encoderblock_{i}', **block_args)(x, i, not train)
    if not self.final_norm:
      return x
    return nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                        param_dtype=self.param_dtype, name='encoder_norm')(x)


class VisionTransformer(nn.Module):
  """ViT for images (batch, height, width, channels); height and width divisible by the patch
  (times 16 or 32 for a hybrid's ResNet stem).

  Returns logits (batch, num_classes); with `num_classes=None` the (pre-logits) representation;
  with `classifier='unpooled'` one output per patch token (batch, tokens, ...). The encoder's
  output grid and each block's output are sown as intermediates (see `backbone_features`).
  """
  num_classes: Optional[int]
  patches: Any  # .size = (patch height, patch width)
  hidden_size: int
  transformer: Any  # keyword arguments of Encoder
  classifier: str = 'token'
  representation_size: Optional[int] = None
  resnet: Optional[Any] = None  # Hybrid: .num_layers (units per stage), .width_factor
  head_bias_init: float = 0.0
  model_name: Optional[str] = None
  # DeiT: a distillation token after the class token, with its own head `head_dist`; the
  # logits are the mean of both heads' (the representation: of both tokens). Without
  # `distillation_head` (a distilled DeiT fine-tuned further), only the class token is read.
  distilled: bool = False
  distillation_head: bool = True
  # timm's fc_norm: the final LayerNorm applied to the pooled representation (`pool_norm`)
  # instead of to every token (the encoder's `encoder_norm`).
  pool_norm: bool = False
  num_registers: int = 0  # DINOv2's register tokens (Darcet et al. 2023): no position, unread.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def encode(self, inputs, *, train: bool, patch_corruption: Optional[dict] = None):
    """Patch embedding, prefix tokens, position embeddings and the Transformer encoder (called
    from a compact method): every token (batch, tokens, D), and the patch tokens as their grid
    (batch, H/P, W/P, D)."""
    images = inputs
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'classifier={self.classifier!r}; expected one of {CLASSIFIERS}.')
    x = images.astype(self.dtype)
    if self.resnet is not None:
      x = models_resnet.resnet_stem(x, num_layers=self.resnet.num_layers,
                                    width_factor=self.resnet.width_factor, dtype=self.dtype,
                                    param_dtype=self.param_dtype)
    patch_h, patch_w = self.patches.size
    _, height, width, _ = x.shape
    if height % patch_h or width % patch_w:
      raise ValueError(f'Image size {images.shape[1]}x{images.shape[2]} gives a {height}x{width} '
                       f'input to the patch embedding, not divisible by the patch size '
                       f'{patch_h}x{patch_w}.' if self.resnet is not None else
                       f'Image size {height}x{width} is not divisible by the patch size '
                       f'{patch_h}x{patch_w}.')

    # Linear projection E of flattened patches == a convolution with kernel = stride = patch.
    x = nn.Conv(self.hidden_size, (patch_h, patch_w), strides=(patch_h, patch_w),
                padding='VALID', dtype=self.dtype, param_dtype=self.param_dtype,
                name='embedding')(x)
    batch, grid_h, grid_w, _ = x.shape
    x = x.reshape(batch, grid_h * grid_w, self.hidden_size)
    if patch_corruption is not None:
      mask_token = self.param('mask_token', nn.initializers.normal(stddev=0.02),
                              (1, 1, self.hidden_size), self.param_dtype)
      other = jnp.take_along_axis(x, patch_corruption['source'][..., None], axis=1)
      x = jnp.where(patch_corruption['replaced'][..., None], other, x)
      x = jnp.where(patch_corruption['masked'][..., None], mask_token.astype(x.dtype), x)

    if self.distilled and self.classifier != 'token':
      raise ValueError(f'distilled=True needs classifier=\'token\', not {self.classifier!r}.')
    class_token = self.classifier in ('token', 'token_and_gap')
    prefix = [self.param(name, nn.initializers.zeros, (1, 1, self.hidden_size), self.param_dtype)
              for name in (['cls'] if class_token else []) +
              (['dist'] if self.distilled else [])]
    num_prefix_tokens = len(prefix)
    if prefix:
      x = jnp.concatenate([jnp.broadcast_to(token.astype(x.dtype), (batch, 1, self.hidden_size))
                           for token in prefix] + [x], axis=1)
    registers = None
    if self.num_registers:
      registers = self.param('registers', nn.initializers.zeros,
                             (1, self.num_registers, self.hidden_size), self.param_dtype)

    x = Encoder(name='Transformer', final_norm=not self.pool_norm, dtype=self.dtype,
                param_dtype=self.param_dtype,
                **self.transformer)(x, train=train, grid=(grid_h, grid_w),
                                    num_prefix_tokens=num_prefix_tokens, registers=registers)
    grid = x[:, num_prefix_tokens + self.num_registers:].reshape(
        batch, grid_h, grid_w, self.hidden_size)
    self.sow('intermediates', 'encoded_grid', grid)
    return x, grid


  @nn.compact
  def __call__(self, inputs, *, train: bool, patch_corruption: Optional[dict] = None):
    """`inputs`: the images (the official code's name, so `model.apply(v, inputs=x, ...)` works
    too). `patch_corruption` (masked patch prediction, see mpp.py): boolean (batch, patches)
    arrays 'masked' and 'replaced' and the index 'source' of each replacement."""
    x, grid = self.encode(inputs, train=train, patch_corruption=patch_corruption)
    batch, grid_h, grid_w, _ = grid.shape
    num_prefix_tokens = x.shape[1] - self.num_registers - grid_h * grid_w
    patch_tokens = grid.reshape(batch, grid_h * grid_w, -1)

    if self.classifier == 'token':
      x = x[:, :num_prefix_tokens]  # The class token (and the distillation token).
    elif self.classifier == 'gap':
      x = jnp.mean(patch_tokens, axis=1)
    elif self.classifier == 'token_and_gap':
      x = jnp.concatenate([x[:, 0], jnp.mean(patch_tokens, axis=1)], axis=-1)
    elif self.classifier == 'map':
      x = MAPHead(num_heads=self.transformer['num_heads'], mlp_dim=self.transformer['mlp_dim'],
                  gelu_approximate=self.transformer.get('gelu_approximate', True),
                  layer_norm_epsilon=self.transformer.get('layer_norm_epsilon',
                                                          LAYER_NORM_EPSILON),
                  dtype=self.dtype, param_dtype=self.param_dtype, name='MAPHead_0')(x)
    if self.classifier == 'token' and not self.distilled:
      x = x[:, 0]
    if self.pool_norm:
      x = nn.LayerNorm(epsilon=self.transformer.get('layer_norm_epsilon', LAYER_NORM_EPSILON),
                       dtype=self.dtype, param_dtype=self.param_dtype, name='pool_norm')(x)

    if self.representation_size is not None:
      x = nn.Dense(self.representation_size, dtype=self.dtype, param_dtype=self.param_dtype,
                   name='pre_logits')(x)
      x = jnp.tanh(x)

    head = lambda name: nn.Dense(
        self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.zeros,
        bias_init=nn.initializers.constant(self.head_bias_init), name=name)
    if self.distilled and not self.distillation_head:
      x = x[:, 0]
    elif self.distilled:  # Inference as DeiT: the mean of the two heads (or representations).
      if not self.num_classes:
        return x.mean(axis=1)
      return (head('head')(x[:, 0]) + head('head_dist')(x[:, 1])) / 2
    if self.num_classes:
      x = head('head')(x)
    return x


def block_intermediates(intermediates: dict) -> list:
  """What each encoder block sowed, in layer order, from a VisionTransformer's intermediates,
  unrolled or scanned (whose sown arrays have a leading layer axis)."""
  sown_encoder = intermediates['Transformer']
  if SCANNED_BLOCK in sown_encoder:
    stacked = sown_encoder[SCANNED_BLOCK]
    num_layers = len(jax.tree.leaves(stacked)[0])
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)]
  blocks = [k for k in sown_encoder if k.startswith('encoderblock_')]
  return [sown_encoder[k] for k in sorted(blocks, key=lambda k: int(k.split('_')[-1]))]


def backbone_features(model: VisionTransformer, params, images, layers: Sequence[int] = ()):
  """Dense features for detection / segmentation heads: {'encoded': the final (normalised)
  patch-token grid, 'encoderblock_{i}': block i's output grid}, each (batch, H/P, W/P, D)."""
  _, state = model.apply({'params': params}, images, train=False, mutable=['intermediates'])
  sown = state['intermediates']
  grid = sown['encoded_grid'][0]
  outputs = {'encoded': grid}
  blocks = block_intermediates(sown)
  for i in layers:
    tokens = blocks[i]['output'][0]
    tokens = tokens[:, tokens.shape[1] - grid.shape[1] * grid.shape[2]:]
    outputs[f'encoderblock_{i}'] = tokens.reshape(grid.shape)
  return outputs
