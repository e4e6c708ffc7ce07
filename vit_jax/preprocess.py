"""Image ops for the tf.data pipelines: decode, crops, resize, flip, value range.

Random ops are stateless and take an explicit seed (a shape [2] int tensor), so that an example's
augmentation depends only on the run's seed and the example's position in the stream: the
pipeline can be rebuilt at any step (resume) and gives the same batches.
"""

import tensorflow as tf


def decode(image_bytes):
  """Decodes JPEG / PNG / BMP / GIF bytes to uint8 RGB (grayscale is repeated, alpha dropped)."""
  return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


def _crop_window(shape, seed, min_area, aspect_ratio):
  """A random (begin, size) covering min_area..100% of an image of `shape` (Szegedy et al.)."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.zeros([0, 0, 4], tf.float32), seed=seed, area_range=(min_area, 1.0),
      aspect_ratio_range=aspect_ratio, min_object_covered=0, use_image_if_no_bounding_boxes=True)
  return begin, crop_size


def resize(image, size, antialias):
  """Bilinear resize to `size` (h, w), float32 out. antialias=False samples the image as the
  official ViT pipeline did; True widens the filter when shrinking, so that detail finer than the
  new pixel grid is averaged instead of aliased (about twice the cost)."""
  image = tf.image.resize(image, size, method='bilinear', antialias=antialias)
  image.set_shape(list(size) + [3])
  return image


def inception_crop(image, size, seed, *, min_area=0.05, aspect_ratio=(3 / 4, 4 / 3),
                   antialias=False):
  """A random crop of a decoded image, resized to `size`."""
  begin, crop_size = _crop_window(tf.shape(image), seed, min_area, aspect_ratio)
  return resize(tf.slice(image, begin, crop_size), size, antialias)


def decode_and_inception_crop(image_bytes, size, seed, *, min_area=0.05,
                              aspect_ratio=(3 / 4, 4 / 3), antialias=False):
  """inception_crop(decode(image_bytes), ...), the same crop for the same seed; of a JPEG only
  the crop is decoded (most of a training image is thrown away: decoding it is the pipeline's
  largest cost)."""
  def jpeg():
    begin, crop_size = _crop_window(tf.image.extract_jpeg_shape(image_bytes), seed, min_area,
                                    aspect_ratio)
    window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def other():
    image = decode(image_bytes)
    begin, crop_size = _crop_window(tf.shape(image), seed, min_area, aspect_ratio)
    return tf.slice(image, begin, crop_size)

  return resize(tf.cond(tf.image.is_jpeg(image_bytes), jpeg, other), size, antialias)


def resize_and_central_crop(image, resize_size, crop_size, *, antialias):
  """Resizes to `resize_size` (h, w), then takes the central `crop_size` (h, w)."""
  image = resize(image, resize_size, antialias)
  top = (resize_size[0] - crop_size[0]) // 2
  left = (resize_size[1] - crop_size[1]) // 2
  return image[top:top + crop_size[0], left:left + crop_size[1]]


def resize_shorter_and_crop(image, shortest_edge: int, crop, method: str = 'bicubic'):
  """What CLIP's, SigLIP's and DINOv2's image processors do: the shorter side to
  `shortest_edge` (the longer one in proportion, rounded down), filtered as PIL does when it
  shrinks (antialias), rounded to whole 8-bit values as their PIL images are; then the central
  `crop` (h, w)."""
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short, long = tf.minimum(h, w), tf.maximum(h, w)
  new_long = tf.cast(shortest_edge * long / short, tf.int32)  # int() of the ratio, as theirs.
  size = tf.where(h <= w, tf.stack([shortest_edge, new_long]), tf.stack([new_long, shortest_edge]))
  image = tf.image.resize(image, size, method=method, antialias=True)
  image = tf.clip_by_value(tf.round(image), 0, 255)
  top, left = (size[0] - crop[0]) // 2, (size[1] - crop[1]) // 2
  image = image[top:top + crop[0], left:left + crop[1]]
  image.set_shape(list(crop) + [3])
  return image


def random_flip(image, seed):
  return tf.image.stateless_random_flip_left_right(image, seed)


def to_value_range(image, mean=None, std=None):
  """Maps [0, 255] to [-1, 1], the input range of the official checkpoints; with `mean` and
  `std` (per channel, of [0, 1] pixels, as Hugging Face's image processors say) to
  (pixel - mean) / std instead."""
  if mean is None:
    return tf.cast(image, tf.float32) / 127.5 - 1.0
  return (tf.cast(image, tf.float32) / 255.0 - tf.constant(mean, tf.float32)) / tf.constant(
      std, tf.float32)


# ----------------------------------------------------------- AugReg regularisers (Steiner et al.)

def _blend(image, other, factor):
  """image + factor * (image - other), in float, clipped to [0, 255]."""
  return tf.clip_by_value(other + factor * (image - other), 0.0, 255.0)


def _transform(image, matrix):
  """Applies a projective transform [a0 a1 a2 b0 b1 b2 0 0] (output -> input), grey fill."""
  size = tf.shape(image)[:2]
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(matrix, tf.float32)[None], output_shape=size,
      interpolation='BILINEAR', fill_mode='CONSTANT', fill_value=128.0)[0]


def _rotate(image, degrees):
  angle = degrees * 3.14159265 / 180.0
  height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx, cy = (width - 1) / 2, (height - 1) / 2  # Rotate about the centre.
  return _transform(image, [cos, -sin, cx - cos * cx + sin * cy,
                            sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])


def _equalize(image):
  def channel(c):
    histogram = tf.histogram_fixed_width(c, [0.0, 255.0], nbins=256)
    cdf = tf.cast(tf.cumsum(histogram), tf.float32)
    cdf = (cdf - cdf[0]) / tf.maximum(cdf[-1] - cdf[0], 1.0) * 255.0
    return tf.gather(cdf, tf.cast(c, tf.int32))
  return tf.stack([channel(image[..., i]) for i in range(3)], axis=-1)


def _autocontrast(image):
  low = tf.reduce_min(image, axis=(0, 1), keepdims=True)
  high = tf.reduce_max(image, axis=(0, 1), keepdims=True)
  return tf.where(high > low, (image - low) * 255.0 / tf.maximum(high - low, 1.0), image)


def _sharpness(image, factor):
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'SAME')[0]
  return _blend(image, smooth, factor)


def _grey(image):
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def randaugment(image, seed, *, num_layers: int = 2, magnitude: float = 10.0):
  """RandAugment (Cubuk et al. 2020) on a float [0, 255] image: `num_layers` operations drawn
  uniformly, each at `magnitude` (0..10) with a random sign where it has one."""
  level = magnitude / 10.0
  size = tf.cast(tf.shape(image)[:2], tf.float32)
  for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_layers)):
    choice_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 2))
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    factor = 1.0 + sign * 0.9 * level
    operations = [
        lambda: image,
        lambda: _autocontrast(image),
        lambda: _equalize(image),
        lambda: _rotate(image, sign * 30.0 * level),
        lambda: tf.where(image >= 256.0 - 256.0 * level, 255.0 - image, image),  # solarize
        lambda: _blend(image, _grey(image), factor),                              # colour
        lambda: tf.floor(image / 2.0**int(4 * level)) * 2.0**int(4 * level),     # posterize
        lambda: _blend(image, tf.reduce_mean(_grey(image)), factor),              # contrast
        lambda: _blend(image, tf.zeros_like(image), factor),                      # brightness
        lambda: _sharpness(image, factor),
        lambda: _transform(image, [1.0, sign * 0.3 * level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]),
        lambda: _transform(image, [1.0, 0.0, 0.0, sign * 0.3 * level, 1.0, 0.0, 0.0, 0.0]),
        lambda: _transform(image, [1.0, 0.0, sign * 0.45 * level * size[1], 0.0, 1.0, 0.0,
                                   0.0, 0.0]),
        lambda: _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, sign * 0.45 * level * size[0],
                                   0.0, 0.0]),
    ]
    index = tf.random.stateless_uniform([], choice_seed, 0, len(operations), tf.int32)
    image = tf.ensure_shape(tf.switch_case(index, operations), image.shape)
  return image


def mixup(batch, seed, alpha: float):
  """Mixes each example with its neighbour in the batch, images and labels alike, with one
  weight lambda ~ Beta(alpha, alpha) per batch (Zhang et al. 2018)."""
  gamma_seeds = tf.random.experimental.stateless_split(seed, 2)
  a = tf.random.stateless_gamma([], gamma_seeds[0], alpha)
  b = tf.random.stateless_gamma([], gamma_seeds[1], alpha)
  weight = a / (a + b)
  mix = lambda x: weight * x + (1.0 - weight) * tf.roll(x, shift=1, axis=0)
  return dict(batch, image=mix(batch['image']), labels=mix(batch['labels']))
