"""Registry of model configurations by their official names ('ViT-B_16', 'ViT-L_32', ...).

`VisionTransformer(num_classes=K, **MODEL_CONFIGS[name])` builds a model. The structure of each
ConfigDict is the one of the official ViT code, so configs written for it work here unchanged.
"""

import difflib
import re
from typing import Optional

import ml_collections

from vit_jax import decoders
from vit_jax.models_vit import VisionTransformer

# model.transformer keys that choose how, not what, the model computes, with their defaults: an
# exported model.npz records these (its layout is per-layer whatever the run's `scan` was).
IMPLEMENTATION_DEFAULTS = dict(
    remat='none',        # Recompute activations in the backward pass: 'full', 'dots', ...
    scan=False,          # nn.scan over the blocks: compiles once for all layers.
    attention='einsum')  # or 'dot_product': fused kernels (cuDNN), no attention weights.

# Paper Table 1 (Ti and S from DeiT / AugReg): width D, MLP size, heads, layers.
SIZES = {
    'Ti': dict(hidden_size=192, mlp_dim=768, num_heads=3, num_layers=12),
    'S': dict(hidden_size=384, mlp_dim=1536, num_heads=6, num_layers=12),
    'B': dict(hidden_size=768, mlp_dim=3072, num_heads=12, num_layers=12),
    'L': dict(hidden_size=1024, mlp_dim=4096, num_heads=16, num_layers=24),
    'H': dict(hidden_size=1280, mlp_dim=5120, num_heads=16, num_layers=32),
}


def vit_config(name: str, *, hidden_size: int, mlp_dim: int, num_heads: int, num_layers: int,
               patch: int, classifier: str = 'token',
               representation_size=None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model_name = name
  config.patches = ml_collections.ConfigDict({'size': (patch, patch)})
  config.hidden_size = hidden_size
  config.transformer = ml_collections.ConfigDict(dict(
      mlp_dim=mlp_dim, num_heads=num_heads, num_layers=num_layers,
      dropout_rate=0.0, attention_dropout_rate=0.0,
      posemb='learn',         # or 'learn_2d', 'sincos2d', 'relative', 'none' (paper App. D.4)
      stochastic_depth=0.0,   # Drop-path rate of the last block (0 for the first).
      **IMPLEMENTATION_DEFAULTS))
  config.classifier = classifier
  config.representation_size = representation_size
  config.head_bias_init = 0.0  # -10 for sigmoid (multi-label) pre-training.
  return config


def _build_registry():
  configs = {}
  for size, patch in [('Ti', 16), ('S', 16), ('S', 32), ('B', 8), ('B', 16), ('B', 32),
                      ('L', 16), ('L', 32), ('H', 14)]:
    name = f'ViT-{size}_{patch}'
    configs[name] = vit_config(name, patch=patch, **SIZES[size])
  # Global-average-pooled models without a representation layer, as released with AugReg.
  for size, patch in [('S', 16), ('S', 32), ('B', 16), ('B', 32)]:
    name = f'ViT-{size}_{patch}-gap-norep'
    configs[name] = vit_config(name, patch=patch, classifier='gap', **SIZES[size])
  # Hybrids (paper Sec. 3.1): a BiT ResNet stem whose feature map is cut into patches.
  for name, size, patch, stages in [('R+ViT-Ti_16', 'Ti', 8, ()),
                                    ('R26+ViT-S_32', 'S', 1, (2, 2, 2, 2)),
                                    ('R26+ViT-B_32', 'B', 1, (2, 2, 2, 2)),
                                    ('R50+ViT-B_16', 'B', 1, (3, 4, 9)),
                                    ('R50+ViT-L_32', 'L', 1, (3, 4, 6, 3))]:
    configs[name] = vit_config(name, patch=patch, **SIZES[size])
    configs[name].resnet = ml_collections.ConfigDict({'num_layers': stages, 'width_factor': 1})
  # Tiny models for tests.
  tiny = dict(hidden_size=10, mlp_dim=10, num_heads=2, num_layers=1, patch=16)
  configs['testing'] = vit_config('testing', **tiny)
  configs['testing-unpooled'] = vit_config('testing-unpooled', classifier='unpooled', **tiny)
  # Dropout as in the official MODEL_CONFIGS (the rate these models were trained with).
  for name in ('ViT-L_16', 'ViT-H_14', 'R50+ViT-B_16', 'R50+ViT-L_32', 'testing',
               'testing-unpooled'):
    configs[name].transformer.dropout_rate = 0.1
  return configs


MODEL_CONFIGS = _build_registry()


def token_stride(config) -> tuple:
  """Pixels per token along (height, width): the patch size times a hybrid stem's stride (4 for
  the root, times 2 for each stage after the first)."""
  stride = 1
  if config.get('resnet') is not None:
    stride = 4 * 2**max(len(config.resnet.num_layers) - 1, 0)
  return tuple(p * stride for p in config.patches.size)


def build(model_config, num_classes, **kwargs) -> VisionTransformer:
  """The model `model_config` describes: a VisionTransformer, or with a `decoder` (segmentation,
  detection) a decoders.DenseVisionTransformer; keyword arguments go to the module."""
  if model_config.get('decoder') is not None:
    return decoders.DenseVisionTransformer(num_classes=num_classes, **model_config, **kwargs)
  return VisionTransformer(num_classes=num_classes, **model_config, **kwargs)


def get_model(name: str, **kwargs) -> VisionTransformer:
  """The registry model `name` ('ViT-B_16', 'B_16', 'R50+ViT-B_16', ...), e.g.
  get_model('ViT-B_16', num_classes=1000); keyword arguments go to VisionTransformer."""
  return VisionTransformer(**get_config(name), **kwargs)


def _official_spellings() -> dict:
  """{other name: registry name} for the names the official repository uses besides ours:
  AugReg's file names ('Ti_16', 'R_Ti_16', 'R26_S_32', 'S_16-gap-norep') and its config
  functions' ('b16' for get_b16_config, 'r_ti16', 'r50_b16', 's16_gap_norep')."""
  aliases = {}
  for name in MODEL_CONFIGS:
    augreg = name.replace('ViT-', '').replace('+', '_')
    function = re.sub(r'([a-z]+)_(\d+)', r'\1\2', augreg.lower()).replace('-', '_')
    aliases.update({augreg: name, function: name})
  return aliases


OFFICIAL_SPELLINGS = _official_spellings()


def registry_name(name: str) -> Optional[str]:
  """The registry's name for `name` in any spelling get_config takes; None if it has none."""
  name = OFFICIAL_SPELLINGS.get(name, name)
  return name if name in MODEL_CONFIGS else None


def get_config(name: str) -> ml_collections.ConfigDict:
  """A copy of the registry entry `name` ('ViT-B_16'; short: 'B_16'; the official repository's
  'b16', 'R_Ti_16', ...), with an error naming the closest known names."""
  name = registry_name(name) or name
  if name not in MODEL_CONFIGS:
    close = difflib.get_close_matches(name, list(MODEL_CONFIGS) + list(OFFICIAL_SPELLINGS),
                                      n=3, cutoff=0.5)
    hint = f'Did you mean {" or ".join(map(repr, close))}? ' if close else ''
    raise ValueError(f'Unknown model {name!r}. {hint}Known models: {", ".join(MODEL_CONFIGS)}.')
  return MODEL_CONFIGS[name].copy_and_resolve_references()
