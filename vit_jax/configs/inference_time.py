r"""The official inference-time config: config.trainer='inference_time' with the official keys.

python -m vit_jax.main --workdir=/tmp/speed --config=$(pwd)/vit_jax/configs/inference_time.py \
    --config.model_name=ViT-B_16 --config.batch=64 --config.image_size=384

  official key        here
  model_name          the registry model timed (any spelling: 'ViT-B_16', 'b16', ...)
  batch, image_size   batch_eval and pp.crop (linked: either name sets both)
  steps, initial_steps  batches timed (their median is reported) and warm-up batches
"""

import ml_collections

from vit_jax import config_lib, models

DEFAULT_MODEL = 'ViT-B_32'  # The official default.


def get_config():
  config = config_lib.base_config()
  config.trainer = 'inference_time'
  config.model_name = ml_collections.FieldReference(DEFAULT_MODEL, field_type=str)
  config.model = models.get_config(DEFAULT_MODEL)  # inference_time.py builds model_name's.
  config.batch = config.batch_eval = ml_collections.FieldReference(64, field_type=int)
  config.image_size = ml_collections.FieldReference(224, field_type=int)
  config.pp.crop = config.get_ref('image_size')
  config.steps, config.initial_steps = 30, 10
  config.pretrained_dir = '.'  # Read by nothing: the timed model is randomly initialised.
  config.log_dir = '.'  # The workdir holds the measurements.
  return config.lock()
