"""Published top-1 accuracies of the released checkpoints, keyed by (model, pre-training data,
fine-tuning dataset, dropout, steps), for `vit_jax.report`'s "paper" and "diff" columns.

Sources, as printed by the official repository (google-research/vision_transformer README):
  official repository  fine-tuning of its ImageNet-21k checkpoints with vit.py:<model>,<dataset>
                       (the paper's recipe, 384 px: 10k steps on CIFAR, 20k on ImageNet), at
                       dropout 0.0 and 0.1, with the wall-clock time it took; and its shorter
                       CIFAR schedules for ViT-B/16 (500 and 1,000 steps)
  AugReg release       the recommended AugReg checkpoints (Steiner et al. 2021) fine-tuned on
                       ImageNet-1k at 384 px for 20k steps (the best ImageNet-21k checkpoint of
                       each model)
"""

import json
import os
from typing import NamedTuple, Optional


class Published(NamedTuple):
  top1: float
  source: str
  time: str = ''  # Wall-clock time of the published run, where given.


def _official(model, dataset, dropout, top1, time, steps=None):
  steps = steps or (20_000 if dataset == 'imagenet2012' else 10_000)
  return ((model, 'imagenet21k', dataset, dropout, steps),
          Published(top1, 'official repository', time))


RESULTS = dict([
    _official('R50+ViT-B_16', 'cifar10', 0.0, 0.9872, '3.9h A100'),
    _official('R50+ViT-B_16', 'cifar10', 0.1, 0.9894, '10.1h V100'),
    _official('R50+ViT-B_16', 'cifar100', 0.0, 0.9088, '4.1h A100'),
    _official('R50+ViT-B_16', 'cifar100', 0.1, 0.9230, '10.1h V100'),
    _official('R50+ViT-B_16', 'imagenet2012', 0.0, 0.8372, '9.9h A100'),
    _official('R50+ViT-B_16', 'imagenet2012', 0.1, 0.8508, '24.2h V100'),
    _official('ViT-B_16', 'cifar10', 0.0, 0.9902, '2.2h A100'),
    _official('ViT-B_16', 'cifar10', 0.1, 0.9876, '7.8h V100'),
    _official('ViT-B_16', 'cifar100', 0.0, 0.9206, '2.2h A100'),
    _official('ViT-B_16', 'cifar100', 0.1, 0.9192, '7.8h V100'),
    _official('ViT-B_16', 'imagenet2012', 0.0, 0.8453, '6.5h A100'),
    _official('ViT-B_16', 'imagenet2012', 0.1, 0.8412, '19.3h V100'),
    _official('ViT-B_32', 'cifar10', 0.0, 0.9888, '0.8h A100'),
    _official('ViT-B_32', 'cifar10', 0.1, 0.9875, '1.8h V100'),
    _official('ViT-B_32', 'cifar100', 0.0, 0.9231, '0.8h A100'),
    _official('ViT-B_32', 'cifar100', 0.1, 0.9205, '1.8h V100'),
    _official('ViT-B_32', 'imagenet2012', 0.0, 0.8166, '3.3h A100'),
    _official('ViT-B_32', 'imagenet2012', 0.1, 0.8131, '4.9h V100'),
    _official('ViT-L_16', 'cifar10', 0.0, 0.9913, '6.9h A100'),
    _official('ViT-L_16', 'cifar10', 0.1, 0.9914, '24.7h V100'),
    _official('ViT-L_16', 'cifar100', 0.0, 0.9291, '7.1h A100'),
    _official('ViT-L_16', 'cifar100', 0.1, 0.9322, '24.4h V100'),
    _official('ViT-L_16', 'imagenet2012', 0.0, 0.8447, '16.8h A100'),
    _official('ViT-L_16', 'imagenet2012', 0.1, 0.8505, '59.7h V100'),
    _official('ViT-L_32', 'cifar10', 0.0, 0.9906, '1.9h A100'),
    _official('ViT-L_32', 'cifar10', 0.1, 0.9909, '6.1h V100'),
    _official('ViT-L_32', 'cifar100', 0.0, 0.9329, '1.9h A100'),
    _official('ViT-L_32', 'cifar100', 0.1, 0.9334, '6.2h V100'),
    _official('ViT-L_32', 'imagenet2012', 0.0, 0.8189, '7.5h A100'),
    _official('ViT-L_32', 'imagenet2012', 0.1, 0.8113, '15.0h V100'),
    _official('ViT-B_16', 'cifar10', 0.0, 0.9859, '17m', steps=500),
    _official('ViT-B_16', 'cifar10', 0.0, 0.9886, '39m', steps=1000),
    _official('ViT-B_16', 'cifar100', 0.0, 0.8917, '17m', steps=500),
    _official('ViT-B_16', 'cifar100', 0.0, 0.9115, '39m', steps=1000),
] + [((model, 'imagenet21k-augreg', 'imagenet2012', None, 20_000),
      Published(top1, 'AugReg release'))
     for model, top1 in [('ViT-L_16', 0.8559), ('ViT-B_16', 0.8549), ('ViT-S_16', 0.8373),
                         ('R50+ViT-L_32', 0.8599), ('R26+ViT-S_32', 0.8385),
                         ('ViT-Ti_16', 0.7822), ('ViT-B_32', 0.8359), ('ViT-S_32', 0.7958),
                         ('R+ViT-Ti_16', 0.7540)]])


def pretraining(pretrained_path: Optional[str]) -> Optional[str]:
  """The pre-training data a checkpoint path names, as the release directories do."""
  path = pretrained_path or ''
  if '/augreg/' in path and '-i21k-' in os.path.basename(path):
    return 'imagenet21k-augreg'
  if '/imagenet21k/' in path:
    return 'imagenet21k'
  return None


def for_workdir(workdir: str) -> Optional[Published]:
  """The published result the run in `workdir` (its config.json) reproduces, if any."""
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return None
  model = (config.get('model') or {}).get('model_name')
  dropout = ((config.get('model') or {}).get('transformer') or {}).get('dropout_rate')
  data = pretraining(config.get('pretrained_path'))
  steps = config.get('total_steps')
  for key in ((model, data, config.get('dataset'), dropout, steps),
              (model, data, config.get('dataset'), None, steps)):
    if key in RESULTS:
      return RESULTS[key]
  return None
