r"""Offline recipe on the embedded digits (8x8 images, 10 classes): runs on a laptop CPU.

  pretrain: a small ViT from scratch with the paper's pre-training recipe, at 16x16 px;
  finetune: the fine-tuning recipe at 24x24 px from --config.pretrained_path (position
            embeddings interpolated from a 4x4 to a 6x6 grid).

python -m vit_jax.main --config=configs/digits.py:pretrain --workdir=runs/digits/pretrain
python -m vit_jax.main --config=configs/digits.py:finetune --workdir=runs/digits/finetune \
    --config.pretrained_path=runs/digits/pretrain/model.npz
"""

from vit_jax import config_lib, evaluators, models


def get_config(stage='pretrain'):
  c = config_lib.base_config()
  c.dataset = 'digits'
  c.model = models.vit_config('ViT-digits', hidden_size=64, mlp_dim=256, num_heads=4,
                              num_layers=4, patch=4)
  c.pp.flip = False          # A mirrored digit is another digit (or none).
  c.pp.crop_min_area = 0.7   # 8x8 images leave little to crop away.
  c.shuffle_buffer = 2000

  if stage == 'pretrain':
    config_lib.pretrain_recipe(c)
    c.pp.crop = 16
    c.batch, c.batch_eval = 128, 360
    c.base_lr = 1e-3
    c.warmup_steps, c.total_steps = 100, 1500
  elif stage == 'finetune':
    config_lib.finetune_recipe(c)
    c.pp.crop = 24
    c.batch, c.batch_eval = 128, 360
    c.base_lr = 0.01
    c.warmup_steps, c.total_steps = 50, 500
  else:
    raise ValueError(f"configs/digits.py takes 'pretrain' or 'finetune', not {stage!r}.")

  c.eval_every = c.checkpoint_every = c.total_steps // 2
  # Few-shot linear evaluation (paper Sec. 4.1), off unless --config.evals.fewshot.every=N.
  c.evals.fewshot = evaluators.few_shot({'digits': ('digits', 'train', 'test')}, every=0)
  c.progress_every = 100
  c.keep_checkpoints = 2
  return c.lock()  # A misspelt key now raises instead of being silently added.
