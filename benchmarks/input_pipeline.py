r"""Throughput of the training input pipeline (decode + inception crop + flip + batch) on a folder
of JPEGs, per core.

python benchmarks/input_pipeline.py [--images 512] [--size 384] [--crop 224] [--batch 64]

Writes a temporary image folder of random JPEGs (`<dir>/train/<class>/*.jpg`) unless --folder
names one, then times `input_pipeline.train_batches` after one warm-up batch.
"""

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from vit_jax import config_lib, input_pipeline


def write_folder(root: str, count: int, size: int, classes: int = 10):
  rng = np.random.default_rng(0)
  for i in range(count):
    folder = os.path.join(root, 'train', f'class_{i % classes}')
    os.makedirs(folder, exist_ok=True)
    pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f'{i}.jpg'), quality=90)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--folder', default=None)
  parser.add_argument('--images', type=int, default=512)
  parser.add_argument('--size', type=int, default=384, help='Side of the generated JPEGs.')
  parser.add_argument('--crop', type=int, default=224)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--batches', type=int, default=20)
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    root = args.folder or tmp
    if not args.folder:
      write_folder(root, args.images, args.size)
    config = config_lib.base_config()
    config.dataset = f'folder:{root}'
    config.pp.crop = args.crop
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
        f'{images_per_second / cores:.1f} img/s/core ({args.size}px JPEG -> {args.crop}px crop)')


if __name__ == '__main__':
  main()
