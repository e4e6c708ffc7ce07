"""The official ViT layout (google-research/vision_transformer .npz files): key spellings,
the bilinear position-table resampling of the official code, and the model config read off the
parameter shapes of files that do not describe themselves."""

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import models
from vit_jax.layouts import big_vision

Params = Any

# Newer Flax numbers a block's sub-modules per type; the official files number them per block.
_NEWER_TO_OFFICIAL = {
    'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
    'LayerNorm_1': 'LayerNorm_2',
    'MlpBlock_0': 'MlpBlock_3',
}


def to_official_layout(flat: dict) -> dict:
  """{key tuple: array} in the official spelling and shapes: big_vision's layout (see
  big_vision.py); the newer Flax numbering of a block's modules; GroupNorm scales and biases
  of shape (1, 1, 1, C), as the AugReg hybrids store them (older Flax), as (C,); relative
  position tables of this codebase's earlier exports (`Transformer/relative_position_{i}`) in
  their block."""
  layout = {}
  for key, value in big_vision.from_big_vision(flat).items():
    if len(key) > 2 and key[0] == 'Transformer' and key[1].startswith('relative_position_'):
      key = ('Transformer', f'encoderblock_{key[1][len("relative_position_"):]}',
             'relative_position') + key[2:]
    if len(key) > 2 and key[0] == 'Transformer' and key[1].startswith('encoderblock_'):
      key = key[:2] + (_NEWER_TO_OFFICIAL.get(key[2], key[2]),) + key[3:]
    if (len(key) > 1 and key[-2].startswith('gn') and key[-1] in ('scale', 'bias') and
        value.ndim == 4):
      value = value.reshape(-1)
    layout[key] = value
  return layout


def resample_grid(grid: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
  """Bilinearly resamples a (h, w, D) grid to new_shape = (h', w'), corners aligned.

  Aligned corners (like scipy.ndimage.zoom with order=1, which the official code uses) keep the
  embeddings of the four corner patches exactly.
  """
  scales, shifts = [], []
  for old, new in zip(grid.shape[:2], new_shape):
    scale = (new - 1) / (old - 1) if old > 1 and new > 1 else new / old
    scales.append(scale)
    shifts.append(0.5 * (1 - scale) if old > 1 and new > 1 else 0.0)
  resampled = jax.image.scale_and_translate(
      jnp.asarray(grid, jnp.float32), tuple(new_shape) + grid.shape[2:], (0, 1),
      jnp.array(scales), jnp.array(shifts), method='linear', antialias=False)
  return np.asarray(resampled).astype(grid.dtype)


def _posemb_and_grid(encoder: dict, has_class_token: bool):
  """(posemb variant, patch grid) read off the position-embedding parameters, if any."""
  table = encoder.get('posembed_input', {})
  if 'pos_embedding' in table:
    side = math.isqrt(table['pos_embedding'].shape[1] - has_class_token)
    return 'learn', (side, side)
  if 'row_embedding' in table:
    return 'learn_2d', (len(table['row_embedding']), len(table['column_embedding']))
  if 'relative_position' in encoder['encoderblock_0']:
    offsets = encoder['encoderblock_0']['relative_position']['relative_position_bias'].shape
    return 'relative', ((offsets[0] + 1) // 2, (offsets[1] + 1) // 2)
  return None, None


def infer_model_config(params: Params, name: str = 'from-checkpoint'):
  """The model config of a ViT checkpoint, read off its parameter shapes, and its image size.

  Returns (config, num_classes, image_size); a 1D table is taken as a square grid. For files
  that do not describe themselves (official releases); see load_model.
  """
  try:
    patch_h, patch_w, _, width = params['embedding']['kernel'].shape
    encoder = params['Transformer']
    num_layers = sum(1 for k in encoder if k.startswith('encoderblock_'))
    block = encoder['encoderblock_0']
    _, num_heads, _ = block['MultiHeadDotProductAttention_1']['query']['kernel'].shape
    mlp_dim = block['MlpBlock_3']['Dense_0']['kernel'].shape[1]
  except KeyError as e:
    raise ValueError(f'Not a ViT checkpoint: it has no parameter {e}.') from None
  except (TypeError, ValueError, IndexError):  # An array of another rank than the model's.
    def find(key):
      value = params
      for part in key.split('/'):
        value = value.get(part, {}) if isinstance(value, dict) else {}
      return value
    ranks = {'embedding/kernel': 'patch, patch, 3, width',
             'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel':
                 'width, heads, head width',
             'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel': 'width, MLP width'}
    wrong = [f'{key} is {tuple(np.shape(find(key)))}, expected ({expected})'
             for key, expected in ranks.items() if np.ndim(find(key)) != expected.count(',') + 1]
    raise ValueError('Not a ViT checkpoint of the official layout: '
                     f'{"; ".join(wrong) or "its arrays are of other ranks"}.') from None
  # Masked patch prediction models (mpp.py) have a [mask] embedding and one output per patch.
  classifier = ('unpooled' if 'mask_token' in params else 'map' if 'MAPHead_0' in params else
                'token' if 'cls' in params else 'gap')
  posemb, grid = _posemb_and_grid(encoder, classifier == 'token')
  if posemb is None:
    raise ValueError('The checkpoint has no position-embedding parameters: its model used fixed '
                     "sincos2d embeddings or none, which the parameters cannot tell apart, nor "
                     'its resolution. Export it again with this version of vit_jax (exports '
                     'now carry their model config).')
  config = models.vit_config(
      name, hidden_size=width, mlp_dim=mlp_dim, num_heads=num_heads, num_layers=num_layers,
      patch=patch_h, classifier=classifier,
      representation_size=params['pre_logits']['kernel'].shape[1] if 'pre_logits' in params
      else None)
  config.patches.size = (patch_h, patch_w)
  config.transformer.posemb = posemb
  if 'conv_root' in params:  # A hybrid: count the units of each ResNet stage.
    stages = sorted(int(k[len('block'):]) for k in params if k.startswith('block'))
    config.resnet = ml_collections.ConfigDict({
        'num_layers': tuple(len(params[f'block{s}']) for s in stages),
        'width_factor': params['conv_root']['kernel'].shape[-1] // 64})
  num_classes = params['head']['kernel'].shape[-1] if 'head' in params else None
  stride_h, stride_w = models.token_stride(config)
  return config, num_classes, (grid[0] * stride_h, grid[1] * stride_w)
