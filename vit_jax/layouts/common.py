"""What the PyTorch-born layouts (Hugging Face, timm) share: safetensors files, (out, in) weights,
and the bicubic resampling their libraries apply to position tables."""

import json
import math
import os
from collections.abc import Mapping
from typing import NamedTuple, Optional

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from vit_jax import files, models_vit


class CheckpointMismatchError(ValueError):
  """A checkpoint's parameters do not fit the model they are loaded into (or the layout the
  file claims)."""


class WeightShapeError(CheckpointMismatchError):
  """A file's weight of another shape than the model its files describe needs (layouts.read
  puts the file's path in front)."""


class Read(NamedTuple):
  """A checkpoint read in this codebase's terms."""
  params: dict  # Nested, official-layout names (per-layer encoder blocks).
  config: object  # The model config: VisionTransformer(**config).
  num_classes: Optional[int]
  image_size: tuple
  multi_label: bool = False
  class_names: Optional[list] = None  # Label i's name, where the file says (id2label).
  resample: str = 'bilinear'  # How the file's library resamples position tables.
  preprocessing: Optional[dict] = None  # {'mean', 'std'} of [0, 1] pixels; None: [-1, 1].
  # How the file's image processor brings a photo to the model's size, where it says:
  # {'shortest_edge': S, 'crop': [h, w], 'method': 'bicubic' | 'bilinear'} (CLIP, SigLIP,
  # DINOv2: the shorter side to S, then the centre crop); None: straight to image_size.
  resize: Optional[dict] = None

  def model_inputs(self, images):
    """Images in [-1, 1] normalised as this checkpoint's model takes them: (pixels in [0, 1] -
    mean) / std where the file says so (DeiT, DINOv2: ImageNet's), else unchanged."""
    if not self.preprocessing:
      return images
    mean, std = (np.asarray(self.preprocessing[k], np.float32) for k in ('mean', 'std'))
    return ((images + 1) / 2 - mean) / std


def is_normalisation(mean, std) -> bool:
  """Whether `mean` and `std` normalise pixels in [0, 1]: three finite numbers each (one per
  channel), std positive."""
  return all(isinstance(v, (list, tuple)) and len(v) == 3 and
             all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)
             for v in (mean, std)) and min(std) > 0


def read_json(path: str) -> dict:
  """The JSON object in the file `path`, or a ValueError naming the file and where its JSON
  breaks (a config.json that is no JSON would otherwise be a bare JSONDecodeError)."""
  try:
    with open(path, 'rb') as f:
      content = json.loads(f.read().decode('utf-8'))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno} '
                     f'(character {e.pos}).') from None
  except UnicodeDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: not UTF-8 text (byte {e.start}).') from None
  if not isinstance(content, dict):
    raise ValueError(f'{path} holds a JSON {type(content).__name__}, not the object '
                     '({"key": value, ...}) expected.')
  return content


# Integer buffers some files carry beside their weights; the readers drop them unread.
BUFFERS = ('position_ids',)


def floating_weights(flat: dict, path: str, name=str) -> dict:
  """`flat` ({key: array}) with every weight as float32: float16, bfloat16 and float64 files
  (fp16 exports are common on the Hub) are cast; integer, bool and other tensors are no
  weights and are refused, naming each key and dtype (`name`: how a key is written)."""
  out, refused = {}, []
  for key, value in flat.items():
    value = np.asarray(value)
    if value.dtype.kind == 'f' or value.dtype == ml_dtypes.bfloat16:  # numpy's bfloat16 (JAX's).
      out[key] = value if value.dtype == np.float32 else value.astype(np.float32)
    elif str(name(key)).rsplit('.', 1)[-1] in BUFFERS:
      out[key] = value
    else:
      refused.append(f'{name(key)} ({value.dtype})')
  if refused:
    raise ValueError(
        f'{path} holds tensors that are not floating-point weights: '
        f'{", ".join(refused[:8])}{" ..." if len(refused) > 8 else ""}. A model\'s weights are '
        'float32 (float16 / bfloat16 are read as float32); integer or bool tensors are no '
        'weights (a quantised or damaged file): nothing was read.')
  return out


def load_safetensors(path: str) -> dict:
  """{name: float32 numpy array} of a .safetensors file (never a pickle); float16 / bfloat16
  tensors cast, integer or bool ones refused (floating_weights)."""
  from safetensors.numpy import load_file
  try:
    flat = load_file(path)
  except Exception as e:  # SafetensorError and others for damaged or foreign files.
    raise ValueError(f'{path} is not a readable .safetensors file ({type(e).__name__}: '
                     f'{e}).') from None
  return floating_weights(flat, path)


def check_shape(key: str, value, expected: tuple, why: str = ''):
  """Raises WeightShapeError naming `key`, its shape and the `expected` one (None: any size),
  and `why` that shape is expected."""
  shape = tuple(np.shape(value))
  if len(shape) != len(expected) or any(e is not None and e != s
                                        for s, e in zip(shape, expected)):
    shown = ', '.join('any' if e is None else str(e) for e in expected)
    shown += ',' if len(expected) == 1 else ''
    raise WeightShapeError(f'{key} is {shape}, expected ({shown})'
                           f'{f" ({why})" if why else ""}.')


def _inside(entry) -> bool:
  """Whether a file name an index gives stays inside its folder: relative, without `..`."""
  if not isinstance(entry, str) or not entry or os.path.isabs(entry) or '\\' in entry:
    return False
  return '..' not in os.path.normpath(entry).split(os.sep)


def read_safetensors_dir(path: str) -> dict:
  """The weights of a model directory: model.safetensors, or the shards its index names (which
  must lie inside the directory)."""
  index = os.path.join(path, 'model.safetensors.index.json')
  single = os.path.join(path, 'model.safetensors')
  if os.path.isfile(single):
    return load_safetensors(single)
  if os.path.isfile(index):
    weight_map = read_json(index).get('weight_map')
    if not isinstance(weight_map, dict):
      raise ValueError(f'{index} has no weight_map ({{"weight name": "shard file", ...}}).')
    outside = sorted({f'{k!r}: {v!r}' for k, v in weight_map.items() if not _inside(v)})
    if outside:
      raise ValueError(
          f'{index} names shard files outside its folder {path} (absolute paths or ..): '
          f'{", ".join(outside[:4])}{" ..." if len(outside) > 4 else ""}. Shards are read '
          'only from the model\'s own folder: nothing was read.')
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
    if missing:
      raise FileNotFoundError(f'{path}: the shards {missing} named by its '
                              'model.safetensors.index.json are missing.')
    flat = {}
    for shard in shards:
      flat.update(load_safetensors(os.path.join(path, shard)))
    return flat
  pickles = [n for n in sorted(os.listdir(path)) if n.endswith(('.bin', '.pth', '.ckpt', '.pt'))]
  if pickles:
    raise ValueError(
        f'{path} holds its weights only as Python pickles ({", ".join(pickles)}), which '
        'vit_jax never loads (unpickling runs code from the file). Get model.safetensors: most '
        'Hub repositories have one (hf://ORG/NAME downloads it), or convert the file once where '
        'you trust it (transformers: model.save_pretrained(dir, safe_serialization=True)).')
  raise FileNotFoundError(f'{path} has a config.json but no model.safetensors.')


def pop_conv(flat: dict, name: str) -> dict:
  """A PyTorch Conv2d (out, in, h, w) as a Flax Conv {kernel (h, w, in, out), bias}."""
  return {'kernel': flat.pop(f'{name}.weight').transpose(2, 3, 1, 0),
          'bias': flat.pop(f'{name}.bias')}


def split_qkv(weight, bias, heads: int, width: Optional[int] = None,
              keys: tuple = ('qkv.weight', 'qkv.bias')) -> dict:
  """Query, key and value projections stacked in one PyTorch weight (3 D, D) and bias (3 D)
  (timm's fused qkv, torch.nn.MultiheadAttention's in_proj) as this model's three; `width`: the
  model's D (default: the weight's), `keys`: the file's names of weight and bias, for the error
  naming one of another shape."""
  if width is None:
    check_shape(keys[0], weight, (None, None), 'a (3 x width, width) matrix')
    width = weight.shape[1]
  why = f'query, key and value stacked: 3 x the width {width} rows'
  check_shape(keys[0], weight, (3 * width, width), why)
  check_shape(keys[1], bias, (3 * width,), why)
  if width % heads:
    raise WeightShapeError(f'{keys[0]}: a width of {width} does not split into {heads} '
                           'attention heads.')
  return {name: {'kernel': w.T.reshape(width, heads, width // heads),
                 'bias': b.reshape(heads, width // heads)}
          for name, w, b in zip(('query', 'key', 'value'), np.split(weight, 3),
                                np.split(bias, 3))}


def stack_qkv(attention: dict) -> tuple:
  """The inverse of split_qkv: (weight (3 D, D), bias (3 D)) of an attention's parameters."""
  names = ('query', 'key', 'value')
  weight = [np.asarray(attention[n]['kernel']).reshape(attention[n]['kernel'].shape[0], -1).T
            for n in names]
  return (np.concatenate(weight),
          np.concatenate([np.asarray(attention[n]['bias']).reshape(-1) for n in names]))


def refuse_leftovers(flat: dict, path: str):
  """Weights a reader did not place mean a model it does not know: name them."""
  if flat:
    names = sorted(flat)
    raise ValueError(f'{path} holds weights that this model has no place for: '
                     f'{", ".join(names[:8])}{" ..." if len(names) > 8 else ""}.')


def _cubic_weights(old: int, new: int, a: float = -0.75) -> np.ndarray:
  """(new, old) interpolation matrix of PyTorch's bicubic upsampling along one axis
  (align_corners=False, Keys' kernel with a = -0.75, indices clamped at the borders)."""
  def kernel(t):
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))
  matrix = np.zeros((new, old))
  scale = old / new
  for i in range(new):
    source = (i + 0.5) * scale - 0.5
    base = int(np.floor(source))
    for tap in range(base - 1, base + 3):
      matrix[i, min(max(tap, 0), old - 1)] += kernel(source - tap)
  return matrix


def resample_bicubic(grid: np.ndarray, new_shape) -> np.ndarray:
  """A (h, w, D) grid resampled to new_shape as torch.nn.functional.interpolate(mode='bicubic',
  align_corners=False) does (what timm, DINOv2 and SigLIP do to their position tables)."""
  rows = _cubic_weights(grid.shape[0], new_shape[0])
  columns = _cubic_weights(grid.shape[1], new_shape[1])
  out = np.einsum('ih,hwd->iwd', rows, grid.astype(np.float64))
  out = np.einsum('jw,iwd->ijd', columns, out)
  return out.astype(grid.dtype)


def plain_vit_problems(config, params) -> list:
  """What a model has that the PyTorch ViT families cannot express (empty: writable)."""
  problems = []
  transformer = config.transformer
  if config.get('decoder') is not None:  # Segmentation, detection: a head per patch / box.
    decoder = config.decoder
    kind = decoder.get('type') if hasattr(decoder, 'get') else decoder
    problems.append(
        f'a dense decoder (model.decoder.type={kind!r}: {_count(params.get("decoder", {}))} of '
        f'{_count(params)} arrays), which the PyTorch ViT classes have no place for (it stays '
        'whole in --format=npz)')
  if config.get('resnet') is not None:
    problems.append('a hybrid ResNet stem')
  if config.classifier != 'token':
    problems.append(f"classifier={config.classifier!r} (these families read the class token)")
  if transformer.get('posemb', 'learn') != 'learn':
    problems.append(f"posemb={transformer.posemb!r} (they have a learned 1D table)")
  if 'mask_token' in params:
    problems.append('a masked patch prediction [mask] token')
  return problems


def _count(tree) -> int:
  """The arrays in a nested dict of parameters."""
  return sum(_count(v) for v in tree.values()) if isinstance(tree, Mapping) else 1


def write_model_dir(path: str, flat: dict, config: dict, extra_files: Optional[dict] = None):
  """config.json and model.safetensors (and `extra_files`, name -> JSON) in a new folder `path`,
  which appears whole or not at all; an existing path is never replaced (files.create_dir)."""
  from safetensors.numpy import save_file

  def fill(folder):
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()},
              os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
    for name, content in {'config.json': config, **(extra_files or {})}.items():
      with open(os.path.join(folder, name), 'w') as f:
        json.dump(content, f, indent=2)

  files.create_dir(path, fill)


def write_safetensors(path: str, flat: dict):
  """A new .safetensors file; an existing file is never replaced (files.create)."""
  from safetensors.numpy import save_file
  files.create(path, lambda temporary: save_file(
      {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}, temporary,
      metadata={'format': 'pt'}))


SCANNED_BLOCK = ('Transformer', models_vit.SCANNED_BLOCK)  # A scanned encoder's stacked block.


def unstack_layers(flat: dict) -> dict:
  """A scanned encoder's parameters (`Transformer/encoderblock/...`, leading layer axis) as the
  per-layer blocks `Transformer/encoderblock_{i}/...`; other keys as they are."""
  layout = {}
  for key, value in flat.items():
    if key[:2] == SCANNED_BLOCK:
      for layer in range(value.shape[0]):
        layout[('Transformer', f'encoderblock_{layer}') + key[2:]] = value[layer]
    else:
      layout[key] = value
  return layout


def stack_layers(flat: dict) -> dict:
  """The inverse of unstack_layers: per-layer blocks as one stacked `Transformer/encoderblock`."""
  layout, layers = {}, {}
  for key, value in flat.items():
    if key[0] == 'Transformer' and key[1].startswith('encoderblock_'):
      layers.setdefault(key[2:], {})[int(key[1][len('encoderblock_'):])] = value
    else:
      layout[key] = value
  for rest, values in layers.items():
    layout[SCANNED_BLOCK + rest] = jnp.stack([values[i] for i in range(len(values))])
  return layout
