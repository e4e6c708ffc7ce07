r"""VTAB-1k (the paper's Sec. 4.1, Table 2, Fig. 3): fine-tuning on one of the 19 tasks with the
paper's protocol (App. B.1.1).

python -m vit_jax.vtab --pretrained=B_16 --workdir=runs/vtab            # the whole sweep
python -m vit_jax.main --config=configs/vtab.py:B_16,dtd --workdir=...  # one run

SOURCE as in configs/finetune.py (a registry name or a checkpoint); TASK one of
vtab_tasks.VTAB_1K (or the offline 'digits' / 'digits_parity'). SGD with momentum 0.9, batch
512, 2,500 steps, cosine decay, 384 px, a fresh zero head; trained on train800val200 and scored
on test at the learning rate `vit_jax.vtab` picks from {0.001, 0.003, 0.01, 0.03} on val200 after
training on train800 (0.01 here by default).
"""

from vit_jax import config_lib, vtab_tasks

LEARNING_RATES = (0.001, 0.003, 0.01, 0.03)


def get_config(arg='B_16,dtd'):
  source, task = config_lib.recipe_args(arg, 'vtab', 'SOURCE,TASK')
  vtab_tasks.get(task)  # A misspelt task fails here, with the known ones.
  c = config_lib.base_config()
  config_lib.finetune_source(c, source)
  config_lib.finetune_recipe(c)
  c.dataset = f'vtab:{task}'
  c.train_split, c.test_split = 'train800val200', 'test'
  c.tfds_download = True
  c.shuffle_buffer = 1000  # The whole of the 1,000 training examples.
  c.pp.crop = 384
  c.base_lr = 0.01
  c.total_steps, c.warmup_steps = 2500, 200
  c.batch, c.batch_eval = 512, 512
  c.eval_every = c.checkpoint_every = 500
  c.keep_checkpoints = 1
  c.progress_every = 50
  return c.lock()
