r"""Object detection and instance segmentation with a ViT backbone: ViTDet's simple feature
pyramid (Li et al. 2022) and an anchor-free CenterNet / FCOS head with CondInst masks.

python -m vit_jax.main --config=configs/detection.py:shapes --workdir=runs/detection
python -m vit_jax.main --config=configs/detection.py:B_16,coco/2017 --workdir=...
python -m vit_jax.main --config=configs/detection.py:B_16,det:~/coco --workdir=... \
    --config.train_split=train2017 --config.test_split=val2017

shapes: a small ViT from scratch on the embedded shapes (64 px, 3 classes, boxes and instance
masks), minutes on a CPU. SOURCE,DATASET: the backbone of SOURCE (a registry name: its
ImageNet-21k checkpoint, or any checkpoint load_pretrained reads), its head dropped, position
embeddings resampled to the 1024 px grid. ViTDet's settings for COCO where they fit: 1024 px,
large-scale jitter (0.1-2.0), flips, pyramid strides 4-32 of width 256, AdamW (lr 1e-4, weight
decay 0.1, layer-wise decay 0.7), drop path 0.1, batch 64, 184,375 steps (100 epochs), 250
warm-up steps; a cosine decay where ViTDet steps down twice. Instance masks need det:<dir> (COCO
JSON with polygons); TFDS coco/2017 has boxes only, so there instance_masks is off.
"""

import ml_collections

from vit_jax import config_lib


def get_config(arg='shapes'):
  c = config_lib.base_config()
  dataset = config_lib.dense_recipe(c, 'detection', arg)
  if arg == 'shapes':
    c.model.decoder = ml_collections.ConfigDict(dict(
        type='detection', strides=(4, 8, 16), width=64, tower_depth=2, instance_masks=True))
    c.pp.scale_range = (0.75, 1.5)
    c.base_lr, c.weight_decay = 1e-3, 0.05
    c.warmup_steps, c.total_steps = 100, 1500
    c.max_objects, c.max_detections = 8, 20
  else:
    c.model.decoder = ml_collections.ConfigDict(dict(
        type='detection', strides=(4, 8, 16, 32), width=256, tower_depth=4,
        instance_masks=dataset.startswith('det:')))
    if dataset == 'coco/2017':
      c.train_split, c.test_split, c.tfds_download = 'train', 'validation', True
    else:
      c.train_split, c.test_split = 'train2017', 'val2017'
    c.pp.crop = 1024
    c.pp.scale_range = (0.1, 2.0)
    c.base_lr, c.weight_decay, c.layer_decay = 1e-4, 0.1, 0.7
    c.batch, c.batch_eval = 64, 64
    c.warmup_steps, c.total_steps = 250, 184_375
  c.decay_type = 'cosine'
  config_lib.dense_evaluation(c)
  return c.lock()
