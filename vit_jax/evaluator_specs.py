"""What an evaluator of `config.evals` is, as plain data (see evaluators.py, which runs them):
recipes and config_lib build these without importing the code that runs them."""

import ml_collections

TYPES = ('classification', 'fewshot', 'corruption', 'segmentation', 'detection')
CLASSES = ('all', 'present')

# ImageNet-C (Hendrycks & Dietterich 2019): its 15 corruptions, and AlexNet's top-1 error on
# each averaged over the 5 severities, which normalises the corruption error (CE) into mCE.
CORRUPTION_ALEXNET_ERRORS = {
    'gaussian_noise': 0.886428, 'shot_noise': 0.894468, 'impulse_noise': 0.922640,
    'defocus_blur': 0.819880, 'glass_blur': 0.826268, 'motion_blur': 0.785948,
    'zoom_blur': 0.798360, 'snow': 0.866816, 'frost': 0.826572, 'fog': 0.819324,
    'brightness': 0.564592, 'contrast': 0.853204, 'elastic_transform': 0.646056,
    'pixelate': 0.717840, 'jpeg_compression': 0.606500}


def classification(split, *, dataset='', every=1000, label_key='',
                   classes='all') -> ml_collections.ConfigDict:
  """`classes='present'`: only the classes that occur in the split can be predicted (the
  logits of the others are masked), as ImageNet-A and -R are scored: 200 of ImageNet's 1000."""
  return ml_collections.ConfigDict(dict(type='classification', dataset=dataset, split=split,
                                        every=every, label_key=label_key, classes=classes))


def dense(kind: str, split, *, dataset='', every=1000) -> ml_collections.ConfigDict:
  """`kind` 'segmentation' (mIoU, pixel accuracy) or 'detection' (COCO box and mask mAP) on a
  split, each image scored at its original size."""
  return ml_collections.ConfigDict(dict(type=kind, dataset=dataset, split=split, every=every))


def few_shot(datasets: dict, *, every=0, shots=(1, 5, 10, 25), seeds=3,
             l2_reg=1.0) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(type='fewshot', datasets=datasets, every=every,
                                        shots=shots, seeds=seeds, l2_reg=l2_reg))


def corruption(*, dataset='imagenet2012_corrupted', split='validation', every=0,
               corruptions=tuple(CORRUPTION_ALEXNET_ERRORS),
               severities=(1, 2, 3, 4, 5)) -> ml_collections.ConfigDict:
  """ImageNet-C: top-1 error on `<dataset>/<corruption>_<severity>` for each pair, and the mean
  corruption error (mCE) normalised by AlexNet's errors."""
  return ml_collections.ConfigDict(dict(type='corruption', dataset=dataset, split=split,
                                        every=every, corruptions=corruptions,
                                        severities=severities))


def robustness(every=0) -> dict:
  """The ImageNet-1k distribution shifts of the ViT papers, as TFDS names them: ReaL, v2,
  Sketch, A and R (200 classes each), and ImageNet-C."""
  return {
      'real': classification('validation', dataset='imagenet2012_real', label_key='real_label',
                             every=every),
      'v2': classification('test', dataset='imagenet_v2', every=every),
      'sketch': classification('test', dataset='imagenet_sketch', every=every),
      'imagenet_a': classification('test', dataset='imagenet_a', every=every, classes='present'),
      'imagenet_r': classification('test', dataset='imagenet_r', every=every, classes='present'),
      'imagenet_c': corruption(every=every)}
