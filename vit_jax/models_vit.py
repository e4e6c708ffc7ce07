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
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models_resnet
from vit_jax.cpu_tuning import over_tokens
from vit_jax.layers import (LAYER_NORM_EPSILON, AddPositionEmbs, AddPositionEmbs2D, DropPath,
                            LayerScale, MAPHead, MlpBlock, MultiHeadDotProductAttention,
                            RelativePositionBias, sincos2d)
from vit_jax.sharding import SCANNED_BLOCK, batch_sharded

Dtype = Any
POSEMBS = ('learn', 'learn_2d', 'sincos2d', 'relative', 'none')
CLASSIFIERS = ('token', 'gap', 'map', 'token_and_gap', 'unpooled')


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
  output grid and each block's output are sown as intermediates (see features.backbone_features).
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
