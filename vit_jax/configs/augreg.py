r"""The official AugReg fine-tuning config (Steiner et al. 2021), with its keys:

python -m vit_jax.main --workdir=/tmp/vit --config=$(pwd)/vit_jax/configs/augreg.py:R_Ti_16 \
    --config.dataset=oxford_iiit_pet --config.pp.train='train[:90%]' --config.base_lr=0.01

MODEL_OR_FILENAME: an AugReg model ('R_Ti_16', 'S_16', ...: its ImageNet-21k checkpoint with the
best final validation accuracy in <pretrained_dir>/index.csv) or a checkpoint's file name without
.npz ('R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0'). The dataset must be set.
The fine-tuning recipe of configs/finetune.py, with the official AugReg values below.
"""

import difflib

from vit_jax import config_lib
from vit_jax.configs import common, models


def get_config(model_or_filename='R_Ti_16'):
  model = model_or_filename.split('-')[0]
  if model not in models.AUGREG_CONFIGS:
    close = difflib.get_close_matches(model, models.AUGREG_CONFIGS, n=3, cutoff=0.5)
    raise ValueError(f'Unknown AugReg model {model!r}' + (
        f'; did you mean {" or ".join(map(repr, close))}?' if close else '') +
                     f' AugReg models: {", ".join(models.AUGREG_CONFIGS)}.')
  config = config_lib.base_config()
  config_lib.finetune_recipe(config)
  config.model = models.AUGREG_CONFIGS[model].copy_and_resolve_references()
  config.model.transformer.dropout_rate = 0.0  # No AugReg regularisation while fine-tuning.
  config.dataset = ''  # Set it: --config.dataset=<TFDS name or folder:<directory>>.
  config.base_lr, config.total_steps, config.warmup_steps = 0.03, 500, 100
  config.pp.crop = 384
  config.model_or_filename = model_or_filename
  # A file name, else config_lib.with_augreg_file picks the best file when the run starts.
  return common.with_official_keys(config, 'gs://vit_models/augreg',
                                   model_or_filename if '-' in model_or_filename else None)
