"""Hugging Face `transformers` model directories (config.json + model.safetensors, sharded too):
ViTModel / ViTForImageClassification, DeiTModel / DeiTForImageClassification(WithTeacher),
Dinov2(WithRegisters)Model / ...ForImageClassification (SwiGLU MLP of the giant model too),
SiglipVisionModel and CLIPVisionModel (or the vision tower of the full model), as this
codebase's parameter tree and model config.

The key names are those of the files on the Hub (transformers v5 renames modules in memory but
writes these names back when it saves). PyTorch's Linear stores (out, in): kernels transpose.
"""

import math
import os
import re
from typing import Optional

import numpy as np

from vit_jax import models
from vit_jax.layouts import common

# model_type -> the prefix its *For... wrappers put before the backbone's keys.
PREFIXES = {'vit': 'vit.', 'deit': 'deit.', 'dinov2': 'dinov2.',
            'dinov2_with_registers': 'dinov2_with_registers.'}
# The full model (its vision tower is read) or the tower alone.
SIGLIP, CLIP = ('siglip', 'siglip_vision_model'), ('clip', 'clip_vision_model')


def is_model_dir(path: str) -> bool:
  config = os.path.join(path, 'config.json')
  if not os.path.isfile(config):
    return False
  return 'model_type' in common.read_json(config)


def _linear(flat: dict, name: str, out: tuple, inputs=None, why: str = ''):
  """`name`.weight (out, in) as a kernel (in, *out), and its bias shaped `out`; a weight of
  another shape than (prod(out), `inputs`) (None, -1: any size) is refused, naming it."""
  rows = None if -1 in out else int(np.prod(out))
  common.check_shape(f'{name}.weight', flat[f'{name}.weight'], (rows, inputs), why)
  if f'{name}.bias' in flat:
    common.check_shape(f'{name}.bias', flat[f'{name}.bias'],
                       (flat[f'{name}.weight'].shape[0],), f'one per row of {name}.weight')
  weight = flat.pop(f'{name}.weight')
  kernel = weight.T.reshape((weight.shape[1],) + out)
  bias = flat.pop(f'{name}.bias', None)
  return kernel, (np.zeros(out, kernel.dtype) if bias is None else bias.reshape(out))


def _norm(flat: dict, name: str) -> dict:
  return {'scale': flat.pop(f'{name}.weight'), 'bias': flat.pop(f'{name}.bias')}


def _config_fits(flat: dict, hf: dict, conv_key: str, path: str, prefix: str = '') -> tuple:
  """(width, heads, patch) of config.json (`hf`: its vision part), checked against the patch
  embedding the weights hold (`conv_key`): a config.json that disagrees with its weights is
  refused naming the field (`prefix`: where config.json nests `hf`) and the weight."""
  where = os.path.join(path, 'config.json')
  for field in ('hidden_size', 'num_attention_heads'):
    if not isinstance(hf.get(field), int) or hf[field] < 1:
      raise ValueError(f'{where}: {prefix}{field}={hf.get(field)!r}; expected a positive '
                       'integer.')
  width, heads = hf['hidden_size'], hf['num_attention_heads']
  conv = flat[conv_key]
  common.check_shape(conv_key, conv, (None, 3, None, None),
                     'width, 3 colour channels, patch height and width')
  patch = hf.get('patch_size', tuple(conv.shape[2:]))  # Absent: the weights' (as they are).
  patch = tuple(patch) if isinstance(patch, (list, tuple)) else (patch, patch)
  if conv.shape[0] != width:
    raise common.CheckpointMismatchError(
        f'{where} says {prefix}hidden_size={width}, but its weights are {conv.shape[0]} wide: '
        f'{conv_key} is {tuple(conv.shape)}, expected ({width}, 3, {patch[0]}, {patch[1]}).')
  if tuple(conv.shape[2:]) != patch:
    raise common.CheckpointMismatchError(
        f'{where} says {prefix}patch_size={hf["patch_size"]!r}, but {conv_key} is '
        f'{tuple(conv.shape)}: {conv.shape[2]}x{conv.shape[3]} patches.')
  if width % heads:
    raise ValueError(f'{where}: {prefix}num_attention_heads={heads} does not divide '
                     f'{prefix}hidden_size={width} into heads of equal width.')
  return width, heads, patch


def _layers_fit(hf: dict, num_layers: int, pattern: str, path: str, prefix: str = ''):
  """A config.json whose num_hidden_layers is not the number of layers its weights hold is
  refused naming both."""
  said = hf.get('num_hidden_layers')
  if said is not None and said != num_layers:
    raise common.CheckpointMismatchError(
        f'{os.path.join(path, "config.json")} says {prefix}num_hidden_layers={said!r}, but its '
        f'weights hold {num_layers} layers ({pattern.format(0)} .. {pattern.format(num_layers - 1)}).')


def read(path: str) -> common.Read:
  """A Hugging Face model directory as (params, model config, num_classes, image size, ...)."""
  hf = common.read_json(os.path.join(path, 'config.json'))
  model_type = hf.get('model_type')
  if model_type in SIGLIP + CLIP:
    return _read_tower(path, hf)
  if model_type not in PREFIXES:
    raise ValueError(f'{path} is a Hugging Face {model_type!r} model, not a ViT family vit_jax '
                     f'reads ({sorted(PREFIXES)}).')
  flat = common.read_safetensors_dir(path)
  prefix = PREFIXES[model_type]
  flat = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in flat.items()}

  width, heads, patch = _config_fits(flat, hf, 'embeddings.patch_embeddings.projection.weight',
                                     path)
  head_dim = width // heads
  wide = f'hidden_size={width}'
  dinov2 = model_type.startswith('dinov2')
  swiglu = dinov2 and bool(hf.get('use_swiglu_ffn'))  # weights_in: [gate; up] stacked.
  params = {'embedding': common.pop_conv(flat, 'embeddings.patch_embeddings.projection')}
  params['cls'] = flat.pop('embeddings.cls_token')
  distilled = 'embeddings.distillation_token' in flat
  if distilled:
    params['dist'] = flat.pop('embeddings.distillation_token')
  registers = flat.pop('embeddings.register_tokens', None)
  if registers is not None:
    params['registers'] = registers
  flat.pop('embeddings.mask_token', None)  # Masked image modelling only.
  encoder = {'posembed_input': {'pos_embedding': flat.pop('embeddings.position_embeddings')}}
  common.check_shape('embeddings.position_embeddings', encoder['posembed_input']['pos_embedding'],
                     (1, None, width), f'one row per token, {wide}')
  num_layers = 1 + max((int(m.group(1)) for k in flat
                        if (m := re.match(r'encoder\.layer\.(\d+)\.', k))), default=-1)
  if not num_layers:
    raise KeyError('encoder.layer.0.attention.attention.query.weight')
  _layers_fit(hf, num_layers, 'encoder.layer.{}', path)
  for i in range(num_layers):
    layer = f'encoder.layer.{i}.'
    attention = {}
    for name in ('query', 'key', 'value'):
      k, b = _linear(flat, f'{layer}attention.attention.{name}', (heads, head_dim), width, wide)
      attention[name] = {'kernel': k, 'bias': b}
    common.check_shape(f'{layer}attention.output.dense.weight',
                       flat[f'{layer}attention.output.dense.weight'], (width, width), wide)
    out_weight = flat.pop(f'{layer}attention.output.dense.weight')
    attention['out'] = {'kernel': out_weight.T.reshape(heads, head_dim, width),
                        'bias': flat.pop(f'{layer}attention.output.dense.bias')}
    mlp_in, mlp_out = (
        (f'{layer}mlp.weights_in', f'{layer}mlp.weights_out') if swiglu else
        (f'{layer}mlp.fc1', f'{layer}mlp.fc2') if dinov2 else
        (f'{layer}intermediate.dense', f'{layer}output.dense'))
    block = {
        'LayerNorm_0': _norm(flat, f'{layer}{"norm1" if dinov2 else "layernorm_before"}'),
        'MultiHeadDotProductAttention_1': attention,
        'LayerNorm_2': _norm(flat, f'{layer}{"norm2" if dinov2 else "layernorm_after"}'),
        'MlpBlock_3': {'Dense_0': dict(zip(('kernel', 'bias'), _linear(flat, mlp_in, (-1,),
                                                                      width, wide))),
                       'Dense_1': dict(zip(('kernel', 'bias'), _linear(flat, mlp_out, (width,))))},
    }
    if dinov2:
      block['layer_scale_attention'] = {'scale': flat.pop(f'{layer}layer_scale1.lambda1')}
      block['layer_scale_mlp'] = {'scale': flat.pop(f'{layer}layer_scale2.lambda1')}
    encoder[f'encoderblock_{i}'] = block
  encoder['encoder_norm'] = _norm(flat, 'layernorm')
  params['Transformer'] = encoder
  if 'pooler.dense.weight' in flat:  # ViTModel's pooler: dense + tanh, the pre-logits.
    k, b = _linear(flat, 'pooler.dense', (-1,), width, f'a pooler of the class token, {wide}')
    params['pre_logits'] = {'kernel': k, 'bias': b}
  heads_in_file = {'classifier': 'head', 'cls_classifier': 'head',
                   'distillation_classifier': 'head_dist'}
  for name, ours in heads_in_file.items():
    if f'{name}.weight' in flat:
      inputs = params['pre_logits']['kernel'].shape[1] if 'pre_logits' in params else width
      if dinov2 and name == 'classifier' and np.shape(flat[f'{name}.weight'])[1:] == (2 * width,):
        inputs = 2 * width  # The class token beside the mean patch token.
      k, b = _linear(flat, name, (-1,), inputs, f'one row per class, {wide}' + (
          ' (or twice that: DINOv2\'s class and mean patch token)' if dinov2 else ''))
      params[ours] = {'kernel': k, 'bias': b}
  if 'head_dist' in params and 'head' not in params:
    raise common.CheckpointMismatchError(
        f'{path}: a distillation_classifier without the cls_classifier beside it.')
  # Dinov2ForImageClassification reads the class token beside the mean patch token.
  token_and_gap = 'head' in params and params['head']['kernel'].shape[0] == 2 * width
  common.refuse_leftovers(flat, path)

  mlp_dim = params['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel'].shape[1]
  mlp_dim //= 2 if swiglu else 1
  config = models.vit_config(
      f'hf:{hf.get("_name_or_path") or os.path.basename(os.path.normpath(path))}',
      hidden_size=width, mlp_dim=mlp_dim, num_heads=heads, num_layers=num_layers, patch=patch[0],
      representation_size=params['pre_logits']['kernel'].shape[1] if 'pre_logits' in params
      else None, classifier='token_and_gap' if token_and_gap else 'token')
  config.patches.size = patch
  act = hf.get('hidden_act', 'gelu')
  if act not in ('gelu', 'gelu_new', 'gelu_pytorch_tanh'):
    raise ValueError(f'{path}: hidden_act={act!r} is not supported (gelu, gelu_pytorch_tanh).')
  config.transformer.gelu_approximate = act != 'gelu'
  config.transformer.layer_norm_epsilon = float(
      hf.get('layer_norm_eps', 1e-6 if dinov2 else 1e-12))
  if dinov2:
    config.transformer.layer_scale = float(hf.get('layerscale_value', 1.0))
  if swiglu:
    config.transformer.swiglu = True
  if distilled:
    config.distilled = True
    if 'head' in params and 'head_dist' not in params:  # DeiTForImageClassification.
      config.distillation_head = False
  if registers is not None:
    config.num_registers = int(registers.shape[1])
  size = hf.get('image_size', 518 if dinov2 else 224)
  size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
  grid = (size[0] // patch[0], size[1] // patch[1])
  table = encoder['posembed_input']['pos_embedding']
  if table.shape[1] - 1 - distilled != grid[0] * grid[1]:  # Trust the table over the config.
    side = int(round((table.shape[1] - 1 - distilled) ** 0.5))
    size = (side * patch[0], side * patch[1])
  num_classes = params['head']['kernel'].shape[1] if 'head' in params else None
  labels = hf.get('id2label') or {}
  class_names = ([labels.get(str(i), str(i)) for i in range(num_classes)]
                 if num_classes and labels and len(labels) == num_classes else None)
  return common.Read(params, config, num_classes, size, multi_label=(
      hf.get('problem_type') == 'multi_label_classification'), class_names=class_names,
                     # As each model's interpolate_pos_encoding: DINOv2 with registers
                     # filters (antialias=True), the others do not.
                     resample=('bicubic_antialias' if model_type == 'dinov2_with_registers'
                               else 'bicubic'), preprocessing=preprocessing(path),
                     resize=resize(path))


def preprocessing(path: str):
  """The mean / std the file's image processor normalises with (None: [-1, 1]); values that
  do not normalise (a std of 0 or below, NaN, not one per RGB channel) are refused by name."""
  processor = os.path.join(path, 'preprocessor_config.json')
  if not os.path.isfile(processor):
    return None
  config = common.read_json(processor)
  if 'image_mean' not in config and 'image_std' not in config:
    return None
  number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
  values = {}
  for ours, theirs in (('mean', 'image_mean'), ('std', 'image_std')):
    value = config.get(theirs)
    if number(value):  # One number for every channel, as transformers' normalize takes it.
      value = [value] * 3
    if not (isinstance(value, list) and len(value) == 3 and all(number(x) for x in value)):
      raise ValueError(f'{processor}: {theirs}={config.get(theirs)!r}; expected three numbers '
                       '(one per RGB channel) or one for all three.')
    if not all(math.isfinite(x) for x in value):
      raise ValueError(f'{processor}: {theirs}={config.get(theirs)!r} is not finite.')
    if ours == 'std' and min(value) <= 0:
      raise ValueError(f'{processor}: {theirs}={config.get(theirs)!r}; a standard deviation '
                       'must be positive (the pixels are divided by it).')
    values[ours] = [float(x) for x in value]
  return values


# PIL's resampling filters, as image processors name them (transformers' PILImageResampling).
RESAMPLING = {2: 'bilinear', 3: 'bicubic'}


def resize(path: str) -> Optional[dict]:
  """The resize and centre crop the file's image processor applies (Read.resize), where it
  resizes the shorter side; None where it resizes straight to a size (ViT, DeiT) or says
  nothing."""
  processor = os.path.join(path, 'preprocessor_config.json')
  if not os.path.isfile(processor):
    return None
  config = common.read_json(processor)
  size = config.get('size')
  shortest = size.get('shortest_edge') if isinstance(size, dict) else None
  if not config.get('do_resize', True) or shortest is None:
    return None
  crop = config.get('crop_size') if config.get('do_center_crop', False) else None
  if isinstance(crop, int):
    crop = {'height': crop, 'width': crop}
  crop = [crop['height'], crop['width']] if isinstance(crop, dict) else [shortest, shortest]
  method = config.get('resample', 3)
  if method not in RESAMPLING or not all(isinstance(v, int) and v > 0 for v in
                                          [shortest, *crop]):
    raise ValueError(f'{processor}: size={size!r}, crop_size={config.get("crop_size")!r}, '
                     f'resample={method!r}; expected positive whole sizes and resample 2 '
                     '(bilinear) or 3 (bicubic).')
  return {'shortest_edge': shortest, 'crop': crop, 'method': RESAMPLING[method]}


def _processor_file(read: common.Read) -> dict:
  config = processor_config(read)
  return {} if config is None else {'preprocessor_config.json': config}


def processor_config(read: common.Read) -> Optional[dict]:
  """preprocessor_config.json for a written model: its normalisation and resize, as read."""
  if read.preprocessing is None and read.resize is None:
    return None
  mean, std = ((read.preprocessing['mean'], read.preprocessing['std']) if read.preprocessing
               else ([0.5] * 3, [0.5] * 3))  # [-1, 1]: (x - 0.5) / 0.5.
  config = {'image_processor_type': 'CLIPImageProcessor' if read.resize else
            'ViTImageProcessor', 'do_normalize': True, 'image_mean': mean, 'image_std': std,
            'do_rescale': True, 'rescale_factor': 1 / 255, 'do_resize': True}
  if read.resize:
    method = {v: k for k, v in RESAMPLING.items()}[read.resize['method']]
    crop = read.resize['crop']
    config.update(size={'shortest_edge': read.resize['shortest_edge']}, do_center_crop=True,
                  crop_size={'height': crop[0], 'width': crop[1]}, resample=method)
  else:
    config.update(size={'height': int(read.image_size[0]), 'width': int(read.image_size[1])},
                  resample=2)
  return config


# ------------------------------------------------------------------------------------ writing

def _unlinear(kernel, bias) -> tuple:
  """A kernel (in, *out) and bias as PyTorch's Linear (out, in) weight and (out,) bias."""
  kernel = np.asarray(kernel)
  weight = kernel.reshape(kernel.shape[0], -1).T
  return weight, np.asarray(bias).reshape(-1)


def write(read: common.Read, path: str):
  """`read` (this codebase's params and config) as a Hugging Face model directory that
  transformers loads: ViT(Model|ForImageClassification), DeiT(Model|ForImageClassification|
  ForImageClassificationWithTeacher), Dinov2(WithRegisters)(Model|ForImageClassification).
  Raises ValueError naming what the family cannot express."""
  config, params = read.config, read.params
  if config.classifier == 'map' or config.transformer.get('pre_norm', False):
    return _write_tower(read, path)
  transformer = config.transformer
  token_and_gap = config.classifier == 'token_and_gap'
  problems = [p for p in common.plain_vit_problems(config, params)
              if not (token_and_gap and 'classifier' in p)]
  patch = tuple(config.patches.size)
  if patch[0] != patch[1]:
    problems.append(f'patch {patch} is not square')
  if config.get('pool_norm', False):
    problems.append('a LayerNorm after pooling (timm\'s fc_norm)')
  swiglu = transformer.get('swiglu', False)
  dinov2 = (transformer.get('layer_scale') is not None or config.get('num_registers', 0) > 0 or
            swiglu or token_and_gap)
  distilled = config.get('distilled', False)
  if dinov2 and 'pre_logits' in params:
    problems.append('a DINOv2 model (LayerScale / registers) with a pre-logits layer')
  if dinov2 and 'head' in params and not token_and_gap:
    problems.append("a DINOv2 model with a head on the class token alone (Dinov2ForImage"
                    "Classification's reads classifier='token_and_gap')")
  if distilled and 'pre_logits' in params:
    problems.append('a distilled model with a pre-logits layer')
  if 'pre_logits' in params and 'head' in params:
    problems.append('a pre-logits layer and a head (ViTModel has the pooler, '
                    'ViTForImageClassification the head)')
  if problems:
    raise ValueError(f'Cannot write a Hugging Face model: {"; ".join(problems)}.')
  model_type = ('dinov2_with_registers' if config.get('num_registers', 0) else
                'dinov2' if dinov2 else 'deit' if distilled else 'vit')
  width = config.hidden_size
  encoder = params['Transformer']
  num_layers = transformer.num_layers
  flat = {}
  conv = params['embedding']
  flat['embeddings.patch_embeddings.projection.weight'] = np.asarray(
      conv['kernel']).transpose(3, 2, 0, 1)
  flat['embeddings.patch_embeddings.projection.bias'] = np.asarray(conv['bias'])
  flat['embeddings.cls_token'] = np.asarray(params['cls'])
  if distilled:
    flat['embeddings.distillation_token'] = np.asarray(params['dist'])
  if 'registers' in params:
    flat['embeddings.register_tokens'] = np.asarray(params['registers'])
  flat['embeddings.position_embeddings'] = np.asarray(
      encoder['posembed_input']['pos_embedding'])
  if dinov2:
    flat['embeddings.mask_token'] = np.zeros((1, width), np.float32)  # Dinov2Model has one.
  for i in range(num_layers):
    block, layer = encoder[f'encoderblock_{i}'], f'encoder.layer.{i}.'
    names = (('norm1', 'norm2', 'mlp.weights_in', 'mlp.weights_out') if swiglu else
             ('norm1', 'norm2', 'mlp.fc1', 'mlp.fc2') if dinov2 else
             ('layernorm_before', 'layernorm_after', 'intermediate.dense', 'output.dense'))
    for ours, theirs in zip(('LayerNorm_0', 'LayerNorm_2'), names[:2]):
      flat[f'{layer}{theirs}.weight'] = np.asarray(block[ours]['scale'])
      flat[f'{layer}{theirs}.bias'] = np.asarray(block[ours]['bias'])
    attention = block['MultiHeadDotProductAttention_1']
    for name in ('query', 'key', 'value'):
      weight, bias = _unlinear(attention[name]['kernel'], attention[name]['bias'])
      flat[f'{layer}attention.attention.{name}.weight'] = weight
      flat[f'{layer}attention.attention.{name}.bias'] = bias
    out = np.asarray(attention['out']['kernel'])
    flat[f'{layer}attention.output.dense.weight'] = out.reshape(-1, width).T
    flat[f'{layer}attention.output.dense.bias'] = np.asarray(attention['out']['bias'])
    for ours, theirs in zip(('Dense_0', 'Dense_1'), names[2:]):
      weight, bias = _unlinear(block['MlpBlock_3'][ours]['kernel'],
                               block['MlpBlock_3'][ours]['bias'])
      flat[f'{layer}{theirs}.weight'], flat[f'{layer}{theirs}.bias'] = weight, bias
    if dinov2:
      flat[f'{layer}layer_scale1.lambda1'] = np.asarray(block['layer_scale_attention']['scale'])
      flat[f'{layer}layer_scale2.lambda1'] = np.asarray(block['layer_scale_mlp']['scale'])
  flat['layernorm.weight'] = np.asarray(encoder['encoder_norm']['scale'])
  flat['layernorm.bias'] = np.asarray(encoder['encoder_norm']['bias'])
  if 'pre_logits' in params:
    flat['pooler.dense.weight'], flat['pooler.dense.bias'] = _unlinear(
        params['pre_logits']['kernel'], params['pre_logits']['bias'])

  heads = {}
  with_teacher = distilled and config.get('distillation_head', True)
  if 'head' in params:
    heads['cls_classifier' if with_teacher else 'classifier'] = params['head']
  if 'head_dist' in params:
    heads['distillation_classifier'] = params['head_dist']
  if heads:  # The *For...Classification wrappers prefix the backbone.
    flat = {f'{model_type}.{k}': v for k, v in flat.items()}
    for name, head in heads.items():
      flat[f'{name}.weight'], flat[f'{name}.bias'] = _unlinear(head['kernel'], head['bias'])
  architecture = {
      'vit': 'ViTForImageClassification' if heads else 'ViTModel',
      'deit': ('DeiTModel' if not heads else 'DeiTForImageClassificationWithTeacher'
               if with_teacher else 'DeiTForImageClassification'),
      'dinov2': 'Dinov2ForImageClassification' if heads else 'Dinov2Model',
      'dinov2_with_registers': ('Dinov2WithRegistersForImageClassification' if heads else
                                'Dinov2WithRegistersModel')}[model_type]
  mlp_dim = transformer.mlp_dim
  hf = dict(model_type=model_type, architectures=[architecture], hidden_size=width,
            num_hidden_layers=num_layers, num_attention_heads=transformer.num_heads,
            hidden_act='gelu_pytorch_tanh' if transformer.get('gelu_approximate', True) else
            'gelu', hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            layer_norm_eps=float(transformer.get('layer_norm_epsilon', 1e-6)),
            image_size=int(read.image_size[0]), patch_size=int(patch[0]), num_channels=3,
            qkv_bias=True)
  if read.image_size[0] != read.image_size[1]:
    hf['image_size'] = [int(s) for s in read.image_size]
  if dinov2:
    hf.update(mlp_ratio=_mlp_ratio(mlp_dim, width, swiglu),
              layerscale_value=float(transformer.get('layer_scale') or 1.0),
              use_swiglu_ffn=bool(swiglu), drop_path_rate=0.0)
    if config.get('num_registers', 0):
      hf['num_register_tokens'] = int(config.num_registers)
  else:
    hf['intermediate_size'] = int(mlp_dim)
  if 'pre_logits' in params:
    hf.update(pooler_output_size=int(params['pre_logits']['kernel'].shape[1]), pooler_act='tanh')
  if read.num_classes:
    names = read.class_names or [f'LABEL_{i}' for i in range(read.num_classes)]
    hf['id2label'] = {str(i): name for i, name in enumerate(names)}
    hf['label2id'] = {name: i for i, name in enumerate(names)}
    if read.multi_label:
      hf['problem_type'] = 'multi_label_classification'
  common.write_model_dir(path, flat, hf, _processor_file(read))


def _mlp_ratio(mlp_dim: int, width: int, swiglu: bool) -> int:
  """The (integer: transformers' Dinov2Config types it so) mlp_ratio from which transformers
  builds an MLP of `mlp_dim`: width * ratio hidden units, or for SwiGLU two thirds of that
  rounded up to a multiple of 8."""
  ratio = max(round((1.5 if swiglu else 1) * mlp_dim / width), 1)
  built = width * ratio
  if swiglu:
    built = (int(built * 2 / 3) + 7) // 8 * 8
  if built != mlp_dim:
    raise ValueError(f'Cannot write a Hugging Face DINOv2 model: its config (an integer '
                     f'mlp_ratio) cannot express an MLP of {mlp_dim} '
                     f'({"SwiGLU, " if swiglu else ""}width {width}).')
  return ratio


def _read_tower(path: str, hf: dict) -> common.Read:
  """The vision tower of SigLIP or CLIP (a *VisionModel, or the full image-text model).

  SigLIP: no class token, a learned table of the patches only, the final LayerNorm
  (`post_layernorm`) and multi-head attention pooling (`head`: a probe attending to every
  token), which is classifier='map' here. CLIP: a class token (`class_embedding`), a patch
  embedding without bias, a LayerNorm before the first block (`pre_layrnorm`: pre_norm here),
  quick GELU, and `post_layernorm` on the class token (here on every token, then the class
  token is read: the same output).
  """
  clip = hf['model_type'] in CLIP
  vision = hf.get('vision_config', hf) if hf['model_type'] in ('siglip', 'clip') else hf
  flat = {}
  for key, value in common.read_safetensors_dir(path).items():
    if key.startswith('text_model.') or key in ('logit_scale', 'logit_bias',
                                                'text_projection.weight',
                                                'visual_projection.weight'):
      continue  # The text tower and the projections to the joint space.
    flat[key[len('vision_model.'):] if key.startswith('vision_model.') else key] = value
  flat.pop('embeddings.position_ids', None)  # A buffer some versions saved.
  nested = 'vision_config.' if vision is not hf else ''
  width, heads, patch = _config_fits(flat, vision, 'embeddings.patch_embedding.weight', path,
                                     nested)
  head_dim = width // heads
  wide = f'{nested}hidden_size={width}'
  attention_of = lambda prefix, names: {
      ours: dict(zip(('kernel', 'bias'), _linear(flat, f'{prefix}{theirs}', (heads, head_dim),
                                                 width, wide)))
      for ours, theirs in names}
  square = lambda key: common.check_shape(key, flat[key], (width, width), wide)
  if clip:
    flat.setdefault('embeddings.patch_embedding.bias', np.zeros(width, np.float32))
  params = {'embedding': common.pop_conv(flat, 'embeddings.patch_embedding')}
  if clip:
    common.check_shape('embeddings.class_embedding', flat['embeddings.class_embedding'],
                       (width,), wide)
    params['cls'] = flat.pop('embeddings.class_embedding').reshape(1, 1, width)
  common.check_shape('embeddings.position_embedding.weight',
                     flat['embeddings.position_embedding.weight'], (None, width),
                     f'one row per token, {wide}')
  encoder = {'posembed_input': {
      'pos_embedding': flat.pop('embeddings.position_embedding.weight')[None]}}
  if clip:
    encoder['pre_norm'] = _norm(flat, 'pre_layrnorm')
  num_layers = 1 + max((int(m.group(1)) for k in flat
                        if (m := re.match(r'encoder\.layers\.(\d+)\.', k))), default=-1)
  if not num_layers:
    raise KeyError('encoder.layers.0.self_attn.q_proj.weight')
  _layers_fit(vision, num_layers, 'encoder.layers.{}', path, nested)
  for i in range(num_layers):
    layer = f'encoder.layers.{i}.'
    attention = attention_of(f'{layer}self_attn.', (('query', 'q_proj'), ('key', 'k_proj'),
                                                   ('value', 'v_proj')))
    square(f'{layer}self_attn.out_proj.weight')
    out = flat.pop(f'{layer}self_attn.out_proj.weight')
    attention['out'] = {'kernel': out.T.reshape(heads, head_dim, width),
                        'bias': flat.pop(f'{layer}self_attn.out_proj.bias')}
    encoder[f'encoderblock_{i}'] = {
        'LayerNorm_0': _norm(flat, f'{layer}layer_norm1'),
        'MultiHeadDotProductAttention_1': attention,
        'LayerNorm_2': _norm(flat, f'{layer}layer_norm2'),
        'MlpBlock_3': {'Dense_0': dict(zip(('kernel', 'bias'),
                                           _linear(flat, f'{layer}mlp.fc1', (-1,), width,
                                                   wide))),
                       'Dense_1': dict(zip(('kernel', 'bias'),
                                           _linear(flat, f'{layer}mlp.fc2', (width,))))}}
  encoder['encoder_norm'] = _norm(flat, 'post_layernorm')
  params['Transformer'] = encoder
  classifier = 'token' if clip else 'gap'
  if 'head.probe' in flat:  # torch.nn.MultiheadAttention: query, key, value stacked.
    classifier = 'map'
    stacked_w, stacked_b = flat.pop('head.attention.in_proj_weight'), flat.pop(
        'head.attention.in_proj_bias')
    attention = common.split_qkv(stacked_w, stacked_b, heads, width, (
        'head.attention.in_proj_weight', 'head.attention.in_proj_bias'))
    square('head.attention.out_proj.weight')
    out = flat.pop('head.attention.out_proj.weight')
    attention['out'] = {'kernel': out.T.reshape(heads, head_dim, width),
                        'bias': flat.pop('head.attention.out_proj.bias')}
    params['MAPHead_0'] = {
        'probe': flat.pop('head.probe'), 'MultiHeadDotProductAttention_0': attention,
        'LayerNorm_0': _norm(flat, 'head.layernorm'),
        'MlpBlock_0': {'Dense_0': dict(zip(('kernel', 'bias'),
                                           _linear(flat, 'head.mlp.fc1', (-1,), width,
                                                   wide))),
                       'Dense_1': dict(zip(('kernel', 'bias'),
                                           _linear(flat, 'head.mlp.fc2', (width,))))}}
  common.refuse_leftovers(flat, path)
  patch = patch[0]
  mlp_dim = encoder['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel'].shape[1]
  config = models.vit_config(
      f'hf:{hf.get("_name_or_path") or os.path.basename(os.path.normpath(path))}',
      hidden_size=width, mlp_dim=mlp_dim, num_heads=heads, num_layers=num_layers, patch=patch,
      classifier=classifier)
  act = vision.get('hidden_act', 'quick_gelu' if clip else 'gelu_pytorch_tanh')
  if act not in ('gelu', 'gelu_pytorch_tanh', 'quick_gelu'):
    raise ValueError(f'{path}: hidden_act={act!r} is not supported.')
  config.transformer.gelu_approximate = act != 'gelu'
  if act == 'quick_gelu':
    config.transformer.quick_gelu = True
  if clip:
    config.transformer.pre_norm = True
  config.transformer.layer_norm_epsilon = float(
      vision.get('layer_norm_eps', 1e-5 if clip else 1e-6))
  side = int(round((encoder['posembed_input']['pos_embedding'].shape[1] - clip) ** 0.5))
  return common.Read(params, config, None, (side * patch, side * patch), resample='bicubic',
                     preprocessing=preprocessing(path), resize=resize(path))


def _write_tower(read: common.Read, path: str):
  """An attention-pooled model without class token as a SiglipVisionModel directory; one with a
  pre-norm, quick GELU and a bias-free patch embedding as a CLIPVisionModel directory."""
  config, params = read.config, read.params
  transformer = config.transformer
  clip = config.classifier != 'map'
  family = 'CLIP' if clip else 'SigLIP'
  problems = [p for p in common.plain_vit_problems(config, params)
              if clip or 'classifier' not in p]
  if clip and (np.any(np.asarray(params['embedding']['bias'])) or
               not transformer.get('quick_gelu', False)):
    problems.append('a patch embedding bias or an activation other than quick GELU')
  if 'head' in params or 'pre_logits' in params:
    problems.append('a head or pre-logits layer')
  if tuple(config.patches.size)[0] != tuple(config.patches.size)[1]:
    problems.append('a patch that is not square')
  if problems:
    raise ValueError(f'Cannot write a Hugging Face {family} vision model: '
                     f'{"; ".join(problems)}.')
  width = config.hidden_size
  encoder = params['Transformer']
  flat = {'embeddings.patch_embedding.weight': np.asarray(
      params['embedding']['kernel']).transpose(3, 2, 0, 1),
          'embeddings.position_embedding.weight': np.asarray(
              encoder['posembed_input']['pos_embedding'])[0]}
  if clip:
    flat['embeddings.class_embedding'] = np.asarray(params['cls']).reshape(width)
  else:
    flat['embeddings.patch_embedding.bias'] = np.asarray(params['embedding']['bias'])
  def attention_out(attention, prefix):
    flat[f'{prefix}.weight'] = np.asarray(attention['out']['kernel']).reshape(-1, width).T
    flat[f'{prefix}.bias'] = np.asarray(attention['out']['bias'])
  def norm(ours, theirs):
    flat[f'{theirs}.weight'], flat[f'{theirs}.bias'] = (np.asarray(ours['scale']),
                                                        np.asarray(ours['bias']))
  def mlp(ours, theirs):
    for dense, fc in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
      flat[f'{theirs}.{fc}.weight'], flat[f'{theirs}.{fc}.bias'] = _unlinear(
          ours[dense]['kernel'], ours[dense]['bias'])
  for i in range(transformer.num_layers):
    block, layer = encoder[f'encoderblock_{i}'], f'encoder.layers.{i}.'
    attention = block['MultiHeadDotProductAttention_1']
    for ours, theirs in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
      flat[f'{layer}self_attn.{theirs}.weight'], flat[f'{layer}self_attn.{theirs}.bias'] = (
          _unlinear(attention[ours]['kernel'], attention[ours]['bias']))
    attention_out(attention, f'{layer}self_attn.out_proj')
    norm(block['LayerNorm_0'], f'{layer}layer_norm1')
    norm(block['LayerNorm_2'], f'{layer}layer_norm2')
    mlp(block['MlpBlock_3'], f'{layer}mlp')
  norm(encoder['encoder_norm'], 'post_layernorm')
  if clip:
    norm(encoder['pre_norm'], 'pre_layrnorm')
    common.write_model_dir(path, flat, extra_files=_processor_file(read), config=dict(
        model_type='clip_vision_model', architectures=['CLIPVisionModel'], hidden_size=width,
        intermediate_size=int(transformer.mlp_dim), num_hidden_layers=int(transformer.num_layers),
        num_attention_heads=int(transformer.num_heads), num_channels=3,
        image_size=int(read.image_size[0]), patch_size=int(config.patches.size[0]),
        hidden_act='quick_gelu', attention_dropout=0.0,
        layer_norm_eps=float(transformer.get('layer_norm_epsilon', 1e-5))))
    return
  head = params['MAPHead_0']
  pooling = head['MultiHeadDotProductAttention_0']
  flat['head.probe'] = np.asarray(head['probe'])
  flat['head.attention.in_proj_weight'], flat['head.attention.in_proj_bias'] = (
      common.stack_qkv(pooling))
  attention_out(pooling, 'head.attention.out_proj')
  norm(head['LayerNorm_0'], 'head.layernorm')
  mlp(head['MlpBlock_0'], 'head.mlp')
  hf = dict(model_type='siglip_vision_model', architectures=['SiglipVisionModel'],
            hidden_size=width, intermediate_size=int(transformer.mlp_dim),
            num_hidden_layers=int(transformer.num_layers),
            num_attention_heads=int(transformer.num_heads), num_channels=3,
            image_size=int(read.image_size[0]), patch_size=int(config.patches.size[0]),
            hidden_act='gelu_pytorch_tanh' if transformer.get('gelu_approximate', True) else
            'gelu', layer_norm_eps=float(transformer.get('layer_norm_epsilon', 1e-6)),
            attention_dropout=0.0, vision_use_head=True)
  common.write_model_dir(path, flat, hf, _processor_file(read))
