"""Checkpoints: every reader's entry point (official / big_vision / own .npz files here; Hugging
Face and timm through vit_jax/layouts/), .npz writing, and adapting to a new model (fine-tuning).

A checkpoint is `np.savez` of the flattened parameter tree with `/`-joined keys, e.g.
`Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`. Paths with a scheme (`gs://...`) go
through `tf.io.gfile`; local paths need no TensorFlow.
"""

import io
import json
import logging
import math
import os
from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import datasets, files, layouts, models, models_vit
from vit_jax.layouts import official
# Names this module has always offered; their home is now vit_jax/layouts/.
from vit_jax.layouts.common import (  # pylint: disable=unused-import
    CheckpointMismatchError, SCANNED_BLOCK, stack_layers, unstack_layers)
from vit_jax.layouts.official import (  # pylint: disable=unused-import
    infer_model_config, resample_grid)

Params = Any
DESCRIPTION_KEY = 'vit_jax_description'  # The model config inside an exported .npz.


class NonFiniteParametersError(ValueError):
  """A checkpoint holds NaN or infinite parameters (a diverged model)."""


def check_finite(flat: dict, where: str):
  """Raises NonFiniteParametersError naming `where` and the keys of `flat` ({key tuple:
  array}) that hold NaN or inf."""
  bad = sorted('/'.join(k) for k, v in flat.items()
               if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all())
  if bad:
    raise NonFiniteParametersError(
        f'{where} holds parameters that are not finite (NaN or inf) in {len(bad)} of '
        f'{len(flat)} arrays: {", ".join(bad[:5])}{" ..." if len(bad) > 5 else ""}. The model '
        'diverged before it was saved; use an earlier checkpoint.')


def _open(path: str):
  """The file at a local or remote (gs://...) path, opened for binary reading."""
  if files.is_remote(path):
    import tensorflow as tf  # Only remote paths pay for importing TensorFlow.
    if not tf.io.gfile.exists(path):
      raise FileNotFoundError(f'Checkpoint not found: {path}')
    return tf.io.gfile.GFile(path, 'rb')
  if os.path.isdir(path):
    raise ValueError(_what_directory(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Checkpoint not found: {path}')
  return open(path, 'rb')


def _what_directory(path: str) -> str:
  """Why a directory is not a checkpoint file, and which file to use instead."""
  if os.path.exists(os.path.join(path, '_CHECKPOINT_METADATA')):
    workdir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return (f'{path} is a train-state checkpoint of a run (orbax: parameters, optimizer state, '
            f'step), not a model file. Use the model the run exported, '
            f'{os.path.join(workdir, "model.npz")}, or evaluate the workdir with '
            '--config.trainer=evaluate.')
  if os.path.exists(os.path.join(path, 'model.npz')):
    return (f'{path} is a workdir, not a model file: its model is '
            f'{os.path.join(path, "model.npz")}.')
  return f'{path} is a directory, not an .npz checkpoint file.'


def _not_npz(path: str, head: bytes) -> str:
  """Why bytes that begin with `head` are not an .npz archive (np.load would call them
  pickled data and suggest allow_pickle, which would run code from the file)."""
  if head.startswith(b'\x80') or head.startswith(b'PK') and b'data.pkl' in head:
    kind = 'a Python pickle (e.g. a PyTorch .bin / .pth / .ckpt file), which vit_jax never loads'
  elif head.startswith(b'\x93NUMPY'):
    kind = 'a single .npy array, not an .npz archive of named parameters'
  else:
    kind = f'not an .npz archive (it begins with {head[:16]!r})'
  return f'{path} is {kind}. Expected an .npz checkpoint (np.savez of the parameters).'


def _open_npz(f, path: str):
  """np.load of an .npz archive, never unpickling; other files are named for what they are."""
  head = f.read(64)
  f.seek(0)
  if not head.startswith(b'PK\x03\x04') or b'data.pkl' in head:
    raise ValueError(_not_npz(path, head))
  try:
    return np.load(f, allow_pickle=False)
  except Exception as e:  # np.load raises several types for damaged archives.
    raise ValueError(f'{path} is not a readable .npz checkpoint ({type(e).__name__}: '
                     f'{e}).') from e


def _read_bytes(path: str) -> bytes:
  with _open(path) as f:
    return f.read()


def _load(path: str):
  """(nested parameters in the official layout, the file's description or None)."""
  with _open_npz(io.BytesIO(_read_bytes(path)), path) as npz:
    try:
      flat = {tuple(key.split('/')): npz[key] for key in npz.files}
    except Exception as e:  # A damaged member, an object array (pickled: never loaded).
      raise ValueError(f'{path} is not a readable .npz checkpoint ({type(e).__name__}: '
                       f'{e}).') from e
  description = flat.pop((DESCRIPTION_KEY,), None)
  if description is not None:
    description = _parse_description(description, path)
  if not flat:
    raise ValueError(f'{path} holds no parameters.')
  # float16 / bfloat16 read as float32; integer or bool arrays are no weights: refused.
  flat = layouts.floating_weights(flat, path, '/'.join)
  check_finite(flat, path)
  return flax.traverse_util.unflatten_dict(official.to_official_layout(flat)), description


def _foreign(path: str) -> Optional[layouts.Read]:
  """A Hugging Face or timm checkpoint (hf://ORG/NAME, a model directory, a timm .safetensors
  file) read in this codebase's terms; None for .npz files (local or gs://)."""
  local = layouts.resolve(path)
  if '://' in local:
    return None
  read = layouts.read(local)
  if read is not None:
    check_finite(flax.traverse_util.flatten_dict(read.params), path)
    # Every array as the model its files describe has it (a head as wide as the encoder...).
    _check_holds(read, path, 'its files describe')
  return read


def load(path: str) -> dict:
  """Reads a checkpoint into a nested dict of numpy arrays, in the official spelling: an .npz
  (official, big_vision, own), a Hugging Face model directory, a timm .safetensors file, or an
  hf://ORG/NAME[@REVISION] id."""
  foreign = _foreign(path)
  return _load(path)[0] if foreign is None else foreign.params


# The official ImageNet-21k releases (all its classes) were trained with sigmoids.
IMAGENET21K_CLASSES = datasets.DATASETS['imagenet21k']['num_classes']


def load_model(path: str) -> layouts.Read:
  """A checkpoint with its model config, class count, image size, output activation, class
  names and input normalisation (layouts.Read): from the description that exports of this
  codebase carry (checked against the arrays), else read off the parameter shapes (Hugging
  Face: from its config.json and preprocessor_config.json; timm: shapes and key names)."""
  foreign = _foreign(path)
  if foreign is not None:
    return foreign
  params, description = _load(path)
  if description is None:
    config, num_classes, image_size = infer_model_config(params)
    read = layouts.Read(params, config, num_classes, image_size,
                        multi_label=num_classes == IMAGENET21K_CLASSES)
    # The arrays that the shapes were read off agree with all the others (each block's key,
    # MLP, norms as wide as the first's; no layer missing); a 1D table that is no square grid
    # says no resolution (load_pretrained(pretrained_image_size=...) reads those files).
    table = params.get('Transformer', {}).get('posembed_input', {}).get('pos_embedding')
    tokens = None if table is None else table.shape[1] - (config.classifier == 'token')
    square = tokens is None or math.isqrt(tokens) ** 2 == tokens
    _check_holds(read, path, 'its parameter shapes describe', ignore=() if square else (
        ('Transformer', 'posembed_input', 'pos_embedding'),))
    return read
  exported = _described(params, description)
  _check_description(exported, path)
  return exported


def read_description(path: str) -> Optional[layouts.Read]:
  """What an export of this codebase says it holds, without reading its parameters (`params`
  is None); None for a file without a description (e.g. an official release). Hugging Face
  and timm checkpoints describe themselves in their own way: what they say is returned."""
  foreign = _foreign(path)
  if foreign is not None:
    return foreign._replace(params=None)
  with _open(path) as f, _open_npz(f, path) as npz:  # Reads one member only.
    if DESCRIPTION_KEY not in npz.files:
      return None
    try:
      raw = npz[DESCRIPTION_KEY]
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{path}: its {DESCRIPTION_KEY} is unreadable ({e}).') from e
  return _described(None, _parse_description(raw, path))


def read_preprocessing(path: str) -> Optional[dict]:
  """The {'mean', 'std'} a checkpoint expects its inputs normalised with (None: [-1, 1]),
  without reading its weights: from a Hugging Face directory's preprocessor_config.json, an
  export's description; official and timm files say nothing (None)."""
  local = layouts.resolve(path)
  if '://' not in local and (os.path.isdir(local) or local.endswith('.safetensors')):
    return layouts.preprocessing(local)
  description = read_description(path)
  return None if description is None else description.preprocessing


def _parse_description(raw: np.ndarray, path: str) -> dict:
  """The JSON description of an export, with the fields load_model needs, or a named error."""
  try:
    description = json.loads(raw.tobytes().decode())
    missing = [k for k in ('model', 'num_classes', 'image_size') if k not in description]
    if not missing and 'transformer' not in description['model']:
      missing = ['model.transformer']
  except (ValueError, TypeError, AttributeError) as e:
    raise ValueError(f'{path}: its {DESCRIPTION_KEY} (the model config the export carries) is '
                     f'not valid JSON ({e}). Delete that array to read the file as an official '
                     'checkpoint (the model is then inferred from the shapes).') from None
  if missing:
    raise ValueError(f'{path}: its {DESCRIPTION_KEY} lacks {", ".join(missing)}. Delete that '
                     'array to read the file as an official checkpoint.')
  names, preprocessing = description.get('class_names'), description.get('preprocessing')
  if names is not None and (not isinstance(names, list) or len(names) != description[
      'num_classes'] or not all(isinstance(n, str) for n in names)):
    raise ValueError(f'{path}: its {DESCRIPTION_KEY} has class_names that are not '
                     f'{description["num_classes"]} strings.')
  if preprocessing is not None and not (isinstance(preprocessing, dict) and
                                        layouts.is_normalisation(preprocessing.get('mean'),
                                                                 preprocessing.get('std'))):
    raise ValueError(f'{path}: its {DESCRIPTION_KEY} has a preprocessing that is not '
                     '{"mean": three numbers, "std": three positive numbers}.')
  return description


def _described(params, description: dict) -> layouts.Read:
  as_tuples = lambda x: ({k: as_tuples(v) for k, v in x.items()} if isinstance(x, dict) else
                        tuple(x) if isinstance(x, list) else x)  # JSON made the tuples lists.
  model = as_tuples(description['model'])
  # Earlier exports predate these keys; a model read from a file computes the default way.
  model['transformer'] = {**model['transformer'], **models.IMPLEMENTATION_DEFAULTS}
  return layouts.Read(params, ml_collections.ConfigDict(model), description['num_classes'],
                      tuple(description['image_size']), description.get('multi_label', False),
                      class_names=description.get('class_names'),
                      preprocessing=description.get('preprocessing'),
                      resize=description.get('resize'))


def _check_description(exported: layouts.Read, path: str):
  """Raises CheckpointMismatchError where the model an export describes has other parameters
  than the file holds (a hand-edited or mixed-up file would otherwise compute nonsense)."""
  _check_holds(exported, path, f'its {DESCRIPTION_KEY} describes')


def _check_holds(read: layouts.Read, path: str, describes: str, ignore=()):
  """Raises CheckpointMismatchError naming every key where the model that `read`'s config,
  class count and image size describe has other parameters than `read` holds: missing,
  unexpected and mis-shaped (with both shapes). `describes`: who describes that model, for the
  message; `ignore`: keys not compared."""
  try:
    model = models.build(read.config, read.num_classes)
    # Shapes only: reading a config (configs/finetune.py:<checkpoint>) must not start JAX's
    # backend, which a multi-host run has yet to join (jax.distributed.initialize).
    images = jax.ShapeDtypeStruct((1,) + tuple(read.image_size) + (3,), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointMismatchError(f'{path}: the model {describes} cannot be built '
                                  f'({type(e).__name__}: {e}).') from None
  described = flax.traverse_util.flatten_dict(shapes['params'])
  held = flax.traverse_util.flatten_dict(read.params)
  held.pop(('mask_token',), None)  # Made by the masked patch prediction objective, not the model.
  for key in ignore:
    if key in held and key in described:
      held[key] = described[key]
  try:
    _check_fits(held, described, path)
  except CheckpointMismatchError as e:
    raise CheckpointMismatchError(str(e).replace(
        'does not fit the model:', f'does not hold the model {describes} (missing: described, '
        'not held; unexpected: held, not described):', 1)) from None


def save(params: Params, path: str, *, model_config=None, image_size=None,
         multi_label: bool = False, class_names: Optional[Sequence[str]] = None,
         preprocessing: Optional[dict] = None, num_classes: Optional[int] = None,
         resize: Optional[dict] = None, new: bool = False):
  """Writes `params` as an official-layout .npz (float32 where the model runs in bfloat16; a
  scanned encoder per layer).

  With `model_config` (the `image_size` it was trained at, whether its outputs are sigmoids,
  `multi_label`, what its classes are called and the {'mean', 'std'} its input pixels in
  [0, 1] were normalised with, where not [-1, 1]) the file describes itself: one more array,
  `vit_jax_description` (JSON as bytes), which readers of the official layout (the official
  code, timm) do not look up, and which `load_model` reads back. `num_classes`: a dense
  model's (whose decoder has no `head` to read it from). `new`: refuse to replace an existing
  `path` (files.create), for destinations a user names.
  """
  flat = unstack_layers(flax.traverse_util.flatten_dict(jax.device_get(params)))
  flat = {'/'.join(key): value for key, value in flat.items()}
  arrays = {}
  if model_config is not None:
    head = flat.get('head/kernel')
    model = json.loads(model_config.to_json_best_effort())
    model['transformer'].update(models.IMPLEMENTATION_DEFAULTS)  # The file is per-layer.
    description = {'model': model,
                   'num_classes': num_classes if head is None else int(head.shape[-1]),
                   'image_size': [int(side) for side in image_size],
                   'multi_label': bool(multi_label)}
    if class_names is not None and description['num_classes'] == len(class_names):
      description['class_names'] = [str(name) for name in class_names]
    if preprocessing is not None:
      description['preprocessing'] = {k: [float(x) for x in preprocessing[k]]
                                      for k in ('mean', 'std')}
    if resize is not None:  # The source's image processor (layouts.common.Read.resize).
      description['resize'] = dict(resize)
    arrays[DESCRIPTION_KEY] = np.frombuffer(json.dumps(description).encode(), np.uint8)
  for key, value in flat.items():
    value = np.asarray(value)
    if value.dtype == jnp.bfloat16:  # np.savez cannot store bfloat16 portably.
      value = value.astype(np.float32)
    arrays[key] = value
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  if new:
    files.create(path, lambda temporary: files.write_bytes(temporary, buffer.getvalue()))
  else:
    files.write_bytes(path, buffer.getvalue())


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
                               pretrained_image_size, resample=official.resample_grid) -> None:
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
  old_extra = sum(1 for k in (('cls',), ('dist',)) if k in restored)  # The prefix tokens' slots.
  new_extra = sum(1 for k in (('cls',), ('dist',)) if k in init)
  old_grid, new_grid = old[0, old_extra:], new[0, new_extra:]
  old_shape = _grid_shape(len(old_grid), pretrained_image_size, token_stride, 'checkpoint')
  new_shape = _grid_shape(len(new_grid), image_size, token_stride, 'model')
  if old_shape != new_shape:
    logging.info('Resampling position embeddings from a %dx%d to a %dx%d grid.',
                 *old_shape, *new_shape)
    grid = resample(old_grid.reshape(old_shape + (-1,)), new_shape)
    old_grid = grid.reshape(-1, grid.shape[-1])
  kept = min(old_extra, new_extra)  # Class token first, then the distillation token.
  extra = [old[0, :kept], np.asarray(new[0, kept:new_extra], old.dtype)]
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
  foreign = _foreign(pretrained_path)
  restored = flax.traverse_util.flatten_dict(
      _load(pretrained_path)[0] if foreign is None else foreign.params)
  init = flax.traverse_util.flatten_dict(init_params)
  scanned = any(key[:2] == SCANNED_BLOCK for key in init)
  init = unstack_layers(init)  # Adapted and checked per layer, stacked again at the end.

  if reinit_head and any(k[0] == 'head' for k in init):
    logging.info('Fine-tuning %s with a freshly initialised head.', pretrained_path)
    _replace_from_init(restored, init, 'head')
    _replace_from_init(restored, init, 'head_dist')
  # Parts the target does not have are dropped (mask_token: masked patch prediction); an
  # attention-pooling head the checkpoint does not have starts fresh.
  # A dense decoder starts fresh on a classification backbone.
  for prefix in ('head', 'head_dist', 'pre_logits', 'mask_token', 'MAPHead_0', 'decoder'):
    in_init, in_checkpoint = (any(k[0] == prefix for k in tree) for tree in (init, restored))
    if not in_init or (prefix in ('MAPHead_0', 'decoder') and not in_checkpoint):
      _replace_from_init(restored, init, prefix)

  _adapt_position_embeddings(restored, init, models.token_stride(model_config), image_size,
                             pretrained_image_size or (foreign and foreign.image_size),
                             layouts.resampler(foreign.resample if foreign else 'bilinear'))
  _adapt_learned_tables(restored, init)
  for token in ('cls', 'dist', 'registers'):  # gap -> token, DeiT -> ViT, ...
    if (token,) in init:
      restored.setdefault((token,), init[(token,)])  # A fresh (zero) token.
    else:
      restored.pop((token,), None)

  _check_fits(restored, init, pretrained_path)
  loaded = {k: jnp.asarray(restored[k], dtype=init[k].dtype) for k in init}
  return flax.traverse_util.unflatten_dict(stack_layers(loaded) if scanned else loaded)


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


def patch_embedding_kernel(params: Params):
  """The patch embedding E as a convolution kernel (patch_h, patch_w, channels, D)."""
  return params['embedding']['kernel']


def without_head(params: Params) -> Params:
  """The parameters of the model's representation (what few-shot probes read): no head."""
  return {k: v for k, v in params.items() if k != 'head'}


def patch_position_embeddings(params: Params, model_config, grid) -> Optional[np.ndarray]:
  """Each patch's absolute position embedding, (grid_h * grid_w, D); None for models that
  have none (posemb 'relative' or 'none')."""
  posemb = model_config.transformer.posemb
  table = params['Transformer'].get('posembed_input', {})
  if posemb == 'learn':
    return np.asarray(table['pos_embedding'][0, -grid[0] * grid[1]:])
  if posemb == 'learn_2d':
    rows, columns = np.asarray(table['row_embedding']), np.asarray(table['column_embedding'])
    table = np.concatenate([np.repeat(rows[:, None], grid[1], 1),
                            np.repeat(columns[None], grid[0], 0)], -1)
    return table.reshape(grid[0] * grid[1], -1)
  if posemb == 'sincos2d':
    return models_vit.sincos2d(grid, model_config.hidden_size)
  return None
