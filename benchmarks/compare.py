r"""vit_jax against PyTorch timm, side by side in one run: train-step and inference img/s.

python benchmarks/compare.py [--models ViT-Ti_16 ViT-S_16] [--res 224] [--batch 32]
    [--dtype bfloat16] [--attention einsum dot_product]

Each vit_jax measurement is benchmarks/throughput.py in its own process (JAX and PyTorch then
do not share threads); timm runs here: AdamW with weight decay and gradient clipping, softmax
cross-entropy, the same batch sizes (64 for inference), median of the same repetitions.
Needs the `bench` extra (pip install -e '.[bench]').

On a CPU each model also runs without vit_jax.cpu_tuning's settings. On a GPU timm runs on it
too (`--dtype bfloat16`: under bfloat16 torch.autocast, as timm's train.py with --amp
--amp-dtype bfloat16), and the table adds each side's peak device memory, e.g. for ViT-B/16:
python benchmarks/compare.py --models ViT-B_16 --batch 256 --infer_batch 512 --dtype bfloat16
    --attention einsum dot_product
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

TIMM_NAMES = {'ViT-Ti_16': 'vit_tiny_patch16_224', 'ViT-S_16': 'vit_small_patch16_224',
              'ViT-S_32': 'vit_small_patch32_224', 'ViT-B_16': 'vit_base_patch16_224',
              'ViT-B_32': 'vit_base_patch32_224'}


def cpu_description() -> str:
  """The CPU's model name and widest vector instructions: the ratio to timm depends on them
  (1.49x train on a Zen 4 with AVX-512, 0.99x on a Zen 2 with AVX2 only, same code)."""
  model, flags = 'unknown CPU', set()
  if os.path.exists('/proc/cpuinfo'):
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name':
          model = value.strip()
        elif key.strip() == 'flags':
          flags = set(value.split())
  extensions = [name for name, flag in [('AVX2', 'avx2'), ('AVX-512', 'avx512f'),
                                        ('AVX-512 BF16', 'avx512_bf16'), ('AMX', 'amx_tile')]
                if flag in flags]
  return f'{model} ({", ".join(extensions) or "no AVX2"}), {os.cpu_count()} cores'


def median_seconds(fn, repeats, synchronize=lambda: None):
  """Median wall time of fn() after one warm-up call; `synchronize` waits for queued GPU work."""
  fn()
  synchronize()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    synchronize()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def timm_throughput(name, res, batch, infer_batch, repeats, dtype='float32'):
  """timm's train step and forward pass, on the GPU where torch sees one."""
  import timm
  import torch
  torch.set_num_threads(os.cpu_count())
  cuda = torch.cuda.is_available()
  device = 'cuda' if cuda else 'cpu'
  synchronize = torch.cuda.synchronize if cuda else lambda: None
  autocast = lambda: torch.autocast(device, torch.bfloat16, enabled=dtype == 'bfloat16')
  model = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=1000,
                            img_size=res).to(device)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
  images = torch.rand(batch, 3, res, res, device=device) * 2 - 1
  labels = torch.randint(0, 1000, (batch,), device=device)

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    with autocast():
      loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()

  model.train()
  train_seconds = median_seconds(train_step, repeats, synchronize)
  peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
  model.eval()
  infer_images = torch.rand(infer_batch, 3, res, res, device=device) * 2 - 1
  with torch.inference_mode(), autocast():
    infer_seconds = median_seconds(lambda: model(infer_images), repeats, synchronize)
  if cuda:  # Leave the GPU's memory to vit_jax's process.
    model = optimizer = images = infer_images = None
    torch.cuda.empty_cache()
  return {'train_img_s': batch / train_seconds, 'infer_img_s': infer_batch / infer_seconds,
          'peak_device_memory_mb': peak_mb,
          'device': torch.cuda.get_device_name() if cuda else 'cpu',
          'version': f'timm {timm.__version__}, torch {torch.__version__}'}


def ours(name, res, batch, infer_batch, repeats, dtype='float32', attention='einsum',
         cpu_tuning=True):
  """benchmarks/throughput.py in its own process, with or without vit_jax.cpu_tuning's two
  settings (VIT_JAX_CPU_TUNING=0)."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'throughput.py')
  env = dict(os.environ, VIT_JAX_CPU_TUNING='1' if cpu_tuning else '0')
  run = subprocess.run([sys.executable, script, '--model', name, '--res', str(res), '--batch',
                        str(batch), '--infer_batch', str(infer_batch), '--repeats',
                        str(repeats), '--dtype', dtype, '--attention', attention, '--json'],
                       capture_output=True, text=True, check=True, env=env)
  return json.loads(run.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', nargs='+', default=['ViT-Ti_16', 'ViT-S_16'])
  parser.add_argument('--res', type=int, default=224)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--infer_batch', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=10)
  # This process never imports JAX (see above), hence the choices written out here.
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--attention', nargs='+', default=['einsum'],
                      choices=('einsum', 'dot_product'))
  args = parser.parse_args()

  rows = []
  for name in args.models:
    theirs = timm_throughput(name, args.res, args.batch, args.infer_batch, args.repeats,
                             args.dtype)
    for attention in args.attention:
      label = name + (f' {attention}' if len(args.attention) > 1 else '')
      measure = lambda tuned: ours(name, args.res, args.batch, args.infer_batch, args.repeats,
                                   args.dtype, attention, tuned)
      rows.append((label, measure(True), theirs))
      if rows[-1][1]['device'].startswith('cpu'):  # cpu_tuning's settings apply to CPUs only.
        rows.append((label + ' untuned', measure(False), theirs))

  first_ours, first_theirs = rows[0][1], rows[0][2]
  on_cpu = first_ours['device'].startswith('cpu')
  print('\n' + (cpu_description() if on_cpu else
                f'{first_ours["device"]} (JAX); timm on {first_theirs["device"]}'))
  print(f'{args.res}px, {args.dtype}, train batch {args.batch}, inference batch '
        f'{args.infer_batch}; {first_theirs["version"]}')
  if on_cpu:
    print('untuned: without vit_jax.cpu_tuning (VIT_JAX_CPU_TUNING=0: JAX\'s default dot '
          'library, 4 KiB pages)')
  width = max(19, *(len(row[0]) for row in rows))
  print(f'{"model":<{width}} {"train img/s":>12} {"timm":>8} {"ratio":>6} {"MFU":>5}   '
        f'{"infer img/s":>11} {"timm":>8} {"ratio":>6} {"MFU":>5}' +
        ('' if on_cpu else f'   {"GiB":>6} {"timm":>6}'))  # Train step's peak device memory.
  for name, ours_, theirs in rows:
    line = (f'{name:<{width}} {ours_["train_img_s"]:>12.1f} {theirs["train_img_s"]:>8.1f} '
            f'{ours_["train_img_s"] / theirs["train_img_s"]:>6.2f} {ours_["train_mfu"]:>5.0%}   '
            f'{ours_["infer_img_s"]:>11.1f} {theirs["infer_img_s"]:>8.1f} '
            f'{ours_["infer_img_s"] / theirs["infer_img_s"]:>6.2f} {ours_["infer_mfu"]:>5.0%}')
    if not on_cpu:
      gib = lambda mb: f'{mb / 1024:>6.1f}' if mb else f'{"?":>6}'
      line += f'   {gib(ours_["peak_device_memory_mb"])} {gib(theirs["peak_device_memory_mb"])}'
    print(line)


if __name__ == '__main__':
  main()
