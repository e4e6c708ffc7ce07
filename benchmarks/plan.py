r"""Will a recipe fit? Per-device memory and FLOPs of the real train step on a simulated mesh.

python benchmarks/plan.py --model ViT-H_14 --batch 4096 --devices 256 [--fsdp] [--remat] [--res 224]

Lowers and compiles the train step that train.py uses for `--devices` simulated CPU devices
(nothing is allocated: parameters and batch are abstract), and prints XLA's memory analysis of
the compiled step per device (arguments, outputs, temporaries) and its FLOPs per step. CPU
compilation stands in for the accelerator's: buffer sizes carry over, fusion details may not.
"""

import argparse
import os
import sys


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='ViT-B_16')
  parser.add_argument('--batch', type=int, default=4096)
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--res', type=int, default=224)
  parser.add_argument('--accum_steps', type=int, default=1)
  parser.add_argument('--fsdp', action='store_true')
  parser.add_argument('--remat', action='store_true', help='model.transformer.remat')
  args = parser.parse_args()
  # Before JAX starts: the simulated devices.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={args.devices}')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

  import jax
  from throughput import step_config
  from vit_jax import objectives, optim, sharding, train

  config = step_config(args.model, args.res, args.batch, accum_steps=args.accum_steps,
                       sharding='fsdp' if args.fsdp else 'replicate')
  config.model.transformer.remat = args.remat

  mesh = sharding.make_mesh()
  objective = objectives.from_config(config, 21_843)  # ImageNet-21k's classes.
  model = train.create_model(config, objective.num_outputs)
  tx, schedule = optim.make_optimizer(config), optim.make_schedule(config)

  abstract, _ = train.abstract_state(config, model, tx, mesh, (args.res, args.res), objective)
  shardings = train.shardings_of(abstract)
  batch = {'image': jax.ShapeDtypeStruct((args.batch, args.res, args.res, 3), 'float32'),
           'labels': jax.ShapeDtypeStruct((args.batch, 21_843), 'float32')}
  step = train.make_train_step(config, model, tx, schedule, shardings, mesh, objective)
  compiled = step.lower(abstract, batch).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = lambda b: b / 2**30
  parameters = sum(x.size for x in jax.tree.leaves(abstract['params']))
  print(f'{args.model} @{args.res}, global batch {args.batch} (accum {args.accum_steps}), '
        f'{args.devices} devices, {"FSDP" if args.fsdp else "replicated"} parameters'
        f'{", rematerialised blocks" if args.remat else ""}')
  print(f'  parameters                {parameters / 1e6:10.1f} M')
  print(f'  per device: arguments     {gib(memory.argument_size_in_bytes):10.2f} GiB')
  print(f'              outputs       {gib(memory.output_size_in_bytes):10.2f} GiB')
  print(f'              temporaries   {gib(memory.temp_size_in_bytes):10.2f} GiB')
  print(f'              total (donated state counted once) '
        f'{gib(memory.argument_size_in_bytes + memory.temp_size_in_bytes):.2f} GiB')
  print(f'  FLOPs per step (per device, XLA) {cost.get("flops", 0) / 1e12:10.2f} TFLOP')
  sys.stdout.flush()


if __name__ == '__main__':
  main()
