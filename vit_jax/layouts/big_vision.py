"""big_vision's ViT files (big_vision/models/vit.py) in the official layout."""

import numpy as np

from vit_jax.layouts.common import unstack_layers


def from_big_vision(flat: dict) -> dict:
  """big_vision's ViT layout (big_vision/models/vit.py) as the official one:
  - a scanned encoder, per layer (unstack_layers);
  - the top-level `pos_embedding` (added before the class token is prepended, so it has no
    slot for it) as `Transformer/posembed_input/pos_embedding`, with a zero class-token slot
    (which computes exactly what big_vision computes);
  - `Transformer/pos_embedding` (its pre-2022 files, class-token slot included) likewise.
  Their `MAPHead_0` is this codebase's classifier='map'."""
  layout = {}
  for key, value in unstack_layers(flat).items():
    if key in (('pos_embedding',), ('Transformer', 'pos_embedding')):
      if key == ('pos_embedding',) and ('cls',) in flat:
        value = np.concatenate([np.zeros_like(value[:, :1]), value], axis=1)
      layout[('Transformer', 'posembed_input', 'pos_embedding')] = value
    else:
      layout[key] = value
  return layout
