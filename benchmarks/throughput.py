r"""Throughput of the library's own train step and forward pass for a registry model.

python benchmarks/throughput.py --model ViT-Ti_16 --res 224 --batch 32 [--json]
    [--dtype bfloat16] [--attention dot_product]

Compiles the train step that train.py uses (its optimizer, sharding and donation) and the forward
pass on random data, times them after warm-up (median of --repeats), and prints img/s, GFLOPs per
image (XLA's cost analysis), the peak FLOP/s (on a CPU the measured float32 matmul peak, on an
accelerator its data sheet's dense bfloat16 figure, vit_jax.mfu), the MFU of both, and the peak
memory (host; on an accelerator also the device's). With --json the last line is one JSON object.
"""

import argparse
import json
import resource

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import (config_lib, cpu_tuning, mfu, models, models_vit, objectives, optim, sharding,
                     steps)
from vit_jax.inference_time import median_seconds


def step_config(model: str, res: int, batch: int, attention: str = 'einsum', **updates):
  """The pre-training recipe (Adam, weight decay, clipping) for a registry model."""
  config = config_lib.base_config()
  config.model = models.get_config(model)
  config.model.transformer.attention = attention
  config_lib.pretrain_recipe(config)
  config.pp.crop = res
  config.update(batch=batch, total_steps=100_000, **updates)
  config_lib.check(config, device_count=jax.device_count())
  return config


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='ViT-Ti_16')
  parser.add_argument('--res', type=int, default=224)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--infer_batch', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--dtype', default='float32', choices=config_lib.DTYPES,
                      help='activations (config.dtype); parameters stay float32')
  parser.add_argument('--attention', default='einsum', choices=models_vit.ATTENTIONS)
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()

  config = step_config(args.model, args.res, args.batch, args.attention,
                       batch_eval=args.infer_batch, dtype=args.dtype)
  config.model.representation_size = None  # As timm's models, which have none.

  mesh = sharding.make_mesh()
  objective = objectives.from_config(config, 1000)
  model = steps.create_model(config, objective.num_outputs)
  tx, schedule = optim.make_optimizer(config), optim.make_schedule(config)
  state, shardings = steps.init_state(config, model, tx, mesh, (args.res, args.res),
                                     objective)
  train_step = steps.make_train_step(config, model, tx, schedule, shardings, mesh, objective)
  rng = np.random.default_rng(0)
  batch = sharding.to_global({
      'image': rng.uniform(-1, 1, (args.batch, args.res, args.res, 3)).astype(np.float32),
      'labels': np.eye(1000, dtype=np.float32)[rng.integers(0, 1000, args.batch)]}, mesh)
  train_flops = mfu.flops(train_step.lower(state, batch).compile())

  holder = {'state': state}

  def one_train_step():
    holder['state'], metrics = train_step(holder['state'], batch)
    return metrics

  train_seconds = median_seconds(one_train_step, args.repeats)

  device = jax.local_devices()[0]
  train_peak_bytes = (device.memory_stats() or {}).get('peak_bytes_in_use')

  forward = jax.jit(sharding.under_mesh(
      lambda p, x: model.apply({'params': p}, x, train=False), mesh))
  images = jnp.asarray(rng.uniform(-1, 1, (args.infer_batch, args.res, args.res, 3)),
                       jnp.float32)
  params = holder['state']['params']
  infer_flops = mfu.flops(forward.lower(params, images).compile())
  infer_seconds = median_seconds(lambda: forward(params, images), args.repeats)

  peak = (mfu.matmul_peak_flops() if device.platform == 'cpu' else mfu.device_peak_flops())
  peak = peak / 1e9 if peak else float('nan')  # An accelerator not in mfu.PEAK_TFLOPS: no MFU.
  devices = jax.device_count()
  results = {
      'model': args.model, 'res': args.res, 'batch': args.batch, 'devices': devices,
      'device': f'{device.platform}: {device.device_kind}', 'dtype': args.dtype,
      'attention': args.attention,
      'train_img_s': args.batch / train_seconds,
      'infer_img_s': args.infer_batch / infer_seconds,
      'gflops_per_img_forward': infer_flops / args.infer_batch / 1e9,
      'gflops_per_img_train': train_flops / args.batch / 1e9,
      'peak_gflops': peak,
      'train_mfu': train_flops / train_seconds / 1e9 / (peak * devices),
      'infer_mfu': infer_flops / infer_seconds / 1e9 / (peak * devices),
      'peak_host_memory_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      # The train step's peak on the accelerator (None on a CPU, whose JAX device keeps no
      # statistics), before the forward pass's larger batch runs.
      'peak_device_memory_mb': train_peak_bytes / 2**20 if train_peak_bytes else None,
  }
  for key, value in results.items():
    print(f'{key:>24}: {value:.4g}' if isinstance(value, float) else f'{key:>24}: {value}')
  if args.json:
    print(json.dumps(results))


if __name__ == '__main__':
  cpu_tuning.tune_command_line()  # As python -m vit_jax.main does.
  main()
