"""What a VisionTransformer computes on the way to its output: each encoder block's sown
intermediates (the analysis tools read the attention weights) and the patch-token grids that
detection and segmentation heads take as dense features."""

from typing import Sequence

import jax

from vit_jax.models_vit import VisionTransformer
from vit_jax.sharding import SCANNED_BLOCK


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
