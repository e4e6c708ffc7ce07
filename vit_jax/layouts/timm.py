"""timm `VisionTransformer` state dicts saved as .safetensors (`vit_*`, `deit_*`, `*_dinov2`,
`*_reg4_dinov2`) as this codebase's parameter tree and model config.

timm's files do not say their head count: it is read off the width as timm's own model
definitions set it (64 channels a head, except ViT-H/14 and ViT-g/14's 16 heads). Fused
`qkv` weights are split into query, key and value; position tables without slots for the prefix
tokens (`no_embed_class`: DeiT-3, DINOv2 with registers) get zero slots, which computes the same.
"""

import json
import os
import re

import numpy as np

from vit_jax import models
from vit_jax.layouts import common

HEADS_BY_WIDTH = {1280: 16, 1408: 16}  # Otherwise width // 64.
NOT_YET = ('fc_norm.weight', 'norm_pre.weight', 'attn_pool.latent', 'attn_pool.q.weight')


def is_state_dict(flat: dict) -> bool:
  return 'patch_embed.proj.weight' in flat


def _linear(flat, name):
  return {'kernel': flat.pop(f'{name}.weight').T, 'bias': flat.pop(f'{name}.bias')}


def _norm(flat, name):
  return {'scale': flat.pop(f'{name}.weight'), 'bias': flat.pop(f'{name}.bias')}


def read(path: str, flat: dict, hub_config: dict = None) -> common.Read:
  """A timm state dict as (params, model config, num_classes, image size, ...)."""
  unsupported = [k for k in NOT_YET if k in flat]
  if unsupported:
    raise ValueError(f'{path}: a timm model with {unsupported[0].split(".")[0]} (pooling or '
                     'pre-norm options vit_jax does not read yet).')
  flat = dict(flat)
  embedding = common.pop_conv(flat, 'patch_embed.proj')
  patch_h, patch_w, _, width = embedding['kernel'].shape
  heads = (hub_config or {}).get('model_args', {}).get('num_heads') or HEADS_BY_WIDTH.get(
      width, max(width // 64, 1))
  head_dim = width // heads
  params = {'embedding': embedding}
  prefix = []
  for name, ours in (('cls_token', 'cls'), ('dist_token', 'dist')):
    if name in flat:
      params[ours] = flat.pop(name)
      prefix.append(ours)
  if 'reg_token' in flat:
    params['registers'] = flat.pop('reg_token')
  table = flat.pop('pos_embed')
  num_layers = 1 + max(int(m.group(1)) for k in flat if (m := re.match(r'blocks\.(\d+)\.', k)))
  encoder = {}
  layer_scale = None
  for i in range(num_layers):
    block = f'blocks.{i}.'
    qkv_weight = flat.pop(f'{block}attn.qkv.weight')  # (3 D, D): query, key, value stacked.
    qkv_bias = flat.pop(f'{block}attn.qkv.bias', np.zeros(3 * width, qkv_weight.dtype))
    attention = {}
    for j, name in enumerate(('query', 'key', 'value')):
      rows = slice(j * width, (j + 1) * width)
      attention[name] = {'kernel': qkv_weight[rows].T.reshape(width, heads, head_dim),
                         'bias': qkv_bias[rows].reshape(heads, head_dim)}
    attention['out'] = {'kernel': flat.pop(f'{block}attn.proj.weight').T.reshape(
        heads, head_dim, width), 'bias': flat.pop(f'{block}attn.proj.bias')}
    encoder[f'encoderblock_{i}'] = {
        'LayerNorm_0': _norm(flat, f'{block}norm1'),
        'MultiHeadDotProductAttention_1': attention,
        'LayerNorm_2': _norm(flat, f'{block}norm2'),
        'MlpBlock_3': {'Dense_0': _linear(flat, f'{block}mlp.fc1'),
                       'Dense_1': _linear(flat, f'{block}mlp.fc2')}}
    if f'{block}ls1.gamma' in flat:
      encoder[f'encoderblock_{i}']['layer_scale_attention'] = {
          'scale': flat.pop(f'{block}ls1.gamma')}
      encoder[f'encoderblock_{i}']['layer_scale_mlp'] = {'scale': flat.pop(f'{block}ls2.gamma')}
      layer_scale = 1e-5  # Its initial value; only training from scratch reads it.
  encoder['encoder_norm'] = _norm(flat, 'norm')

  num_registers = params['registers'].shape[1] if 'registers' in params else 0
  side = int(round(np.sqrt(table.shape[1] - len(prefix))))
  if side * side == table.shape[1] - len(prefix):
    if num_registers:
      raise ValueError(f'{path}: position embeddings for register tokens are not supported.')
  else:  # no_embed_class: the table holds the patches only.
    side = int(round(np.sqrt(table.shape[1])))
    if side * side != table.shape[1]:
      raise ValueError(f'{path}: a position table of {table.shape[1]} entries is not a square '
                       'grid, with or without prefix tokens.')
    table = np.concatenate([np.zeros((1, len(prefix), width), table.dtype), table], axis=1)
  encoder['posembed_input'] = {'pos_embedding': table}
  params['Transformer'] = encoder
  if 'head.weight' in flat:
    params['head'] = _linear(flat, 'head')
  if 'head_dist.weight' in flat:
    params['head_dist'] = _linear(flat, 'head_dist')
  common.refuse_leftovers(flat, path)

  config = models.vit_config(
      (hub_config or {}).get('architecture', f'timm:{os.path.basename(path)}'),
      hidden_size=width, mlp_dim=params['Transformer']['encoderblock_0']['MlpBlock_3']
      ['Dense_0']['kernel'].shape[1], num_heads=heads, num_layers=num_layers, patch=patch_h,
      classifier='token' if 'cls' in params else 'gap')
  config.patches.size = (patch_h, patch_w)
  config.transformer.gelu_approximate = False  # torch.nn.GELU: the exact form.
  if layer_scale is not None:
    config.transformer.layer_scale = layer_scale
  if 'dist' in params:
    config.distilled = True
  if num_registers:
    config.num_registers = num_registers
  num_classes = params['head']['kernel'].shape[1] if 'head' in params else None
  names = (hub_config or {}).get('label_names')
  return common.Read(params, config, num_classes, (side * patch_h, side * patch_w),
                     class_names=list(names) if names and len(names) == num_classes else None,
                     resample='bicubic_antialias')


def read_hub_config(path: str) -> dict:
  """timm's config.json beside its weights on the Hub ({'architecture': ..., ...}), or {}."""
  config = os.path.join(path, 'config.json')
  if os.path.isfile(config):
    with open(config) as f:
      return json.load(f)
  return {}
