"""Object detection and instance segmentation: targets, losses, decoding, COCO mAP.

The head (decoders.DetectionHead) predicts, at every location of every pyramid level, a
heat map per class and the distances from the location to the box's four sides. Each object
is assigned to the level whose stride suits its size and to the cell of that level holding its
centre (CenterNet, Zhou et al. 2019, on ViTDet's pyramid):

  heat map   penalty-reduced focal loss against a Gaussian bump around each object's centre
             cell (1 there, exp(-d^2 / 2 sigma^2) around, sigma = the box's side / 6 cells)
  boxes      L1 on log(distance / stride), at the centre cell only
  masks      CondInst: the centre cell's dynamic mask head on the stride-4 mask features;
             dice loss against the instance's mask at stride 4

Decoding keeps the heat map's local maxima (3x3), the `max_detections` best over levels and
classes. Box and mask mAP are pycocotools' COCOeval, the field's reference implementation.
"""

import contextlib
import io
import logging

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import decoders

HEATMAP_ALPHA, HEATMAP_BETA = 2.0, 4.0  # CenterNet's focal-loss exponents.
BOX_WEIGHT, MASK_WEIGHT = 1.0, 1.0


def assign_levels(boxes, strides):
  """Each box's pyramid level (batch, N): the one whose stride is closest to a quarter of the
  box's size sqrt(h w), in log scale."""
  hw = jnp.maximum(boxes[..., 2:] - boxes[..., :2], 1.0)
  size = jnp.sqrt(hw[..., 0] * hw[..., 1])
  distance = jnp.abs(jnp.log2(size[..., None] / (4.0 * jnp.asarray(strides, jnp.float32))))
  return jnp.argmin(distance, axis=-1)


def assign(boxes, classes, geometry):
  """Each object's level, location (index into the flattened locations) and validity."""
  level = assign_levels(boxes, geometry['level_strides'])
  stride = jnp.asarray(geometry['level_strides'], jnp.float32)[level]
  centre = (boxes[..., :2] + boxes[..., 2:]) / 2
  shapes = jnp.asarray(geometry['shapes'])[level]  # (batch, N, 2)
  cell = jnp.clip(jnp.floor(centre / stride[..., None]).astype(jnp.int32), 0, shapes - 1)
  location = jnp.asarray(geometry['offsets'])[level] + cell[..., 0] * shapes[..., 1] + cell[..., 1]
  return level, location, classes >= 0


def heatmap_targets(boxes, classes, geometry, num_classes: int, assigned=None):
  """(batch, L, C) targets: per class, the max over its objects of the Gaussian around each
  object's centre cell, on the object's level only, exactly 1 at the centre cell. `assigned`:
  assign()'s result where the caller has it."""
  level, location, valid = assigned or assign(boxes, classes, geometry)
  centres = jnp.asarray(geometry['centre'])  # (L, 2)
  object_stride = jnp.asarray(geometry['level_strides'], jnp.float32)[level]  # (B, N)
  sigma = jnp.maximum((boxes[..., 2:] - boxes[..., :2]) / object_stride[..., None] / 6.0, 0.5)
  cell_centre = centres[location]  # (B, N, 2): the bump peaks at the cell, as the decoder reads.
  d = (centres[None, None] - cell_centre[:, :, None]) / object_stride[..., None, None]
  bump = jnp.exp(-(d[..., 0] ** 2 / (2 * sigma[..., 0, None] ** 2) +
                   d[..., 1] ** 2 / (2 * sigma[..., 1, None] ** 2)))  # (B, N, L)
  on_level = jnp.asarray(geometry['level'])[None, None] == level[..., None]
  bump = jnp.where(on_level & valid[..., None], bump, 0.0)
  batch = jnp.broadcast_to(jnp.arange(boxes.shape[0])[:, None], classes.shape)
  targets = jnp.zeros((boxes.shape[0], num_classes, centres.shape[0]))
  targets = targets.at[batch, jnp.maximum(classes, 0)].max(bump)
  targets = targets.at[batch, jnp.maximum(classes, 0), location].max(valid.astype(jnp.float32))
  return targets.swapaxes(1, 2)


def heatmap_loss(logits, targets, num_objects):
  """CenterNet's penalty-reduced focal loss, summed and divided by the number of objects."""
  logits = logits.astype(jnp.float32)
  p = jax.nn.sigmoid(logits)
  positive = targets >= 1.0
  positive_loss = -((1 - p) ** HEATMAP_ALPHA) * jax.nn.log_sigmoid(logits)
  negative_loss = -((1 - targets) ** HEATMAP_BETA) * p ** HEATMAP_ALPHA * jax.nn.log_sigmoid(
      -logits)
  return jnp.where(positive, positive_loss, negative_loss).sum() / jnp.maximum(num_objects, 1)


def box_targets(boxes, centre, stride):
  """log(distance / stride) from the location `centre` to the top, left, bottom, right sides."""
  distances = jnp.concatenate([centre - boxes[..., :2], boxes[..., 2:] - centre], axis=-1)
  return jnp.log(jnp.maximum(distances, 0.25 * stride[..., None]) / stride[..., None])


def dice_loss(logits, targets, valid):
  """1 - 2|P.G| / (|P|^2 + |G|^2) per instance, averaged over the valid ones."""
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  targets = targets.astype(jnp.float32)
  overlap = (p * targets).sum((-2, -1))
  total = (p ** 2).sum((-2, -1)) + (targets ** 2).sum((-2, -1))
  loss = 1 - 2 * overlap / jnp.maximum(total, 1e-6)
  return jnp.sum(loss * valid) / jnp.maximum(valid.sum(), 1)


def losses(outputs, labels, geometry, num_classes: int) -> dict:
  """The terms of the loss for a batch of outputs and labels {'boxes' (B, N, 4) in pixels
  (ymin, xmin, ymax, xmax), 'classes' (B, N) (-1: none), 'masks' (B, N, h/4, w/4) optional}."""
  boxes, classes = labels['boxes'].astype(jnp.float32), labels['classes']
  assigned = assign(boxes, classes, geometry)
  _, location, valid = assigned
  num_objects = valid.sum()
  targets = heatmap_targets(boxes, classes, geometry, num_classes, assigned)
  terms = {'heatmap': heatmap_loss(outputs['heatmap'], targets, num_objects)}
  centre = jnp.asarray(geometry['centre'])[location]
  stride = jnp.asarray(geometry['stride'])[location]
  predicted = jnp.take_along_axis(outputs['box'].astype(jnp.float32), location[..., None], 1)
  l1 = jnp.abs(predicted - box_targets(boxes, centre, stride)).sum(-1)
  terms['box'] = BOX_WEIGHT * jnp.sum(l1 * valid) / jnp.maximum(num_objects, 1)
  if 'mask_features' in outputs and 'masks' in labels:
    controller = jnp.take_along_axis(outputs['controller'].astype(jnp.float32),
                                     location[..., None], 1)
    logits = decoders.dynamic_mask_logits(controller, outputs['mask_features'], centre)
    terms['mask'] = MASK_WEIGHT * dice_loss(logits, labels['masks'], valid)
  return terms


def decode(outputs, geometry, max_detections: int = 100) -> dict:
  """The `max_detections` best local maxima of the heat maps, over levels and classes:
  'boxes' (B, K, 4) pixels, 'scores' (B, K), 'classes' (B, K), and with instance masks 'masks'
  (B, K, h/4, w/4) probabilities."""
  heat = jax.nn.sigmoid(outputs['heatmap'].astype(jnp.float32))
  batch, num_locations, num_classes = heat.shape
  peaks = []
  for offset, (h, w) in zip(geometry['offsets'], geometry['shapes']):
    level = heat[:, offset:offset + h * w].reshape(batch, h, w, num_classes)
    pooled = jax.lax.reduce_window(level, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1),
                                   'SAME')
    peaks.append(jnp.where(level == pooled, level, 0.0).reshape(batch, h * w, num_classes))
  peaks = jnp.concatenate(peaks, axis=1).reshape(batch, num_locations * num_classes)
  k = min(max_detections, num_locations * num_classes)
  scores, index = jax.lax.top_k(peaks, k)
  location, classes = index // num_classes, index % num_classes
  centre = jnp.asarray(geometry['centre'])[location]
  stride = jnp.asarray(geometry['stride'])[location][..., None]
  distances = jnp.exp(jnp.take_along_axis(outputs['box'].astype(jnp.float32),
                                          location[..., None], 1)) * stride
  boxes = jnp.concatenate([centre - distances[..., :2], centre + distances[..., 2:]], -1)
  detections = {'boxes': boxes, 'scores': scores, 'classes': classes}
  if 'mask_features' in outputs:
    controller = jnp.take_along_axis(outputs['controller'].astype(jnp.float32),
                                     location[..., None], 1)
    detections['masks'] = jax.nn.sigmoid(
        decoders.dynamic_mask_logits(controller, outputs['mask_features'], centre))
  return detections


def geometry(image_size, strides) -> dict:
  """The flattened locations of every pyramid level, in the order of DetectionHead's outputs:
  'centre' (L, 2) pixel (y, x) of each cell's centre, 'stride' (L,), 'level' (L,); and per
  level its 'offsets' into the locations, grid 'shapes' and 'level_strides'."""
  shapes = [(image_size[0] // s, image_size[1] // s) for s in strides]
  centres, stride_of, level_of = [], [], []
  for level, (stride, (h, w)) in enumerate(zip(strides, shapes)):
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    centres.append(np.stack([yy.ravel(), xx.ravel()], -1) * stride + stride / 2)
    stride_of.append(np.full(h * w, stride))
    level_of.append(np.full(h * w, level))
  return {'centre': np.concatenate(centres).astype(np.float32),
          'stride': np.concatenate(stride_of).astype(np.float32),
          'level': np.concatenate(level_of).astype(np.int32),
          'offsets': np.cumsum([0] + [h * w for h, w in shapes])[:-1],
          'shapes': shapes, 'level_strides': tuple(strides)}


# ------------------------------------------------------------------------------------ COCO mAP

def coco_metrics(images: list, annotations: list, detections: list, num_classes: int,
                 with_masks: bool) -> dict:
  """COCO mAP (IoU 0.5:0.95), AP50 and AP75 of boxes (and masks) with pycocotools.

  images: [{'id', 'height', 'width'}]; annotations: [{'image_id', 'category_id', 'bbox' (x, y,
  w, h), 'iscrowd', 'area', 'segmentation' (RLE, with masks)}]; detections: [{'image_id',
  'category_id', 'bbox', 'score', 'segmentation'}], in the images' original pixels.
  """
  from pycocotools import coco, cocoeval
  ground_truth = coco.COCO()
  ground_truth.dataset = {
      'images': images, 'categories': [{'id': c} for c in range(num_classes)],
      'annotations': [dict(a, id=i + 1) for i, a in enumerate(annotations)]}
  with contextlib.redirect_stdout(io.StringIO()):
    ground_truth.createIndex()
  results = {}
  for kind in ('bbox', 'segm') if with_masks else ('bbox',):
    prefix = 'box' if kind == 'bbox' else 'mask'
    if not detections or not annotations:
      results.update({f'{prefix}_map_test': 0.0, f'{prefix}_ap50_test': 0.0,
                      f'{prefix}_ap75_test': 0.0})
      continue
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
      predicted = ground_truth.loadRes([dict(d) for d in detections])
      evaluation = cocoeval.COCOeval(ground_truth, predicted, kind)
      evaluation.evaluate()
      evaluation.accumulate()
      evaluation.summarize()
    logging.info('COCOeval (%s):\n%s', kind, log.getvalue())
    # stats[k] is -1 where no ground truth qualifies: reported as 0.
    stats = [max(float(s), 0.0) for s in evaluation.stats]
    results.update({f'{prefix}_map_test': stats[0], f'{prefix}_ap50_test': stats[1],
                    f'{prefix}_ap75_test': stats[2]})
  return results
