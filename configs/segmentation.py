r"""Semantic segmentation with a ViT backbone and Segmenter's decoders (Strudel et al. 2021).

python -m vit_jax.main --config=configs/segmentation.py:shapes --workdir=runs/segmentation
python -m vit_jax.main --config=configs/segmentation.py:B_16,scene_parse150 --workdir=...
python -m vit_jax.main --config=configs/segmentation.py:SOURCE,seg:~/data --workdir=...

shapes: a small ViT from scratch on the embedded shapes (64 px, 4 classes) under the linear
decoder, minutes on a CPU.
SOURCE,DATASET: the backbone of SOURCE (a registry name: its ImageNet-21k checkpoint, or any
checkpoint load_pretrained reads: .npz, Hugging Face, timm), its head dropped, position
embeddings resampled to the 512 px grid. Segmenter's data settings for ADE20K: 512 px crops of
images scaled by 0.5-2.0, flips, batch 8, 160k steps, the mask transformer (2 layers); AdamW
(lr 1e-4, weight decay 0.05) with layer-wise learning-rate decay 0.65 as BEiT fine-tunes on
ADE20K, linear decay (Segmenter's "poly" schedule with power 1). `--config.model.decoder.type=
linear` gives Segmenter's linear decoder.
"""

import ml_collections

from vit_jax import config_lib


def get_config(arg='shapes'):
  c = config_lib.base_config()
  dataset = config_lib.dense_recipe(c, 'segmentation', arg)
  if arg == 'shapes':
    # With 4 classes the mask transformer's class-normalised logits learn slower (measured, 800
    # steps: mIoU 0.31 against the linear decoder's 0.41); its depth stays for type=...
    c.model.decoder = ml_collections.ConfigDict(dict(type='linear', num_layers=1))
    c.pp.scale_range = (1.0, 1.0)  # The test images are at scale 1: jitter cost 0.04 mIoU.
    c.base_lr, c.weight_decay = 3e-3, 0.05
    c.warmup_steps, c.total_steps = 100, 2400
  else:
    c.model.decoder = ml_collections.ConfigDict(dict(type='mask_transformer', num_layers=2))
    c.train_split, c.test_split = 'train', 'test'  # TFDS scene_parse150's test: ADE's val.
    c.tfds_download = dataset == 'scene_parse150'
    c.pp.crop = 512
    c.pp.scale_range = (0.5, 2.0)
    c.base_lr, c.weight_decay, c.layer_decay = 1e-4, 0.05, 0.65
    c.batch, c.batch_eval = 8, 8
    c.warmup_steps, c.total_steps = 1500, 160_000
  c.decay_type = 'linear'
  config_lib.dense_evaluation(c)
  return c.lock()
