r"""Fine-tuning a pre-trained checkpoint, the paper's recipe (App. B.1.1, Table 4).

python -m vit_jax.main --config=configs/finetune.py:B_16,cifar10 --workdir=... \
    [--config.pretrained_path=PATH.npz]
python -m vit_jax.main --config=configs/finetune.py:hf://google/vit-base-patch16-224,cifar10 ...

MODEL is a registry name (its official ImageNet-21k checkpoint where one was released) or a
checkpoint, whose architecture is then the model's: an .npz, a Hugging Face model directory, a
timm .safetensors file or an hf://ORG/NAME[@REVISION] id.

SGD with momentum 0.9 (bfloat16 accumulator), batch 512, no weight decay, gradient clipping at 1,
cosine decay after a short warm-up, 384 px (position embeddings interpolated from the
checkpoint's grid), a fresh zero-initialised head, no representation layer. The paper picks the
learning rate from {0.001, 0.003, 0.01, 0.03} on a held-out split; 0.01 is the default here.
"""

from vit_jax import config_lib


def get_config(arg='B_16,cifar10'):
  source, dataset = config_lib.recipe_args(arg, 'finetune', 'MODEL,DATASET')
  c = config_lib.base_config()
  config_lib.finetune_source(c, source)
  config_lib.finetune_recipe(c)
  c.shuffle_buffer = 50_000
  c.pp.crop = 384
  c.base_lr = 0.01
  c.batch_eval = 512
  c.keep_checkpoints = 2
  c.progress_every = 50
  config_lib.finetune_dataset(c, dataset)  # Table 4's steps, and the schedule that follows.
  return c.lock()  # A misspelt key now raises instead of being silently added.
