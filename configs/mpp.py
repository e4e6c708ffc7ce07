r"""Self-supervised pre-training by masked patch prediction (paper Sec. 4.6, App. B.1.2).

python -m vit_jax.main --config=configs/mpp.py:B_16,imagenet21k --workdir=...
python -m vit_jax.main --config=configs/mpp.py:digits --workdir=...        (offline, CPU)

Half the patch embeddings are corrupted and the model predicts their 3-bit mean colour (512
classes) from each patch's output token: an unpooled ViT with a 512-way head per token. Adam,
base lr 2e-4, 10k steps warm-up, cosine decay, batch 4096. The exported model.npz fine-tunes with
configs/finetune.py like any other checkpoint (the [mask] embedding and the head are dropped,
a class token is added).
"""

from vit_jax import config_lib, models


def get_config(arg='B_16,imagenet21k'):
  c = config_lib.base_config()
  c.objective = 'mpp'
  if arg == 'digits':
    c.model = models.vit_config('ViT-digits', hidden_size=64, mlp_dim=256, num_heads=4,
                                num_layers=4, patch=4, classifier='unpooled')
    c.dataset, c.pp.crop, c.pp.flip, c.pp.crop_min_area = 'digits', 16, False, 0.7
    c.batch, c.batch_eval, c.shuffle_buffer = 128, 360, 2000
    c.total_steps, c.warmup_steps, c.base_lr = 1000, 100, 1e-3
    c.eval_every = c.checkpoint_every = 500
    c.progress_every = 100
  else:
    model, dataset = config_lib.recipe_args(arg, 'mpp', 'MODEL,DATASET', 'digits')
    c.model = models.get_config(model)
    c.model.classifier = 'unpooled'
    config_lib.set_dataset(c, dataset)
    c.shuffle_buffer = 250_000
    c.pp.crop = 224
    c.batch, c.batch_eval = 4096, 1024
    c.total_steps, c.warmup_steps, c.base_lr = 1_000_000, 10_000, 2e-4
    c.eval_every = c.checkpoint_every = 10_000
    c.progress_every = 500
  c.optimizer, c.b1, c.b2, c.weight_decay, c.grad_norm_clip = 'adam', 0.9, 0.999, 0.0, 1.0
  c.decay_type = 'cosine'
  c.keep_checkpoints = 2
  return c.lock()  # A misspelt key now raises instead of being silently added.
