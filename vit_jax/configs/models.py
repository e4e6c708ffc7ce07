"""The official `vit_jax.configs.models`: MODEL_CONFIGS, AUGREG_CONFIGS and the get_<name>_config
functions, all views of vit_jax.models' registry (the same ConfigDicts, nothing redefined)."""

from vit_jax import models

MODEL_CONFIGS = models.MODEL_CONFIGS
# AugReg's file names ('R_Ti_16', 'S_16-gap-norep'): the models the AugReg paper released.
AUGREG_CONFIGS = {name.replace('ViT-', '').replace('+', '_'): config
                  for name, config in MODEL_CONFIGS.items()
                  if name not in ('testing', 'testing-unpooled', 'ViT-L_32', 'R50+ViT-B_16',
                                  'ViT-H_14')}


def _getter(name):
  def get_config():
    return models.get_config(name)
  get_config.__doc__ = f'A copy of the {name} config.'
  return get_config


# get_b16_config(), get_r_ti16_config(), get_s16_gap_norep_config(), ...
for _spelling, _name in models.OFFICIAL_SPELLINGS.items():
  if _spelling.islower() or _spelling.startswith('testing'):
    globals()[f'get_{_spelling.replace("-", "_")}_config'] = _getter(_name)
