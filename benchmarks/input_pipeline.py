r"""Throughput of the training input pipeline (decode + inception crop + flip + batch) on a folder
of JPEG photographs, per core.

python benchmarks/input_pipeline.py [--images 512] [--size 500] [--crop 224] [--batch 64]
                                    [--antialias]

Unless --folder names one, writes a temporary image folder (`<dir>/train/<class>/*.jpg`) of
photographs: windows of about --size px (the long side) cut at native resolution from the two
photographs scikit-learn ships (427 x 640), flipped at random, re-encoded at JPEG quality 90.
Photographs decode unlike random noise (which has no smooth regions to compress). Then times
`input_pipeline.train_batches` after one warm-up batch.
"""

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from vit_jax import config_lib, input_pipeline


def write_folder(root: str, count: int, size: int, classes: int = 10):
  from sklearn.datasets import load_sample_images
  photos = load_sample_images().images
  rng = np.random.default_rng(0)
  for i in range(count):
    photo = photos[i % len(photos)]
    height = min(int(size * rng.uniform(0.7, 0.9)), photo.shape[0])
    width = min(size, photo.shape[1])
    top = rng.integers(0, photo.shape[0] - height + 1)
    left = rng.integers(0, photo.shape[1] - width + 1)
    window = photo[top:top + height, left:left + width]
    if rng.random() < 0.5:
      window = window[:, ::-1]
    folder = os.path.join(root, 'train', f'class_{i % classes}')
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(window)).save(os.path.join(folder, f'{i}.jpg'),
                                                       quality=90)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--folder', default=None)
  parser.add_argument('--images', type=int, default=512)
  parser.add_argument('--size', type=int, default=500, help='Long side of the written JPEGs.')
  parser.add_argument('--crop', type=int, default=224)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--antialias', action='store_true', help='config.pp.antialias=True.')
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    root = args.folder or tmp
    if not args.folder:
      write_folder(root, args.images, args.size)
    config = config_lib.base_config()
    config.dataset = f'folder:{root}'
    config.pp.crop = args.crop
    if args.antialias:
      config.pp.antialias = True
    source = input_pipeline.get_source(config, 'train')
    batches = input_pipeline.train_batches(config, source, batch_size=args.batch)
    next(batches)  # Warm-up: builds the pipeline and fills the prefetch buffer.
    start = time.perf_counter()
    for _ in range(args.batches):
      next(batches)
    seconds = time.perf_counter() - start
    batches.close()  # Stops tf.data's prefetching before the folder is deleted.
  images_per_second = args.batches * args.batch / seconds
  cores = os.cpu_count()
  print(f'input pipeline: {images_per_second:.1f} img/s on {cores} cores = '
        f'{images_per_second / cores:.1f} img/s/core ({args.size}px JPEG photographs -> '
        f'{args.crop}px crop{", antialiased" if args.antialias else ""})')


if __name__ == '__main__':
  main()
