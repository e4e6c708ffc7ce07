"""Model FLOPs utilisation (MFU): the FLOPs a step must do, per second, as a share of what the
devices can do at most, so that a run shows at once how far it is from the hardware.

FLOPs per image: XLA's count of the model's forward pass (ViT-B/16 at 224 px: 35.3 GFLOPs, the
paper's 17.6 G multiply-adds), and 3x that for a training step (forward, and a backward pass
twice as costly). The peak: the dense bfloat16 figure of the accelerator's data sheet per JAX
device, or on a CPU the best float32 matrix-product rate measured here.
"""

import functools
import time
from typing import Optional

import jax
import jax.numpy as jnp

# Dense bfloat16 TFLOP/s per JAX device (TPU v2/v3: one of a chip's two cores; the more specific
# names first).
PEAK_TFLOPS = (('TPU v2', 22.5), ('TPU v3', 61.5), ('TPU v4', 275.0), ('TPU v5 lite', 197.0),
               ('TPU v5e', 197.0), ('TPU v5p', 459.0), ('TPU v5', 459.0),
               ('TPU v6 lite', 918.0), ('TPU v6e', 918.0), ('H100 PCIe', 756.0),
               ('H100', 989.0), ('H200', 989.0), ('A100', 312.0))


def forward_flops_per_image(model, params, image_size, **inputs) -> Optional[float]:
  """XLA's FLOP count of model.apply on one image (lowered, not compiled); `params` may be
  abstract. None where XLA gives no count."""
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  images = jax.ShapeDtypeStruct((1,) + tuple(image_size) + (3,), jnp.float32)
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False, **inputs))
  return flops(forward.lower(params, images))


def flops(lowered_or_compiled) -> Optional[float]:
  analysis = lowered_or_compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  value = (analysis or {}).get('flops')
  return float(value) if value else None


@functools.lru_cache(maxsize=None)
def peak_flops(device_kind: str, platform: str) -> Optional[float]:
  """FLOP/s per device at most: the data sheet's for a known accelerator, a measured float32
  matrix product on a CPU, None for an accelerator not in PEAK_TFLOPS."""
  if platform == 'cpu':
    return matmul_peak_flops(sizes=(1024, 2048), repeats=3)
  for name, tflops in PEAK_TFLOPS:
    if name in device_kind:
      return tflops * 1e12
  return None


def matmul_peak_flops(sizes=(1024, 2048, 3072), repeats: int = 10) -> float:
  """The best float32 FLOP/s of square matrix products (each the fastest of `repeats`). The
  best, not a typical value, so that MFU is not flattered."""
  best = 0.0
  product = jax.jit(lambda x: x @ x)
  for size in sizes:
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size))
    jax.block_until_ready(product(a))
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(product(a))
      best = max(best, 2 * size**3 / (time.perf_counter() - start))
  return best


def device_peak_flops() -> Optional[float]:
  device = jax.devices()[0]
  return peak_flops(device.device_kind, device.platform)
