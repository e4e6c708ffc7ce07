"""Checkpoint layouts other than the official .npz (read by checkpoint.py): which one a path
holds, and `hf://ORG/NAME[@REVISION]` ids resolved through the local Hugging Face cache.

  a directory with config.json (`model_type`)   Hugging Face transformers  (hugging_face.py)
  a directory with timm's config.json, or a     timm                       (timm.py)
  .safetensors file of timm keys
"""

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.layouts import common, hugging_face, official, timm

Read = common.Read
is_normalisation = common.is_normalisation
floating_weights = common.floating_weights
HF_SCHEME = 'hf://'
# What a model directory needs: its config, weights and image processor (no pickles).
HUB_FILES = ['config.json', '*.safetensors', 'model.safetensors.index.json',
             'preprocessor_config.json']


def resolve(path: str) -> str:
  """A local path for `path`: hf:// ids are fetched into (or, offline, found in) the Hugging
  Face cache with huggingface_hub; other paths are returned as they are."""
  if not path.startswith(HF_SCHEME):
    return path
  repo, _, revision = path[len(HF_SCHEME):].partition('@')
  if repo.count('/') != 1 or not all(repo.split('/')):
    raise ValueError(f'{path}: expected hf://ORG/NAME or hf://ORG/NAME@REVISION.')
  import huggingface_hub
  from huggingface_hub import errors
  try:
    return huggingface_hub.snapshot_download(repo, revision=revision or None,
                                             allow_patterns=HUB_FILES)
  except errors.LocalEntryNotFoundError as e:
    raise FileNotFoundError(
        f'{path} is not in the local Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) '
        'and the Hub cannot be reached (HF_HUB_OFFLINE is set, or no network): download it once '
        f'with the network ({type(e).__name__}).') from None
  except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
    raise FileNotFoundError(f'{path}: no such repository or revision on the Hugging Face Hub '
                            f'({type(e).__name__}).') from None


def read(path: str) -> Optional[Read]:
  """The checkpoint at a local path read in this codebase's terms, or None when it is not a
  Hugging Face or timm checkpoint (an .npz: checkpoint.py reads those)."""
  try:
    return _read(path)
  except KeyError as e:  # A weight the layout has, the file not.
    raise common.CheckpointMismatchError(
        f'{path} does not hold the layout it claims: it has no {e.args[0]!r}.') from None
  except common.WeightShapeError as e:  # A weight of another shape than its model's.
    raise common.CheckpointMismatchError(f'{path}: {e}') from None


def _read(path: str) -> Optional[Read]:
  if os.path.isdir(path):
    hub_config = timm.read_hub_config(path)
    if 'architecture' in hub_config:  # timm's Hub layout: its config.json and weights.
      return timm.read(path, common.read_safetensors_dir(path), hub_config)
    if hugging_face.is_model_dir(path):
      return hugging_face.read(path)
    return None
  if path.endswith('.safetensors'):
    flat = common.load_safetensors(path)
    if timm.is_state_dict(flat):
      return timm.read(path, flat)
    raise ValueError(f'{path}: a .safetensors file with neither timm\'s keys (patch_embed.proj) '
                     'nor beside a Hugging Face config.json: pass the model directory.')
  return None


def preprocessing(path: str) -> Optional[dict]:
  """The {'mean', 'std'} a local Hugging Face or timm checkpoint expects its inputs normalised
  with (None: [-1, 1]), read without its weights: from a Hugging Face directory's
  preprocessor_config.json (timm's files do not say)."""
  return hugging_face.preprocessing(path) if os.path.isdir(path) else None


def resampler(method: str):
  """(h, w, D) grid, new (h', w') -> the grid resampled the way a layout's library does it:
  'bilinear' (official: corners aligned), 'bicubic' (PyTorch's interpolate: Hugging Face's
  DINOv2 and ViT), 'bicubic_antialias' (timm's resample_abs_pos_embed)."""
  if method == 'bicubic':
    return common.resample_bicubic
  if method == 'bicubic_antialias':
    return lambda grid, shape: np.asarray(jax.image.resize(
        jnp.asarray(grid, jnp.float32), tuple(shape) + grid.shape[2:], 'cubic',
        antialias=True)).astype(grid.dtype)
  return official.resample_grid
