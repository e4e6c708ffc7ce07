r"""Interoperability check: an .npz written by vit_jax is read by PyTorch timm (which reads the
official checkpoints), and both give the same logits.

Needs timm and torch next to vit_jax (pip install -e '.[bench]'):

  python benchmarks/timm_interop.py [--model ViT-Ti_16] [--res 224]

Prints the largest absolute logit difference; exits non-zero above --tolerance.
"""

import argparse
import functools
import os
import sys
import tempfile

import jax
import numpy as np

from vit_jax import checkpoint, models
from vit_jax.models_vit import VisionTransformer

TIMM_NAMES = {'ViT-Ti_16': 'vit_tiny_patch16', 'ViT-S_16': 'vit_small_patch16',
              'ViT-S_32': 'vit_small_patch32', 'ViT-B_16': 'vit_base_patch16',
              'ViT-B_32': 'vit_base_patch32', 'ViT-B_8': 'vit_base_patch8',
              'ViT-L_16': 'vit_large_patch16', 'ViT-L_32': 'vit_large_patch32'}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='ViT-Ti_16', choices=sorted(TIMM_NAMES))
  parser.add_argument('--res', type=int, default=224)
  parser.add_argument('--classes', type=int, default=10)
  parser.add_argument('--tolerance', type=float, default=1e-4)
  args = parser.parse_args()

  import timm
  import torch

  # Random parameters with a non-zero head, so that every parameter shapes the logits.
  config = models.get_config(args.model)
  model = VisionTransformer(num_classes=args.classes, **config)
  images = jax.random.uniform(jax.random.PRNGKey(1), (4, args.res, args.res, 3), minval=-1)
  params = model.init(jax.random.PRNGKey(0), images[:1], train=False)['params']
  params = jax.tree.map(lambda p, k: p + 0.02 * jax.random.normal(k, p.shape),
                        params, _keys_like(params))
  ours = np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(params, images))

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'model.npz')
    # Self-describing, as every export of a run: timm must not mind the description.
    checkpoint.save(params, path, model_config=config, image_size=(args.res, args.res))
    # The official weights use GELU's tanh approximation; timm defaults to the exact form.
    theirs_model = timm.create_model(
        f'{TIMM_NAMES[args.model]}_{args.res}', pretrained=False, num_classes=args.classes,
        img_size=args.res, act_layer=functools.partial(torch.nn.GELU, approximate='tanh'))
    theirs_model.load_pretrained(path)
  theirs_model.eval()
  with torch.no_grad():
    theirs = theirs_model(torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2))).numpy()

  difference = float(np.abs(ours - theirs).max())
  print(f'{args.model} @{args.res}: max |logit difference| vit_jax vs timm {timm.__version__} '
        f'= {difference:.2e} (logits up to {np.abs(ours).max():.2f})')
  sys.exit(0 if difference <= args.tolerance else 1)


def _keys_like(tree):
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, list(jax.random.split(jax.random.PRNGKey(2), len(leaves))))


if __name__ == '__main__':
  main()
