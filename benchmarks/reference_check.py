r"""Every registry model at full size against the official forward pass written in plain
jax.numpy (tests/official_reference.py): random parameters written as official .npz, random
images, the largest absolute logit difference per model.

  python benchmarks/reference_check.py [--models ViT-B_16 R50+ViT-B_16 ...] [--res 224]
                                       [--dtype float64|float32]

In float64 (the default) the two sides differ by ~1e-15 unless a formula differs. In float32 they
also differ by rounding in another summation order: ~1e-7..1e-6 for logits of order 1, and up to
~1.5e-5 for the deepest hybrid (Flax's GroupNorm takes the variance in one pass, the reference in
two).
Exits non-zero above --tolerance.
"""

import argparse
import os
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
import official_reference  # noqa: E402
from vit_jax import models  # noqa: E402


def main():
  registry = [name for name in models.MODEL_CONFIGS if not name.startswith('testing')]
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', nargs='+', default=registry, choices=registry)
  parser.add_argument('--res', type=int, default=224)
  parser.add_argument('--dtype', default='float64', choices=('float64', 'float32'))
  parser.add_argument('--tolerance', type=float, default=1e-6)
  parser.add_argument('--conv_scale', type=float, default=1e-3,
                      help="Scale of the hybrids' ResNet kernels (0.02 normal draws times this).")
  args = parser.parse_args()

  worst = 0.0
  print(f'{"model":22s} {"layers":>6s} {"max |logit|":>12s} {"max |difference|":>17s} {"s":>6s}')
  with tempfile.TemporaryDirectory() as directory, jax.enable_x64(args.dtype == 'float64'):
    for name in args.models:
      start = time.perf_counter()
      difference, largest = official_reference.compare_registry_model(
          name, os.path.join(directory, 'model.npz'), image_size=(args.res, args.res),
          dtype=args.dtype, conv_scale=args.conv_scale)
      layers = models.get_config(name).transformer.num_layers
      print(f'{name:22s} {layers:6d} {largest:12.4f} {difference:17.2e} '
            f'{time.perf_counter() - start:6.1f}', flush=True)
      worst = max(worst, difference)
  print(f'largest difference: {worst:.2e} ({args.dtype}, {args.res} px)')
  sys.exit(worst > args.tolerance)


if __name__ == '__main__':
  main()
