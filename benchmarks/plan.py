r"""Will a recipe fit, and how long does it take to compile? The real train step on a simulated mesh.

python benchmarks/plan.py --model ViT-H_14 --batch 4096 --devices 256 --fsdp --scan \
    --remat dots_no_batch --optim_dtype bfloat16 [--attention dot_product] [--res 224] [--json]

Lowers and compiles the train step that train.py uses for `--devices` simulated CPU devices
(nothing is allocated: parameters and batch are abstract), and prints XLA's memory analysis of
the compiled step per device (arguments, outputs, temporaries), its FLOPs per device and the
seconds from tracing to a compiled program. CPU compilation stands in for the accelerator's:
buffer sizes carry over, fusion details may not. With --json the last line is one JSON object.
"""

import argparse
import json
import os
import sys
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='ViT-B_16')
  parser.add_argument('--batch', type=int, default=4096)
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--res', type=int, default=224)
  parser.add_argument('--accum_steps', type=int, default=1)
  parser.add_argument('--fsdp', action='store_true', help="sharding='fsdp'")
  parser.add_argument('--scan', action='store_true', help='model.transformer.scan')
  parser.add_argument('--remat', default='none', help='model.transformer.remat (a policy)')
  parser.add_argument('--attention', default='einsum', help='model.transformer.attention')
  parser.add_argument('--optim_dtype', default='float32', help='Adam\'s first moment')
  parser.add_argument('--dtype', default='float32', help='activations')
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  # Before JAX starts: the simulated devices, and no cache that would hide compile time.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={args.devices}')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

  import jax
  from throughput import step_config
  from vit_jax import config_lib, objectives, optim, sharding, steps

  config = step_config(args.model, args.res, args.batch, accum_steps=args.accum_steps,
                       sharding='fsdp' if args.fsdp else 'replicate',
                       optim_dtype=args.optim_dtype, dtype=args.dtype)
  config.model.transformer.update(scan=args.scan, remat=args.remat, attention=args.attention)
  config_lib.check(config, device_count=jax.device_count())

  mesh = sharding.make_mesh()
  batch = {'image': jax.ShapeDtypeStruct((args.batch, args.res, args.res, 3), 'float32'),
           'labels': jax.ShapeDtypeStruct((args.batch, 21_843), 'float32')}

  def lowered_step(config):
    objective = objectives.from_config(config, 21_843)  # ImageNet-21k's classes.
    model = steps.create_model(config, objective.num_outputs)
    tx, schedule = optim.make_optimizer(config), optim.make_schedule(config)
    abstract, _ = steps.abstract_state(config, model, tx, mesh, (args.res, args.res), objective)
    step = steps.make_train_step(config, model, tx, schedule, steps.shardings_of(abstract), mesh,
                                 objective)
    return step.lower(abstract, batch), abstract

  start = time.perf_counter()
  lowered, abstract = lowered_step(config)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  # XLA counts a loop's body once: the FLOPs are those of the same step without loops (the
  # blocks unrolled, one micro-batch), from its lowered (not compiled) program.
  flat_config = config.copy_and_resolve_references()
  flat_config.model.transformer.scan = False
  flat_config.accum_steps = 1
  # (A lowered program is the global one, before it is split over the devices.)
  if args.scan or args.accum_steps > 1:
    flops = lowered_step(flat_config)[0].cost_analysis()['flops'] / args.devices
  else:
    flops = compiled.cost_analysis()['flops']
  gib = lambda b: b / 2**30
  results = {
      'model': args.model, 'res': args.res, 'batch': args.batch, 'devices': args.devices,
      'sharding': config.sharding, 'scan': args.scan, 'remat': args.remat,
      'attention': args.attention, 'optim_dtype': args.optim_dtype, 'dtype': args.dtype,
      'parameters_m': sum(x.size for x in jax.tree.leaves(abstract['params'])) / 1e6,
      'argument_gib': gib(memory.argument_size_in_bytes),
      'output_gib': gib(memory.output_size_in_bytes),
      'temp_gib': gib(memory.temp_size_in_bytes),
      # The state is donated: its outputs reuse the arguments' buffers.
      'total_gib': gib(memory.argument_size_in_bytes + memory.temp_size_in_bytes),
      'tflop_per_device': flops / 1e12,
      'compile_s': compile_s,
  }
  print(f'{args.model} @{args.res}, global batch {args.batch} (accum {args.accum_steps}), '
        f'{args.devices} devices, {config.sharding} parameters, scan={args.scan}, '
        f'remat={args.remat}, attention={args.attention}, optim_dtype={args.optim_dtype}, '
        f'dtype={args.dtype}')
  print(f'  parameters                {results["parameters_m"]:10.1f} M')
  print(f'  per device: arguments     {results["argument_gib"]:10.2f} GiB')
  print(f'              outputs       {results["output_gib"]:10.2f} GiB')
  print(f'              temporaries   {results["temp_gib"]:10.2f} GiB')
  print(f'              total (donated state counted once) {results["total_gib"]:.2f} GiB')
  print(f'  FLOPs per step (per device, XLA) {results["tflop_per_device"]:10.2f} TFLOP')
  print(f'  trace + compile           {compile_s:10.1f} s')
  if args.json:
    print(json.dumps(results))
  sys.stdout.flush()


if __name__ == '__main__':
  main()
