"""The embedded "shapes" dataset: discs, squares and triangles on textured backgrounds, with
their class map, boxes and instance masks, generated on the fly (no download), so that the
segmentation and detection recipes run offline as the digits run the classification ones.

Each image is a pure function of (split, index): 1-3 shapes of 10-30 px, each of its own colour,
later ones drawn over earlier ones (a shape's mask and box are what remains visible of it),
on a background of a smooth colour gradient with stripes of another colour.
"""

import numpy as np

IMAGE_SIZE = 64
CLASSES = ('disc', 'square', 'triangle')  # Detection class ids 0..2; segmentation 1..3.
SEGMENTATION_CLASSES = ('background',) + CLASSES
MAX_OBJECTS = 3
MIN_VISIBLE_PIXELS = 24  # A shape mostly hidden by later ones is not an object of the image.
SPLITS = {'train': 2000, 'test': 300}
_SEED = {'train': 1, 'test': 2}


def _background(rng, size):
  yy, xx = np.mgrid[:size, :size] / size
  start, end = rng.uniform(0, 1, (2, 3))
  direction = rng.uniform(-1, 1, 2)
  t = np.clip((yy * direction[0] + xx * direction[1]) / (abs(direction).sum() + 1e-6) + 0.5,
              0, 1)[..., None]
  image = start * (1 - t) + end * t
  angle, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
  stripes = np.sin((yy * np.cos(angle) + xx * np.sin(angle)) * size * 2 * np.pi / period) > 0.6
  image = np.where(stripes[..., None], image * 0.6 + rng.uniform(0, 1, 3) * 0.4, image)
  return image + rng.normal(0, 0.03, image.shape)


def _shape_mask(kind: int, centre, radius, angle, size):
  yy, xx = np.mgrid[:size, :size] + 0.5
  dy, dx = yy - centre[0], xx - centre[1]
  if kind == 0:
    return dy ** 2 + dx ** 2 <= radius ** 2
  # Rotated coordinates: squares and triangles at any angle.
  u = dx * np.cos(angle) + dy * np.sin(angle)
  v = -dx * np.sin(angle) + dy * np.cos(angle)
  if kind == 1:
    half = radius / np.sqrt(2) * 1.2
    return (abs(u) <= half) & (abs(v) <= half)
  # Equilateral triangle inscribed in the circle: inside all three edges' half-planes.
  inside = np.ones_like(u, bool)
  for k in range(3):
    theta = angle + np.pi / 2 + 2 * np.pi * k / 3
    inside &= (dx * np.cos(theta) + dy * np.sin(theta)) <= radius / 2
  return inside


def example(split: str, index: int, size: int = IMAGE_SIZE) -> dict:
  """One example: 'image' uint8 (size, size, 3), 'segmentation' uint8 (size, size) of
  SEGMENTATION_CLASSES ids, and MAX_OBJECTS slots of 'boxes' float32 (ymin, xmin, ymax, xmax) in
  [0, 1], 'classes' int32 (-1: empty slot) and 'masks' uint8 (size, size)."""
  rng = np.random.default_rng([_SEED[split], index])
  image = _background(rng, size)
  owner = np.full((size, size), -1)
  kinds = []
  for i in range(rng.integers(1, MAX_OBJECTS + 1)):
    kind = int(rng.integers(len(CLASSES)))
    radius = rng.uniform(5, 15) * size / IMAGE_SIZE
    centre = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
    mask = _shape_mask(kind, centre, radius, rng.uniform(0, 2 * np.pi), size)
    colour = rng.uniform(0, 1, 3)
    while np.abs(colour - image[mask].mean(0)).sum() < 0.6 if mask.any() else False:
      colour = rng.uniform(0, 1, 3)  # Visible against what it covers.
    image[mask] = colour + rng.normal(0, 0.03, (mask.sum(), 3))
    owner[mask] = i
    kinds.append(kind)
  boxes = np.zeros((MAX_OBJECTS, 4), np.float32)
  classes = np.full(MAX_OBJECTS, -1, np.int32)
  masks = np.zeros((MAX_OBJECTS, size, size), np.uint8)
  segmentation = np.zeros((size, size), np.uint8)
  slot = 0
  for i, kind in enumerate(kinds):
    visible = owner == i
    if visible.sum() < MIN_VISIBLE_PIXELS:
      continue
    rows, columns = np.flatnonzero(visible.any(1)), np.flatnonzero(visible.any(0))
    boxes[slot] = np.array([rows[0], columns[0], rows[-1] + 1, columns[-1] + 1]) / size
    classes[slot], masks[slot] = kind, visible
    segmentation[visible] = kind + 1
    slot += 1
  return {'image': np.round(np.clip(image, 0, 1) * 255).astype(np.uint8),
          'segmentation': segmentation, 'boxes': boxes, 'classes': classes, 'masks': masks}


def split_examples(split: str, indices) -> dict:
  """The examples `indices` of the split, stacked."""
  examples = [example(split, int(i)) for i in indices]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
