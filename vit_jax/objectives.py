"""What a run learns: the number of outputs, the loss, and what evaluation counts.

Five objectives, chosen by `config.objective` and `config.loss`:

  classification   softmax cross-entropy, one label per image (the paper's fine-tuning, ImageNet-1k)
  multi-label      sigmoid cross-entropy, several labels per image (ImageNet-21k pre-training)
  mpp              masked patch prediction (paper Sec. 4.6, mpp.py): the 3-bit mean colour of
                   each corrupted patch, 512 classes; the labels are not used
  segmentation     a class per pixel (segmentation.py), through a decoder on the patch grid
  detection        boxes, and with instance masks their masks (detection.py), through ViTDet's
                   pyramid and an anchor-free head

Dense objectives (segmentation, detection) are scored by their own evaluators from `predict`
(the metrics need each image at its original size, on the host: mIoU, COCO mAP).

The trainer, `evaluate`, `inference_time`, the benchmarks and the notebook ask the objective
instead of branching on the config. Evaluation is a sum over batches (`eval_sums`, each example
counted where its mask is 1) turned into metrics at the end (`metrics`).
"""

import jax
import jax.numpy as jnp
import optax

from vit_jax import detection, models, mpp, segmentation


CALIBRATION_BINS = 15  # Equal-width confidence bins of the expected calibration error.


class Classification:
  """Softmax cross-entropy over `num_classes`; top-1 / top-5 accuracy, the mean negative
  log-likelihood (loss_test) and the expected calibration error of the top-1 confidence."""
  name = 'classification'
  metric_names = ('accuracy_test', 'accuracy_test_top5', 'loss_test')
  # The model's pooling: one output per image.
  classifiers = ('token', 'gap', 'map', 'token_and_gap')
  uses_labels = True  # The dataset's labels (and so its class names) are what it learns.
  dense = False  # Scored per image by the objective's metrics (not by a dense evaluator).
  decoders = ()  # The model has no decoder.

  def __init__(self, num_classes: int):
    self.num_outputs = num_classes

  def per_example_loss(self, logits, labels):
    return optax.softmax_cross_entropy(logits, labels)

  def probabilities(self, logits):
    return jax.nn.softmax(logits)

  def init_inputs(self, rng, model_config, image_size) -> dict:
    """Keyword arguments of model.init besides the images."""
    del rng, model_config, image_size
    return {}

  def loss(self, model, params, batch, rng):
    logits = model.apply({'params': params}, batch['image'], train=True, rngs={'dropout': rng})
    return self.per_example_loss(logits.astype(jnp.float32), batch['labels']).mean()

  def eval_sums(self, model, params, batch) -> dict:
    """Sums over the batch: `examples` read, `count` scored. An example without any label (in
    ImageNet ReaL, those the re-labelling left unlabelled) is read but not scored."""
    mask = batch['mask']
    scored = mask * (batch['labels'].sum(-1) > 0)
    logits = model.apply({'params': params}, batch['image'], train=False).astype(jnp.float32)
    if 'classes' in batch:  # Only these can be predicted (ImageNet-A/R: 200 of 1000 classes).
      logits = jnp.where(batch['classes'] > 0, logits, -1e9)
    _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))
    # Correct if a true class is among the top k (multi-label: any of them).
    hits = jnp.take_along_axis(batch['labels'], top, axis=-1) > 0
    # Calibration (Guo et al. 2017): per confidence bin, how many, how confident, how right.
    confidence = jnp.take_along_axis(self.probabilities(logits), top[:, :1], axis=-1)[:, 0]
    bins = jnp.minimum(jnp.floor(confidence * CALIBRATION_BINS), CALIBRATION_BINS - 1)
    in_bin = jax.nn.one_hot(bins.astype(jnp.int32), CALIBRATION_BINS) * scored[:, None]
    return {'top1': jnp.sum(hits[:, 0] * scored), 'top5': jnp.sum(hits.any(-1) * scored),
            'loss': jnp.sum(self.per_example_loss(logits, batch['labels']) * scored),
            'count': jnp.sum(scored), 'examples': jnp.sum(mask),
            'bin_count': in_bin.sum(0), 'bin_confidence': (in_bin * confidence[:, None]).sum(0),
            'bin_hits': (in_bin * hits[:, :1]).sum(0)}

  def metrics(self, totals) -> dict:
    """The scalar metrics, and (classification) 'ece_test' with the reliability diagram's bins
    under 'reliability_test' (their mean confidence, accuracy and count; None where empty)."""
    count = float(totals['count'])
    metrics = dict(zip(self.metric_names, (float(totals['top1']) / count,
                                           float(totals['top5']) / count,
                                           float(totals['loss']) / count)))
    if 'bin_count' in totals:
      metrics['ece_test'] = expected_calibration_error(
          totals['bin_count'], totals['bin_confidence'], totals['bin_hits'])
      metrics['reliability_test'] = {
          'confidence': [float(c / n) if n else None
                         for c, n in zip(totals['bin_confidence'], totals['bin_count'])],
          'accuracy': [float(h / n) if n else None
                       for h, n in zip(totals['bin_hits'], totals['bin_count'])],
          'count': [int(n) for n in totals['bin_count']]}
    return metrics


def expected_calibration_error(count, confidence, hits) -> float:
  """sum over bins of |accuracy - confidence|, weighted by the bin's share of the examples, from
  per-bin sums of examples, confidences and correct predictions."""
  return float(sum(abs(h - c) for h, c in zip(hits, confidence)) / sum(count))


class MultiLabel(Classification):
  """Independent sigmoids, one per class; top-k counts a hit for any true class."""
  name = 'multi_label'

  def per_example_loss(self, logits, labels):
    return optax.sigmoid_binary_cross_entropy(logits, labels).sum(-1)

  def probabilities(self, logits):
    return jax.nn.sigmoid(logits)


class MaskedPatchPrediction(Classification):
  """Colour classes of the corrupted patches; the dataset's labels are ignored."""
  name = 'mpp'
  metric_names = ('mpp_accuracy_test', 'mpp_accuracy_test_top5', 'loss_test')
  classifiers = ('unpooled',)  # One output per patch.
  uses_labels = False

  def __init__(self, num_classes: int = 0):
    del num_classes  # The colours, not the dataset, make the classes.
    super().__init__(mpp.NUM_COLOURS)

  def init_inputs(self, rng, model_config, image_size) -> dict:
    stride = models.token_stride(model_config)  # The corruption creates the [mask] embedding.
    num_patches = (image_size[0] // stride[0]) * (image_size[1] // stride[1])
    return {'patch_corruption': mpp.sample_corruption(rng, 1, num_patches)}

  def loss(self, model, params, batch, rng):
    corruption_rng, dropout_rng = jax.random.split(rng)
    losses, _, _ = mpp.loss_and_accuracy(model, params, batch['image'], corruption_rng,
                                         train=True, dropout_rng=dropout_rng)
    return losses.mean()

  def eval_sums(self, model, params, batch) -> dict:
    mask = batch['mask']  # One fixed corruption, so that evaluations compare.
    losses, top1, top5 = mpp.loss_and_accuracy(model, params, batch['image'],
                                               jax.random.PRNGKey(0), train=False)
    return {'top1': jnp.sum(top1 * mask), 'top5': jnp.sum(top5 * mask),
            'loss': jnp.sum(losses * mask), 'count': jnp.sum(mask), 'examples': jnp.sum(mask)}


class Segmentation:
  """A class per pixel: the decoder's logits upsampled to the image, cross-entropy over the
  labelled pixels; scored (evaluators.Segmentation) by mIoU and pixel accuracy."""
  name = 'segmentation'
  metric_names = ('miou_test', 'pixel_accuracy_test')
  classifiers = ('token', 'gap')  # The decoder reads the patch tokens; a class token is unread.
  decoders = ('linear', 'mask_transformer')
  uses_labels = True
  dense = True

  def __init__(self, num_classes: int, config=None):
    del config
    self.num_outputs = num_classes

  def init_inputs(self, rng, model_config, image_size) -> dict:
    del rng, model_config, image_size
    return {}

  def loss(self, model, params, batch, rng):
    logits = model.apply({'params': params}, batch['image'], train=True, rngs={'dropout': rng})
    return segmentation.mean_loss(logits, batch['labels']['segmentation'])

  def predict(self, model, params, images):
    """The class of every pixel of the input (batch, H, W)."""
    logits = model.apply({'params': params}, images, train=False)
    return segmentation.upsample(logits, images.shape[1:3]).argmax(-1).astype(jnp.int32)


class Detection:
  """Boxes (and with model.decoder.instance_masks, their masks) of `num_classes` classes;
  scored (evaluators.Detection) by COCO box (and mask) mAP."""
  name = 'detection'
  metric_names = ('box_map_test', 'box_ap50_test', 'box_ap75_test')
  classifiers = ('token', 'gap')
  decoders = ('detection',)
  uses_labels = True
  dense = True

  def __init__(self, num_classes: int, config=None):
    self.num_outputs = num_classes
    decoder = config.model.decoder
    crop = config.pp.crop  # (config_lib.image_size: config_lib imports this module.)
    image_size = (crop, crop) if isinstance(crop, int) else tuple(crop)
    self.geometry = detection.geometry(image_size, decoder.strides)
    self.max_detections = config.max_detections
    self.instance_masks = bool(decoder.get('instance_masks', False))

  def init_inputs(self, rng, model_config, image_size) -> dict:
    del rng, model_config, image_size
    return {}

  def loss(self, model, params, batch, rng):
    outputs = model.apply({'params': params}, batch['image'], train=True, rngs={'dropout': rng})
    terms = detection.losses(outputs, batch['labels'], self.geometry, self.num_outputs)
    return sum(terms.values())

  def predict(self, model, params, images):
    """detection.decode of the outputs: boxes in the input's pixels, scores, classes, masks."""
    outputs = model.apply({'params': params}, images, train=False)
    return detection.decode(outputs, self.geometry, self.max_detections)


def kind(config):
  """The objective's class: what config.objective and config.loss ask for."""
  if config.objective == 'mpp':
    return MaskedPatchPrediction
  if config.objective == 'segmentation':
    return Segmentation
  if config.objective == 'detection':
    return Detection
  return MultiLabel if config.loss == 'sigmoid_xent' else Classification


def from_config(config, num_classes: int):
  """The objective of `config` for a dataset of `num_classes` classes."""
  if kind(config) is Classification and num_classes < 2:
    raise ValueError(f'dataset={config.dataset} has {num_classes} class: a softmax over one '
                     'class is always right (loss 0, accuracy 1) and learns nothing. Give it at '
                     'least two classes (an image folder: one sub-folder per class).')
  if getattr(kind(config), 'dense', False):
    return kind(config)(num_classes, config)
  return kind(config)(num_classes)
