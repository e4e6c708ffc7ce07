r"""vit_jax against PyTorch timm, side by side in one run: train-step and inference img/s.

python benchmarks/compare.py [--models ViT-Ti_16 ViT-S_16] [--res 224] [--batch 32]

Each vit_jax measurement is benchmarks/throughput.py in its own process (JAX and PyTorch then
do not share threads); timm runs here: AdamW with weight decay and gradient clipping, softmax
cross-entropy, the same batch sizes (64 for inference), median of the same repetitions.
Needs the `bench` extra (pip install -e '.[bench]').
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


def median_seconds(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def timm_throughput(name, res, batch, infer_batch, repeats):
  import timm
  import torch
  torch.set_num_threads(os.cpu_count())
  model = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=1000, img_size=res)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
  images = torch.rand(batch, 3, res, res) * 2 - 1
  labels = torch.randint(0, 1000, (batch,))

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()

  model.train()
  train_seconds = median_seconds(train_step, repeats)
  model.eval()
  infer_images = torch.rand(infer_batch, 3, res, res) * 2 - 1
  with torch.inference_mode():
    infer_seconds = median_seconds(lambda: model(infer_images), repeats)
  return {'train_img_s': batch / train_seconds, 'infer_img_s': infer_batch / infer_seconds,
          'version': f'timm {timm.__version__}, torch {torch.__version__}'}


def ours(name, res, batch, infer_batch, repeats, cpu_tuning=True):
  """benchmarks/throughput.py in its own process, with or without vit_jax.cpu_tuning's two
  settings (VIT_JAX_CPU_TUNING=0)."""
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'throughput.py')
  env = dict(os.environ, VIT_JAX_CPU_TUNING='1' if cpu_tuning else '0')
  run = subprocess.run([sys.executable, script, '--model', name, '--res', str(res), '--batch',
                        str(batch), '--infer_batch', str(infer_batch), '--repeats',
                        str(repeats), '--json'], capture_output=True, text=True, check=True,
                       env=env)
  return json.loads(run.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', nargs='+', default=['ViT-Ti_16', 'ViT-S_16'])
  parser.add_argument('--res', type=int, default=224)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--infer_batch', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=10)
  args = parser.parse_args()

  rows = []
  for name in args.models:
    torch_numbers = timm_throughput(name, args.res, args.batch, args.infer_batch, args.repeats)
    for tuned in (True, False):
      jax_numbers = ours(name, args.res, args.batch, args.infer_batch, args.repeats, tuned)
      rows.append((name + ('' if tuned else ' untuned'), jax_numbers, torch_numbers))
  print(f'\n{cpu_description()}')
  print(f'{args.res}px, train batch {args.batch}, inference batch {args.infer_batch}; '
        f'{rows[0][2]["version"]}')
  print('untuned: without vit_jax.cpu_tuning (VIT_JAX_CPU_TUNING=0: JAX\'s default dot library, '
        '4 KiB pages)')
  print(f'{"model":<19} {"train img/s":>12} {"timm":>8} {"ratio":>6} {"MFU":>5}   '
        f'{"infer img/s":>11} {"timm":>8} {"ratio":>6} {"MFU":>5}')
  for name, ours_, theirs in rows:
    print(f'{name:<19} {ours_["train_img_s"]:>12.1f} {theirs["train_img_s"]:>8.1f} '
          f'{ours_["train_img_s"] / theirs["train_img_s"]:>6.2f} {ours_["train_mfu"]:>5.0%}   '
          f'{ours_["infer_img_s"]:>11.1f} {theirs["infer_img_s"]:>8.1f} '
          f'{ours_["infer_img_s"] / theirs["infer_img_s"]:>6.2f} {ours_["infer_mfu"]:>5.0%}')


if __name__ == '__main__':
  main()
