"""Semantic segmentation: the per-pixel loss and the metrics (mIoU, pixel accuracy).

The decoder's logits (batch, H/P, W/P, K) are upsampled bilinearly to the image (Segmenter);
pixels labelled IGNORE (unlabelled, or padding outside the image) count in neither the loss nor
the metrics. Evaluation scores each image at its original size: the prediction is resized back
to it (evaluators.Segmentation) and added to a K x K confusion matrix, exact over the split.
"""

import jax
import jax.numpy as jnp
import numpy as np

IGNORE = 255


def upsample(logits, size):
  """(batch, h, w, K) -> (batch, size[0], size[1], K), bilinear, in float32."""
  logits = logits.astype(jnp.float32)
  return jax.image.resize(logits, (logits.shape[0],) + tuple(size) + (logits.shape[-1],),
                          'bilinear')


def pixel_losses(logits, labels):
  """Softmax cross-entropy per pixel (batch, H, W) and whether it counts (label != IGNORE)."""
  valid = labels != IGNORE
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  losses = -jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
  return jnp.where(valid, losses, 0.0), valid


def mean_loss(logits, labels):
  losses, valid = pixel_losses(upsample(logits, labels.shape[1:3]), labels)
  return losses.sum() / jnp.maximum(valid.sum(), 1)


def confusion_matrix(predicted, labels, num_classes: int) -> np.ndarray:
  """K x K counts, [true class, predicted class], of the pixels not labelled IGNORE."""
  predicted, labels = np.asarray(predicted).ravel(), np.asarray(labels).ravel()
  keep = labels != IGNORE
  if np.any(labels[keep] >= num_classes):
    raise ValueError(f'A label map holds class {labels[keep].max()}, but the model has '
                     f'{num_classes} classes (unlabelled pixels: {IGNORE}).')
  return np.bincount(labels[keep].astype(np.int64) * num_classes + predicted[keep],
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics(confusion) -> dict:
  """mIoU over the classes that occur (in the labels or the predictions), pixel accuracy, and
  each class' IoU (None where the class never occurs)."""
  confusion = np.asarray(confusion, np.float64)
  true_positive = np.diag(confusion)
  union = confusion.sum(0) + confusion.sum(1) - true_positive
  iou = [float(t / u) if u else None for t, u in zip(true_positive, union)]
  present = [i for i in iou if i is not None]
  return {'miou_test': float(np.mean(present)) if present else 0.0,
          'pixel_accuracy_test': float(true_positive.sum() / max(confusion.sum(), 1)),
          'iou_per_class_test': iou}
