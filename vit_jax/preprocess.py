"""Image ops for the tf.data pipelines: decode, crops, resize, flip, value range.

Random ops are stateless and take an explicit seed (a shape [2] int tensor), so that an example's
augmentation depends only on the run's seed and the example's position in the stream: the
pipeline can be rebuilt at any step (resume) and gives the same batches.
"""

import tensorflow as tf


def decode(image_bytes):
  """Decodes JPEG / PNG / BMP / GIF bytes to uint8 RGB (grayscale is repeated, alpha dropped)."""
  return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


def inception_crop(image, size, seed, *, min_area=0.05, aspect_ratio=(3 / 4, 4 / 3)):
  """A random crop covering min_area..100% of the image (Szegedy et al.), resized to `size`."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=seed,
      area_range=(min_area, 1.0), aspect_ratio_range=aspect_ratio, min_object_covered=0,
      use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, crop_size)
  crop = tf.image.resize(crop, size, method='bilinear', antialias=True)
  crop.set_shape(list(size) + [3])
  return crop


def resize_and_central_crop(image, resize_size, crop_size):
  """Resizes to `resize_size` (h, w), then takes the central `crop_size` (h, w)."""
  image = tf.image.resize(image, resize_size, method='bilinear', antialias=True)
  top = (resize_size[0] - crop_size[0]) // 2
  left = (resize_size[1] - crop_size[1]) // 2
  return image[top:top + crop_size[0], left:left + crop_size[1]]


def random_flip(image, seed):
  return tf.image.stateless_random_flip_left_right(image, seed)


def to_value_range(image):
  """Maps [0, 255] to [-1, 1], the input range of the official checkpoints."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0
