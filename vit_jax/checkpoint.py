"""Official ViT `.npz` checkpoints: read, write, and adapt to a new model (fine-tuning).

A checkpoint is `np.savez` of the flattened parameter tree with `/`-joined keys, e.g.
`Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`. Paths with a scheme (`gs://...`) go
through `tf.io.gfile`; local paths need no TensorFlow.
"""

import io
import logging
import math
import os
from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import models

Params = Any

# Newer Flax numbers a block's sub-modules per type; the official files number them per block.
_NEWER_TO_OFFICIAL = {
    'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
    'LayerNorm_1': 'LayerNorm_2',
    'MlpBlock_0': 'MlpBlock_3',
}


class CheckpointMismatchError(ValueError):
  """A checkpoint's parameters do not fit the model they are loaded into."""


def _is_remote(path: str) -> bool:
  return '://' in path


def _read_bytes(path: str) -> bytes:
  if _is_remote(path):
    import tensorflow as tf  # Only remote paths pay for importing TensorFlow.
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f'Checkpoint not found: {path}')
    with tf.io.gfile.GFile(path, 'rb') as f:
      return f.read()
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Checkpoint not found: {path}')
  with open(path, 'rb') as f:
    return f.read()


def write_bytes(path: str, data: bytes):
  if _is_remote(path):
    import tensorflow as tf
    with tf.io.gfile.GFile(path, 'wb') as f:
      f.write(data)
    return
  # Write next to the target and rename: a reader never sees a half-written file.
  tmp_path = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp_path, 'wb') as f:
      f.write(data)
    os.replace(tmp_path, path)
  except BaseException:  # A full disk, an interrupt: the old file stays, no litter.
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise


def _to_official_layout(flat: dict) -> dict:
  """{key tuple: array} in the official spelling and shapes: the newer Flax numbering of a
  block's modules; GroupNorm scales and biases of shape (1, 1, 1, C), as the AugReg hybrids
  store them (older Flax), as (C,)."""
  layout = {}
  for key, value in flat.items():
    if len(key) > 2 and key[0] == 'Transformer' and key[1].startswith('encoderblock_'):
      key = key[:2] + (_NEWER_TO_OFFICIAL.get(key[2], key[2]),) + key[3:]
    if (len(key) > 1 and key[-2].startswith('gn') and key[-1] in ('scale', 'bias') and
        value.ndim == 4):
      value = value.reshape(-1)
    layout[key] = value
  return layout


def load(path: str) -> dict:
  """Reads an .npz checkpoint into a nested dict of numpy arrays, in the official spelling."""
  data = _read_bytes(path)
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      flat = {tuple(key.split('/')): npz[key] for key in npz.files}
  except Exception as e:  # np.load raises several types for files that are not .npz archives.
    raise ValueError(f'{path} is not a readable .npz checkpoint ({type(e).__name__}: {e}).') from e
  if not flat:
    raise ValueError(f'{path} holds no parameters.')
  return flax.traverse_util.unflatten_dict(_to_official_layout(flat))


def save(params: Params, path: str):
  """Writes `params` as an official-layout .npz (float32 where the model runs in bfloat16)."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep='/')
  arrays = {}
  for key, value in flat.items():
    value = np.asarray(value)
    if value.dtype == jnp.bfloat16:  # np.savez cannot store bfloat16 portably.
      value = value.astype(np.float32)
    arrays[key] = value
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(path, buffer.getvalue())


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


def _grid_shape(num_tokens: int, image_size, token_stride, what: str):
  if image_size is not None:
    shape = (image_size[0] // token_stride[0], image_size[1] // token_stride[1])
    if shape[0] * shape[1] != num_tokens:
      raise CheckpointMismatchError(
          f'The {what} has {num_tokens} position embeddings, but image size {tuple(image_size)} '
          f'with {tuple(token_stride)} pixels per token gives a {shape[0]}x{shape[1]} grid.')
    return shape
  side = math.isqrt(num_tokens)
  if side * side != num_tokens:
    raise CheckpointMismatchError(
        f'The {what} has {num_tokens} position embeddings, not a square grid: '
        f'pass its image size to load_pretrained().')
  return side, side


def _adapt_position_embeddings(restored: dict, init: dict, token_stride, image_size,
                               pretrained_image_size) -> None:
  """Resamples the checkpoint's position embeddings to the target grid, in place.

  The class-token slot (present when the model has `cls`) is carried over or, when only the
  target has one, taken from the fresh initialisation.
  """
  key = ('Transformer', 'posembed_input', 'pos_embedding')
  if key not in restored or key not in init or restored[key].shape == init[key].shape:
    return
  old, new = restored[key], init[key]
  if old.ndim != 3 or old.shape[-1] != new.shape[-1]:
    return  # Mis-shaped beyond a grid change: reported with the other mismatches.
  old_extra = 1 if ('cls',) in restored else 0
  new_extra = 1 if ('cls',) in init else 0
  old_grid, new_grid = old[0, old_extra:], new[0, new_extra:]
  old_shape = _grid_shape(len(old_grid), pretrained_image_size, token_stride, 'checkpoint')
  new_shape = _grid_shape(len(new_grid), image_size, token_stride, 'model')
  if old_shape != new_shape:
    logging.info('Resampling position embeddings from a %dx%d to a %dx%d grid.',
                 *old_shape, *new_shape)
    grid = resample_grid(old_grid.reshape(old_shape + (-1,)), new_shape)
    old_grid = grid.reshape(-1, grid.shape[-1])
  extra = []
  if new_extra:
    extra = [old[0, :1] if old_extra else np.asarray(new[0, :1])]
  restored[key] = np.concatenate(extra + [old_grid], axis=0)[None]


def _adapt_learned_tables(restored: dict, init: dict) -> None:
  """Resamples the tables of the 2D and relative position embeddings to the target grid: the
  row / column tables (length h / w) along their length, the relative-offset tables
  (2h-1, 2w-1, heads) in 2D."""
  for key, new in init.items():
    old = restored.get(key)
    if old is None or old.shape == new.shape or old.shape[-1] != new.shape[-1]:
      continue
    if key[-1] == 'relative_position_bias':
      restored[key] = resample_grid(old, new.shape[:2])
    elif key[-1] in ('row_embedding', 'column_embedding'):
      restored[key] = resample_grid(old[:, None], (new.shape[0], 1))[:, 0]


def _replace_from_init(restored: dict, init: dict, prefix: str):
  """Replaces the checkpoint's `prefix/...` parameters by the target's (none if it has none)."""
  for key in [k for k in restored if k[0] == prefix]:
    del restored[key]
  for key in [k for k in init if k[0] == prefix]:
    restored[key] = init[key]


def load_pretrained(*, pretrained_path: str, init_params: Params, model_config,
                    reinit_head: bool = True,
                    image_size: Optional[Sequence[int]] = None,
                    pretrained_image_size: Optional[Sequence[int]] = None) -> Params:
  """Loads a checkpoint into the structure of `init_params` for fine-tuning.

  - `head`: the fresh one from `init_params` (as the official load_pretrained does); with
    reinit_head=False the checkpoint's (e.g. to evaluate a fine-tuned checkpoint; a mismatch is
    an error);
  - `pre_logits` is dropped when the target has no representation layer;
  - `cls` is dropped or taken from the initialisation when converting token <-> gap models;
  - position embeddings are resampled to the target grid (2D, corners aligned, class token
    kept). Non-square grids need `image_size` (target) / `pretrained_image_size` (checkpoint).

  Raises CheckpointMismatchError naming every missing, unexpected and mis-shaped key.
  """
  restored = flax.traverse_util.flatten_dict(load(pretrained_path))
  init = flax.traverse_util.flatten_dict(init_params)

  if reinit_head and any(k[0] == 'head' for k in init):
    logging.info('Fine-tuning %s with a freshly initialised head.', pretrained_path)
    _replace_from_init(restored, init, 'head')
  for prefix in ('head', 'pre_logits', 'mask_token'):  # mask_token: masked patch prediction.
    if not any(k[0] == prefix for k in init):
      _replace_from_init(restored, init, prefix)  # I.e. drop them.

  _adapt_position_embeddings(restored, init, models.token_stride(model_config), image_size,
                             pretrained_image_size)
  _adapt_learned_tables(restored, init)
  if ('cls',) in init:
    restored.setdefault(('cls',), init[('cls',)])  # gap -> token: a fresh (zero) class token.
  else:
    restored.pop(('cls',), None)  # token -> gap.

  _check_fits(restored, init, pretrained_path)
  return flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(restored[k], dtype=init[k].dtype) for k in init})


def _check_fits(restored: dict, init: dict, path: str):
  join = '/'.join
  missing = sorted(join(k) for k in init.keys() - restored.keys())
  unexpected = sorted(join(k) for k in restored.keys() - init.keys())
  misshaped = sorted(
      f'{join(k)}: checkpoint {tuple(restored[k].shape)}, model {tuple(init[k].shape)}'
      for k in init.keys() & restored.keys() if tuple(restored[k].shape) != tuple(init[k].shape))
  if missing or unexpected or misshaped:
    lines = [f'Checkpoint {path} does not fit the model:']
    for title, keys in [('missing (in the model, not in the checkpoint)', missing),
                        ('unexpected (in the checkpoint, not in the model)', unexpected),
                        ('mis-shaped', misshaped)]:
      if keys:
        lines.append(f'  {title}: {len(keys)}')
        lines.extend(f'    {key}' for key in keys)
    raise CheckpointMismatchError('\n'.join(lines))


def infer_model_config(params: Params, name: str = 'from-checkpoint'):
  """The model config of a ViT checkpoint, read off its parameter shapes, and its image size.

  Returns (config, num_classes, image_size); the image size assumes a square patch grid.
  """
  try:
    patch_h, patch_w, _, width = params['embedding']['kernel'].shape
    encoder = params['Transformer']
    num_layers = sum(1 for k in encoder if k.startswith('encoderblock_'))
    block = encoder['encoderblock_0']
    _, num_heads, _ = block['MultiHeadDotProductAttention_1']['query']['kernel'].shape
    mlp_dim = block['MlpBlock_3']['Dense_0']['kernel'].shape[1]
    tokens = encoder['posembed_input']['pos_embedding'].shape[1]
  except KeyError as e:
    raise ValueError(f'Not a ViT checkpoint: it has no parameter {e}.') from None
  # Masked patch prediction models (mpp.py) have a [mask] embedding and one output per patch.
  classifier = 'unpooled' if 'mask_token' in params else 'token' if 'cls' in params else 'gap'
  config = models.vit_config(
      name, hidden_size=width, mlp_dim=mlp_dim, num_heads=num_heads, num_layers=num_layers,
      patch=patch_h, classifier=classifier,
      representation_size=params['pre_logits']['kernel'].shape[1] if 'pre_logits' in params
      else None)
  config.patches.size = (patch_h, patch_w)
  if 'conv_root' in params:  # A hybrid: count the units of each ResNet stage.
    stages = sorted(int(k[len('block'):]) for k in params if k.startswith('block'))
    config.resnet = ml_collections.ConfigDict({
        'num_layers': tuple(len(params[f'block{s}']) for s in stages),
        'width_factor': params['conv_root']['kernel'].shape[-1] // 64})
  grid = math.isqrt(tokens - (classifier == 'token'))
  num_classes = params['head']['kernel'].shape[-1] if 'head' in params else None
  stride_h, stride_w = models.token_stride(config)
  return config, num_classes, (grid * stride_h, grid * stride_w)
