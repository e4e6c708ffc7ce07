"""timm `VisionTransformer` state dicts saved as .safetensors (`vit_*`, `deit_*`, `*_dinov2`,
`*_reg4_dinov2`, `*_siglip*`, `*_clip*`, `*_reg*_gap*`) as this codebase's parameter tree and
model config.

timm's files do not say their head count: it is read off the width as timm's own model
definitions set it (64 channels a head, except ViT-H/14 and ViT-g/14's 16 heads). Fused
`qkv` weights are split into query, key and value; position tables without slots for the prefix
tokens (`no_embed_class`: DeiT-3, DINOv2 with registers) get zero slots, which computes the same.
DINOv2-giant's packed SwiGLU MLP has an `mlp.fc1` twice as wide as `mlp.fc2` reads; `fc_norm`
(the final norm after average pooling, where `norm` is then absent) is pool_norm here.
"""

import os
import re

import numpy as np

from vit_jax import models
from vit_jax.layouts import common

HEADS_BY_WIDTH = {1280: 16, 1408: 16}  # Otherwise width // 64.


def is_state_dict(flat: dict) -> bool:
  return 'patch_embed.proj.weight' in flat


def _linear(flat, name):
  return {'kernel': flat.pop(f'{name}.weight').T, 'bias': flat.pop(f'{name}.bias')}


def _norm(flat, name):
  return {'scale': flat.pop(f'{name}.weight'), 'bias': flat.pop(f'{name}.bias')}


def read(path: str, flat: dict, hub_config: dict = None) -> common.Read:
  """A timm state dict as (params, model config, num_classes, image size, ...)."""
  flat = dict(flat)
  architecture = (hub_config or {}).get('architecture', '')
  clip = 'norm_pre.weight' in flat  # CLIP: a pre-norm, no patch embedding bias.
  if clip:
    flat.setdefault('patch_embed.proj.bias', np.zeros(flat['patch_embed.proj.weight'].shape[0],
                                                      np.float32))
  common.check_shape('patch_embed.proj.weight', flat['patch_embed.proj.weight'],
                     (None, 3, None, None), 'width, 3 colour channels, patch height and width')
  embedding = common.pop_conv(flat, 'patch_embed.proj')
  patch_h, patch_w, _, width = embedding['kernel'].shape
  heads = (hub_config or {}).get('model_args', {}).get('num_heads') or HEADS_BY_WIDTH.get(
      width, max(width // 64, 1))
  if not isinstance(heads, int) or heads < 1 or width % heads:
    raise common.WeightShapeError(
        f'its config.json\'s model_args.num_heads={heads!r} does not split the width {width} '
        '(of patch_embed.proj.weight) into attention heads.')
  head_dim = width // heads
  wide = f'the width {width} of patch_embed.proj.weight'
  params = {'embedding': embedding}
  prefix = []
  for name, ours in (('cls_token', 'cls'), ('dist_token', 'dist')):
    if name in flat:
      params[ours] = flat.pop(name)
      prefix.append(ours)
  if 'reg_token' in flat:
    params['registers'] = flat.pop('reg_token')
  table = flat.pop('pos_embed')
  common.check_shape('pos_embed', table, (1, None, width), f'one row per token, {wide}')
  num_layers = 1 + max((int(m.group(1)) for k in flat
                        if (m := re.match(r'blocks\.(\d+)\.', k))), default=-1)
  if not num_layers:
    raise KeyError('blocks.0.attn.qkv.weight')
  encoder = {}
  layer_scale = None
  # SwiGLUPacked: fc1 holds [gate; up], each as wide as fc2's input.
  swiglu = flat['blocks.0.mlp.fc1.weight'].shape[0] == 2 * flat['blocks.0.mlp.fc2.weight'].shape[1]
  for i in range(num_layers):
    block = f'blocks.{i}.'
    qkv_weight = flat.pop(f'{block}attn.qkv.weight')  # (3 D, D): query, key, value stacked.
    qkv_bias = flat.pop(f'{block}attn.qkv.bias', np.zeros(3 * width, qkv_weight.dtype))
    attention = common.split_qkv(qkv_weight, qkv_bias, heads, width,
                                 (f'{block}attn.qkv.weight', f'{block}attn.qkv.bias'))
    common.check_shape(f'{block}attn.proj.weight', flat[f'{block}attn.proj.weight'],
                       (width, width), wide)
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
  pool_norm = 'fc_norm.weight' in flat
  if pool_norm:
    params['pool_norm'] = _norm(flat, 'fc_norm')
  else:
    encoder['encoder_norm'] = _norm(flat, 'norm')
  if clip:
    encoder['pre_norm'] = _norm(flat, 'norm_pre')
  if 'attn_pool.latent' in flat:  # SigLIP: attention pooling (timm's AttentionPoolLatent).
    common.check_shape('attn_pool.q.weight', flat['attn_pool.q.weight'], (width, width), wide)
    common.check_shape('attn_pool.kv.weight', flat['attn_pool.kv.weight'], (2 * width, width),
                       f'key and value stacked: 2 x {wide}')
    common.check_shape('attn_pool.proj.weight', flat['attn_pool.proj.weight'], (width, width),
                       wide)
    key_value = flat.pop('attn_pool.kv.weight'), flat.pop('attn_pool.kv.bias')
    keys_values = common.split_qkv(
        np.concatenate([flat.pop('attn_pool.q.weight'), key_value[0]]),
        np.concatenate([flat.pop('attn_pool.q.bias'), key_value[1]]), heads, width,
        ('attn_pool.q.weight + attn_pool.kv.weight', 'attn_pool.q.bias + attn_pool.kv.bias'))
    keys_values['out'] = {'kernel': flat.pop('attn_pool.proj.weight').T.reshape(
        heads, head_dim, width), 'bias': flat.pop('attn_pool.proj.bias')}
    params['MAPHead_0'] = {
        'probe': flat.pop('attn_pool.latent'), 'MultiHeadDotProductAttention_0': keys_values,
        'LayerNorm_0': _norm(flat, 'attn_pool.norm'),
        'MlpBlock_0': {'Dense_0': _linear(flat, 'attn_pool.mlp.fc1'),
                       'Dense_1': _linear(flat, 'attn_pool.mlp.fc2')}}

  num_registers = params['registers'].shape[1] if 'registers' in params else 0
  side = int(round(np.sqrt(table.shape[1] - len(prefix))))
  if side * side == table.shape[1] - len(prefix):
    if num_registers and prefix:
      raise ValueError(f'{path}: position embeddings for register tokens are not supported.')
  else:  # no_embed_class: the table holds the patches only.
    side = int(round(np.sqrt(table.shape[1])))
    if side * side != table.shape[1]:
      raise ValueError(f'{path}: a position table of {table.shape[1]} entries is not a square '
                       'grid, with or without prefix tokens.')
    table = np.concatenate([np.zeros((1, len(prefix), width), table.dtype), table], axis=1)
  encoder['posembed_input'] = {'pos_embedding': table}
  params['Transformer'] = encoder
  for name in ('head', 'head_dist'):
    if f'{name}.weight' in flat:  # A classifier of the (pooled) tokens: as wide as they are.
      common.check_shape(f'{name}.weight', flat[f'{name}.weight'], (None, width),
                         f'one row per class, {wide}')
      common.check_shape(f'{name}.bias', flat[f'{name}.bias'],
                         (flat[f'{name}.weight'].shape[0],), f'one per row of {name}.weight')
      params[name] = _linear(flat, name)
  common.refuse_leftovers(flat, path)

  # Average pooling: what timm pairs with fc_norm unless its config.json says otherwise.
  global_pool = (hub_config or {}).get('global_pool') or ('avg' if pool_norm else 'token')
  if 'cls' in params and global_pool == 'avg':
    raise ValueError(f'{path}: a timm model that averages its tokens (fc_norm) but has a class '
                     'token, which vit_jax\'s average pooling (classifier=\'gap\') does not have.')
  config = models.vit_config(
      (hub_config or {}).get('architecture', f'timm:{os.path.basename(path)}'),
      hidden_size=width, mlp_dim=params['Transformer']['encoderblock_0']['MlpBlock_3']
      ['Dense_1']['kernel'].shape[0], num_heads=heads, num_layers=num_layers, patch=patch_h,
      classifier='map' if 'MAPHead_0' in params else 'token' if 'cls' in params else 'gap')
  config.patches.size = (patch_h, patch_w)
  config.transformer.gelu_approximate = False  # torch.nn.GELU: the exact form.
  if clip:  # timm's CLIP models: torch.nn.LayerNorm's epsilon; OpenAI's weights: quick GELU.
    config.transformer.pre_norm = True
    config.transformer.layer_norm_epsilon = 1e-5
    if 'quickgelu' in architecture:
      config.transformer.quick_gelu = True
  if layer_scale is not None:
    config.transformer.layer_scale = layer_scale
  if swiglu:
    config.transformer.swiglu = True
  if pool_norm:
    config.pool_norm = True
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
    return common.read_json(config)
  return {}


# ------------------------------------------------------------------------------------ writing

def write(read: common.Read, path: str) -> str:
  """`read` as a timm state dict (.safetensors); returns the timm.create_model(...) call that
  builds the model it loads into strictly."""
  config, params = read.config, read.params
  transformer = config.transformer
  problems = [p for p in common.plain_vit_problems(config, params)
              if config.classifier not in ('map', 'gap') or 'classifier' not in p]
  if 'pre_logits' in params:
    problems.append('a pre-logits layer (timm ViTs have none)')
  if config.get('distilled', False) and not config.get('distillation_head', True):
    problems.append('a distilled model with one head (timm\'s distilled DeiT has two)')
  clip = transformer.get('pre_norm', False)
  if clip and np.any(np.asarray(params['embedding']['bias'])):
    problems.append('a pre-norm (CLIP) model with a patch embedding bias')
  if problems:
    raise ValueError(f'Cannot write a timm model: {"; ".join(problems)}.')
  width = config.hidden_size
  encoder = params['Transformer']
  registers = config.get('num_registers', 0)
  conv = params['embedding']
  flat = {'patch_embed.proj.weight': np.asarray(conv['kernel']).transpose(3, 2, 0, 1)}
  if not clip:
    flat['patch_embed.proj.bias'] = np.asarray(conv['bias'])
  table = np.asarray(encoder['posembed_input']['pos_embedding'])
  prefix = 1 + bool(config.get('distilled', False))
  if registers:
    flat['reg_token'] = np.asarray(params['registers'])
  if 'cls' in params:
    cls = np.asarray(params['cls'])
    if registers:  # timm: no_embed_class; the class token's position folded into the token.
      cls = cls + table[:, :1]
      table = table[:, prefix:]
    flat['cls_token'] = cls
  flat['pos_embed'] = table
  if config.get('distilled', False):
    flat['dist_token'] = np.asarray(params['dist'])
  for i in range(transformer.num_layers):
    block, name = encoder[f'encoderblock_{i}'], f'blocks.{i}.'
    attention = block['MultiHeadDotProductAttention_1']
    flat[f'{name}attn.qkv.weight'], flat[f'{name}attn.qkv.bias'] = common.stack_qkv(attention)
    flat[f'{name}attn.proj.weight'] = np.asarray(attention['out']['kernel']).reshape(-1, width).T
    flat[f'{name}attn.proj.bias'] = np.asarray(attention['out']['bias'])
    for ours, theirs in (('LayerNorm_0', 'norm1'), ('LayerNorm_2', 'norm2')):
      flat[f'{name}{theirs}.weight'] = np.asarray(block[ours]['scale'])
      flat[f'{name}{theirs}.bias'] = np.asarray(block[ours]['bias'])
    for ours, theirs in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
      flat[f'{name}mlp.{theirs}.weight'] = np.asarray(block['MlpBlock_3'][ours]['kernel']).T
      flat[f'{name}mlp.{theirs}.bias'] = np.asarray(block['MlpBlock_3'][ours]['bias'])
    if 'layer_scale_attention' in block:
      flat[f'{name}ls1.gamma'] = np.asarray(block['layer_scale_attention']['scale'])
      flat[f'{name}ls2.gamma'] = np.asarray(block['layer_scale_mlp']['scale'])
  final_norm = params['pool_norm'] if 'pool_norm' in params else encoder['encoder_norm']
  final_name = 'fc_norm' if 'pool_norm' in params else 'norm'
  flat[f'{final_name}.weight'] = np.asarray(final_norm['scale'])
  flat[f'{final_name}.bias'] = np.asarray(final_norm['bias'])
  if clip:
    flat['norm_pre.weight'] = np.asarray(encoder['pre_norm']['scale'])
    flat['norm_pre.bias'] = np.asarray(encoder['pre_norm']['bias'])
  if 'MAPHead_0' in params:
    head = params['MAPHead_0']
    pooling = head['MultiHeadDotProductAttention_0']
    weight, bias = common.stack_qkv(pooling)
    flat['attn_pool.latent'] = np.asarray(head['probe'])
    flat['attn_pool.q.weight'], flat['attn_pool.q.bias'] = weight[:width], bias[:width]
    flat['attn_pool.kv.weight'], flat['attn_pool.kv.bias'] = weight[width:], bias[width:]
    flat['attn_pool.proj.weight'] = np.asarray(pooling['out']['kernel']).reshape(-1, width).T
    flat['attn_pool.proj.bias'] = np.asarray(pooling['out']['bias'])
    flat['attn_pool.norm.weight'] = np.asarray(head['LayerNorm_0']['scale'])
    flat['attn_pool.norm.bias'] = np.asarray(head['LayerNorm_0']['bias'])
    for ours, theirs in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
      flat[f'attn_pool.mlp.{theirs}.weight'] = np.asarray(head['MlpBlock_0'][ours]['kernel']).T
      flat[f'attn_pool.mlp.{theirs}.bias'] = np.asarray(head['MlpBlock_0'][ours]['bias'])
  for ours, theirs in (('head', 'head'), ('head_dist', 'head_dist')):
    if ours in params:
      flat[f'{theirs}.weight'] = np.asarray(params[ours]['kernel']).T
      flat[f'{theirs}.bias'] = np.asarray(params[ours]['bias'])
  common.write_safetensors(path, flat)
  return _create_model_call(read)


def _create_model_call(read: common.Read) -> str:
  """timm.create_model(...) for the architecture of `read`: a timm model of its family, with
  every keyword argument that defines the architecture (so that the family's defaults, such as
  the size in its name, do not matter)."""
  config = read.config
  transformer = config.transformer
  width, patch = config.hidden_size, config.patches.size[0]
  registers = config.get('num_registers', 0)
  swiglu = transformer.get('swiglu', False)
  if config.classifier == 'map':
    name = 'vit_base_patch16_siglip_224'
  elif transformer.get('pre_norm', False):
    quick = '_quickgelu' if transformer.get('quick_gelu', False) else ''
    name = f'vit_base_patch16_clip{quick}_224'
  elif config.get('distilled', False):
    name = 'deit_base_distilled_patch16_224'
  elif config.classifier == 'gap':
    name = 'vit_medium_patch16_reg4_gap_256' if registers else 'vit_base_patch16_gap_224'
  elif swiglu:
    name = 'vit_giant_patch14_dinov2'
  elif registers:
    name = 'vit_base_patch14_reg4_dinov2'
  elif transformer.get('layer_scale') is not None:
    name = 'vit_base_patch14_dinov2'
  else:
    name = 'vit_base_patch16_224'
  args = dict(embed_dim=width, depth=transformer.num_layers, num_heads=transformer.num_heads,
              mlp_ratio=transformer.mlp_dim * (2 if swiglu else 1) / width, patch_size=patch,
              img_size=tuple(int(s) for s in read.image_size),
              num_classes=read.num_classes or 0,
              init_values=(None if transformer.get('layer_scale') is None else
                           float(transformer.layer_scale)),
              reg_tokens=int(registers), no_embed_class=bool(registers))
  if config.classifier == 'gap':
    args.update(class_token=False, global_pool='avg')
  if config.classifier != 'map':
    args['fc_norm'] = bool(config.get('pool_norm', False))
  text = ', '.join(f'{k}={v!r}' for k, v in args.items())
  extra = []
  if swiglu:  # timm's DINOv2-giant MLP: one fc1 holding [gate; up].
    extra.append("mlp_layer=timm.layers.SwiGLUPacked, act_layer='silu'")
  elif transformer.get('quick_gelu', False):
    extra.append("act_layer='quick_gelu'")
  elif transformer.get('gelu_approximate', True):
    extra.append("act_layer='gelu_tanh'")
  else:
    extra.append("act_layer='gelu'")
  epsilon = transformer.get('layer_norm_epsilon', 1e-6)
  extra.append(f'norm_layer=functools.partial(torch.nn.LayerNorm, eps={epsilon!r})')
  return f"timm.create_model({name!r}, pretrained=False, {', '.join([text] + extra)})"
