r"""The official fine-tuning config, configs/finetune.py under its official name and keys:

python -m vit_jax.main --workdir=/tmp/vit \
    --config=$(pwd)/vit_jax/configs/vit.py:b16,cifar10 \
    --config.pretrained_dir='gs://vit_models/imagenet21k'

MODEL in any spelling of the registry (the official 'b16', or 'B_16', 'R50+ViT-B_16');
DATASET a TFDS name or a directory of {train,test}/<class>/<image>. See common.py for the keys.
"""

import os

from vit_jax import config_lib, models
from vit_jax.configs import common


def get_config(model_dataset='b16,cifar10'):
  model, *dataset = model_dataset.split(',')
  dataset = [config_lib.official_dataset(name) for name in dataset]
  config = common.recipe('finetune', ','.join([model] + dataset))
  if models.registry_name(model):  # Not a checkpoint path: pretrained_dir/<its name>.npz.
    # The directory of the recipe's own checkpoint, else '.', as the official default.
    directory = os.path.dirname(config.pretrained_path or '') or '.'
    config = common.with_official_keys(config, directory, config.model.model_name)
  return config
