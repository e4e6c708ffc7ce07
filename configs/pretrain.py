r"""Pre-training from scratch, the paper's recipe (Sec. 4.1, App. B.1, Table 3).

python -m vit_jax.main --config=configs/pretrain.py:B_16,imagenet21k --workdir=...
python -m vit_jax.main --config=configs/pretrain.py:R50+ViT-B_16,imagenet21k --workdir=...  (hybrid)

Whether it fits a slice, and the cheapest memory-only flags that make it fit, the TPU compiler
says before the slice is paid for: python -m vit_jax.plan --config=configs/pretrain.py:<args>
--topology=v3:4x4 [--auto_fit] (docs/plan.md, docs/hardware.md). B/16 and L/16 fit v3-32, v4-32,
v5e-16 and v4-128 as they stand; scan=True alone does not fit B/16 on a v3-32 (36 GiB of
temporaries): with scan, also remat=full.

Adam (0.9, 0.999), batch 4096, decoupled weight decay on kernels, 10k steps linear warm-up then
linear decay (cosine for ImageNet-1k), gradient clipping at global norm 1, a representation layer
of width D, 224 px. ImageNet-21k is multi-label: sigmoid cross-entropy with the head bias at -10.
Datasets other than imagenet2012 / imagenet21k get the JFT-300M row of Table 3.
"""

from vit_jax import config_lib, evaluators, models

# Table 3, JFT-300M rows: the base learning rate per model (7 epochs, weight decay 0.1).
JFT_LEARNING_RATES = {'Ti_16': 8e-4, 'S_16': 8e-4, 'S_32': 8e-4, 'B_8': 8e-4, 'B_16': 8e-4,
                      'B_32': 8e-4, 'L_16': 4e-4, 'L_32': 6e-4, 'H_14': 3e-4}


def get_config(arg='B_16,imagenet21k'):
  model, dataset = config_lib.recipe_args(arg, 'pretrain', 'MODEL,DATASET')
  c = config_lib.base_config()
  c.model = models.get_config(model)  # 'B_16', 'R50+ViT-B_16', the official 'b16', ...
  config_lib.pretrain_recipe(c)

  config_lib.set_dataset(c, dataset)
  info = config_lib.dataset_info(dataset)
  c.shuffle_buffer = 250_000
  c.pp.crop = 224

  if dataset == 'imagenet2012':  # From scratch on ImageNet-1k: stronger regularisation.
    c.base_lr, c.weight_decay, c.decay_type, epochs = 3e-3, 0.3, 'cosine', 300
    c.model.transformer.dropout_rate = 0.1
  elif dataset == 'imagenet21k':
    c.base_lr, c.weight_decay, epochs = 1e-3, 0.03, 90
    c.model.transformer.dropout_rate = 0.1
  else:
    c.base_lr, c.weight_decay, epochs = (JFT_LEARNING_RATES[c.model.model_name.split('ViT-')[-1]],
                                         0.1, 7)
  if info.get('multi_label'):
    c.loss = 'sigmoid_xent'
    c.model.head_bias_init = -10.0  # Starts every sigmoid near 0: a stable multi-label start.
  c.total_steps = (config_lib.epochs_to_steps(epochs, dataset, c.batch) if dataset in
                   config_lib.DATASETS else 100_000)

  c.batch_eval = 1024
  c.eval_every = c.checkpoint_every = 5_000
  if dataset == 'imagenet2012':
    config_lib.add_imagenet_variants(c)
  # The paper's few-shot evaluations (Sec. 4.1, App. D.1) on small datasets TFDS downloads.
  # ImageNet's needs its manual download: add 'imagenet': ('imagenet2012', 'train[:65000]',
  # 'validation') (its first 65k images hold at least 30 of each class).
  c.evals.fewshot = evaluators.few_shot({
      'cifar100': ('cifar100', 'train', 'test'),
      'pets': ('oxford_iiit_pet', 'train', 'test'),
      'flowers': ('oxford_flowers102', 'train', 'test'),
  }, every=c.get_ref('eval_every'))
  c.keep_checkpoints = 3
  c.progress_every = 500
  return c.lock()  # A misspelt key now raises instead of being silently added.
