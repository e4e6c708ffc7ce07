"""Published top-1 accuracies beside which `vit_jax.report` and `vit_jax.vtab` put a run's:
the paper's tables and the official repository's, keyed by the setting that produced them
(model, pre-training data, fine-tuning dataset, steps, resolution, dropout).

Sources:
  paper Table 2   the state-of-the-art comparison: ViT-H/14 and ViT-L/16 pre-trained on JFT-300M,
                  ViT-L/16 on ImageNet-21k (the released imagenet21k/ViT-L_16.npz), fine-tuned
                  at 518 / 512 px; mean and standard deviation over three fine-tuning runs
  paper Table 5   the scaling study's ViTs pre-trained on JFT-300M for 7 or 14 epochs, fine-tuned
                  at 384 px; with each pre-training's compute (exaFLOPs)
  paper Table 9   VTAB-1k per task of Table 2's three models
  official repository  google-research/vision_transformer's README: fine-tuning of its
                  ImageNet-21k checkpoints with vit.py:<model>,<dataset> (384 px, 10k steps on
                  CIFAR, 20k on ImageNet) at dropout 0.0 and 0.1 with the wall-clock time it
                  took, and its shorter ViT-B/16 CIFAR schedules (500 and 1,000 steps)
  AugReg release  the recommended AugReg checkpoints (Steiner et al. 2021) fine-tuned on
                  ImageNet-1k at 384 px for 20k steps

Datasets are TFDS names; 'imagenet2012_real' is ImageNet's validation images scored against
the ReaL labels, 'vtab' the mean over the 19 VTAB-1k tasks and 'vtab:<task>' one of them.
The fine-tuning steps are the paper's Table 4 (ImageNet 20k, CIFAR 10k, Pets and Flowers 500,
VTAB 2,500).

python -m vit_jax.published [MODEL]   lists the table (of one model).
"""

import json
import os
import sys
from typing import NamedTuple, Optional


class Setting(NamedTuple):
  """What a published figure was measured on; None matches any value."""
  model: str
  pretraining: str  # As `pretraining()` reads it from a checkpoint path.
  dataset: str
  steps: Optional[int] = None
  image_size: Optional[int] = None
  dropout: Optional[float] = None


class Published(NamedTuple):
  top1: float
  source: str
  time: str = ''  # Wall-clock time of the published run, where given.
  std: Optional[float] = None  # Over the published repeats, where given.


# Paper Table 4: fine-tuning steps per dataset (the recipes' too: config_lib.FINETUNE_STEPS).
FINETUNE_STEPS = {'imagenet2012': 20_000, 'cifar10': 10_000, 'cifar100': 10_000,
                  'oxford_iiit_pet': 500, 'oxford_flowers102': 500}
VTAB_STEPS = 2_500
VTAB_TASKS = ('caltech101', 'cifar100', 'dtd', 'oxford_flowers102', 'oxford_iiit_pet', 'sun397',
              'svhn', 'patch_camelyon', 'eurosat', 'resisc45', 'diabetic_retinopathy',
              'clevr_count', 'clevr_distance', 'dmlab', 'dsprites_location',
              'dsprites_orientation', 'kitti_distance', 'smallnorb_azimuth',
              'smallnorb_elevation')  # Table 9's column order, vtab_tasks' names (a test keeps
# them equal to vtab_tasks.VTAB_1K, which is not imported here: it needs TensorFlow).


# Table 2, in %: ImageNet, ReaL, CIFAR-10, CIFAR-100, Pets, Flowers, VTAB (19 tasks); mean, std.
_TABLE2_DATASETS = ('imagenet2012', 'imagenet2012_real', 'cifar10', 'cifar100',
                    'oxford_iiit_pet', 'oxford_flowers102', 'vtab')
_TABLE2 = {
    ('ViT-H_14', 'jft300m', 518): ((88.55, .04), (90.72, .05), (99.50, .06), (94.55, .04),
                                   (97.56, .03), (99.68, .02), (77.63, .23)),
    ('ViT-L_16', 'jft300m', 512): ((87.76, .03), (90.54, .03), (99.42, .03), (93.90, .05),
                                   (97.32, .11), (99.74, .00), (76.28, .46)),
    ('ViT-L_16', 'imagenet21k', 512): ((85.30, .02), (88.62, .05), (99.15, .03), (93.25, .05),
                                       (94.67, .15), (99.61, .02), (72.72, .21)),
}

# Table 5 (ViT rows), in %: ImageNet, ReaL, CIFAR-10, CIFAR-100, Pets, Flowers; and the
# pre-training's exaFLOPs.
_TABLE5_DATASETS = _TABLE2_DATASETS[:-1]
_TABLE5 = {
    ('ViT-B_32', 7): ((80.73, 86.27, 98.61, 90.49, 93.40, 99.27), 55),
    ('ViT-B_16', 7): ((84.15, 88.85, 99.00, 91.87, 95.80, 99.56), 224),
    ('ViT-L_32', 7): ((84.37, 88.28, 99.19, 92.52, 95.83, 99.45), 196),
    ('ViT-L_16', 7): ((86.30, 89.43, 99.38, 93.46, 96.81, 99.66), 783),
    ('ViT-L_16', 14): ((87.12, 89.99, 99.38, 94.04, 97.11, 99.56), 1567),
    ('ViT-H_14', 14): ((88.08, 90.36, 99.50, 94.71, 97.11, 99.71), 4262),
}
JFT_IMAGES = 303e6  # JFT-300M's images (the paper, Sec. 4.1).
PRETRAINING_EXAFLOPS = {key: exaflops for key, (_, exaflops) in _TABLE5.items()}

# Table 9, in %: VTAB-1k per task, in VTAB_TASKS' order.
_TABLE9 = {
    ('ViT-H_14', 'jft300m'): (95.3, 85.5, 75.2, 99.7, 97.2, 65.0, 88.9, 83.3, 96.7, 91.4, 76.6,
                              91.7, 63.8, 53.1, 79.4, 63.3, 84.5, 33.2, 51.2),
    ('ViT-L_16', 'jft300m'): (95.4, 81.9, 74.3, 99.7, 96.7, 63.5, 87.4, 83.6, 96.5, 89.7, 77.1,
                              86.4, 63.1, 49.7, 74.5, 60.5, 82.2, 36.2, 51.1),
    ('ViT-L_16', 'imagenet21k'): (90.8, 84.1, 74.1, 99.3, 92.7, 61.0, 80.9, 82.5, 95.6, 85.2,
                                  75.3, 70.3, 56.1, 41.9, 74.7, 64.9, 79.9, 30.5, 41.7),
}


def _steps(dataset: str) -> int:
  """Table 4's steps of a dataset (ReaL scores the ImageNet fine-tuning)."""
  return FINETUNE_STEPS['imagenet2012' if dataset == 'imagenet2012_real' else dataset]


def _official(model, dataset, dropout, top1, time, steps=None):
  return (Setting(model, 'imagenet21k', dataset, steps or _steps(dataset), 384, dropout),
          Published(top1, 'official repository', time))


def _paper_tables():
  for (model, data, size), cells in _TABLE2.items():
    for dataset, (value, std) in zip(_TABLE2_DATASETS, cells):
      vtab = dataset == 'vtab'
      yield (Setting(model, data, dataset, VTAB_STEPS if vtab else _steps(dataset),
                     None if vtab else size),
             Published(value / 100, 'paper Table 2', std=std / 100))
  for (model, epochs), (cells, _) in _TABLE5.items():
    for dataset, value in zip(_TABLE5_DATASETS, cells):
      yield (Setting(model, f'jft300m-{epochs}ep', dataset, _steps(dataset), 384),
             Published(value / 100, 'paper Table 5'))
  for (model, data), cells in _TABLE9.items():
    for task, value in zip(VTAB_TASKS, cells):
      yield (Setting(model, data, f'vtab:{task}', VTAB_STEPS),
             Published(value / 100, 'paper Table 9'))


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
] + [(Setting(model, 'imagenet21k-augreg', 'imagenet2012', _steps('imagenet2012'), 384),
      Published(top1, 'AugReg release'))
     for model, top1 in [('ViT-L_16', 0.8559), ('ViT-B_16', 0.8549), ('ViT-S_16', 0.8373),
                         ('R50+ViT-L_32', 0.8599), ('R26+ViT-S_32', 0.8385),
                         ('ViT-Ti_16', 0.7822), ('ViT-B_32', 0.8359), ('ViT-S_32', 0.7958),
                         ('R+ViT-Ti_16', 0.7540)]] + list(_paper_tables()))


def pretraining(pretrained_path: Optional[str]) -> Optional[str]:
  """The pre-training data a checkpoint path names, as the release directories do."""
  path = pretrained_path or ''
  if '/augreg/' in path and '-i21k-' in os.path.basename(path):
    return 'imagenet21k-augreg'
  if '/imagenet21k/' in path:
    return 'imagenet21k'
  return None


def lookup(model, pretraining_data, dataset, steps, image_size=None,
           dropout=None) -> Optional[Published]:
  """The published result of this setting: the most specific of the matching ones."""
  run = Setting(model, pretraining_data, dataset, steps, image_size, dropout)
  matches = [(sum(v is not None for v in setting), result)
             for setting, result in RESULTS.items()
             if all(want is None or want == got for want, got in zip(setting, run))]
  return max(matches, key=lambda m: m[0])[1] if matches else None


def run_config(workdir: str) -> dict:
  try:
    with open(os.path.join(workdir, 'config.json')) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def setting(config: dict, dataset: Optional[str] = None) -> Setting:
  """The setting of a run (its config as a dict), scored on `dataset` (default its own)."""
  model = config.get('model') or {}
  return Setting(model.get('model_name'), pretraining(config.get('pretrained_path')),
                 dataset or config.get('dataset'), config.get('total_steps'),
                 (config.get('pp') or {}).get('crop'),
                 (model.get('transformer') or {}).get('dropout_rate'))


def for_run(config: dict, dataset: Optional[str] = None) -> Optional[Published]:
  """The published result a run (its config as a dict) reproduces, if any; on `dataset` where
  given (an evaluator's), else on the run's own."""
  run = setting(config, dataset)
  return None if run.pretraining is None else lookup(*run)


def for_workdir(workdir: str, dataset: Optional[str] = None) -> Optional[Published]:
  """for_run of the run in `workdir` (its config.json)."""
  return for_run(run_config(workdir), dataset)


def main(argv):
  wanted = argv[1] if len(argv) > 1 else None
  known = sorted({s.model for s in RESULTS})
  if wanted is not None and wanted not in known:
    sys.exit(f'No published result of {wanted!r}; the table has {", ".join(known)}.')
  print(f'{"model":<14} {"pre-training":<18} {"dataset":<28} {"steps":>6} {"px":>4} '
        f'{"drop":>4} {"top-1":>7}  source')
  for s, r in sorted(RESULTS.items(), key=lambda item: (item[1].source, item[0].model,
                                                        item[0].pretraining)):
    if wanted and s.model != wanted:
      continue
    std = f' ±{r.std:.2%}' if r.std is not None else ''
    print(f'{s.model:<14} {s.pretraining:<18} {s.dataset:<28} {s.steps or "":>6} '
          f'{s.image_size or "":>4} {"" if s.dropout is None else s.dropout:>4} '
          f'{r.top1:>7.2%}  {r.source}{std}' + (f', {r.time}' if r.time else ''))


if __name__ == '__main__':
  main(sys.argv)
