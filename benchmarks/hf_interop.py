r"""vit_jax against the real transformers and timm (the `bench` extra: torch, timm, transformers).

For each family: a randomly initialised model built by the library itself, saved with its own
save function, loaded here and run on the same images; then converted back with vit_jax.convert
and loaded by the library again. Prints the max relative difference (max |a - b| / max |b|) per
family and direction, at the file's resolution and at a second one (position tables resampled
by each side its own way).

python benchmarks/hf_interop.py [--second_resolution=160]
"""

import argparse
import os
import tempfile

import numpy as np
import torch

from vit_jax import checkpoint, convert
from vit_jax.models_vit import VisionTransformer

SMALL = dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768,
             image_size=224, patch_size=16)


def relative(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def ours(path, images_nchw, size=None, features=False):
  """Outputs of the checkpoint at `path` run here (at `size`: resampled with load_pretrained)."""
  exported = checkpoint.load_model(path)
  config, params = exported.config, exported.params
  num_classes = None if features else exported.num_classes
  model = VisionTransformer(num_classes=num_classes, **config)
  images = np.asarray(images_nchw.permute(0, 2, 3, 1))
  if size and tuple(size) != tuple(exported.image_size):
    import jax
    init = model.init(jax.random.PRNGKey(0), images[:1], train=False)['params']
    params = checkpoint.load_pretrained(pretrained_path=path, init_params=init,
                                        model_config=config, image_size=size, reinit_head=False)
  return np.asarray(model.apply({'params': params}, images, train=False))


def hf_families():
  import transformers as t
  return {
      'ViTForImageClassification': (t.ViTForImageClassification, t.ViTConfig(
          **SMALL, num_labels=10, hidden_act='gelu'), lambda out: out.logits),
      'ViTModel (pooler)': (t.ViTModel, t.ViTConfig(**SMALL), lambda out: out.pooler_output),
      'DeiTForImageClassificationWithTeacher': (
          t.DeiTForImageClassificationWithTeacher, t.DeiTConfig(**SMALL, num_labels=10),
          lambda out: out.logits),
      'DeiTForImageClassification': (
          t.DeiTForImageClassification, t.DeiTConfig(**SMALL, num_labels=10),
          lambda out: out.logits),
      'Dinov2ForImageClassification (SwiGLU)': (t.Dinov2ForImageClassification, t.Dinov2Config(
          **{k: v for k, v in SMALL.items() if k != 'intermediate_size'}, mlp_ratio=4,
          use_swiglu_ffn=True, layerscale_value=0.5, num_labels=10), lambda out: out.logits),
      'Dinov2WithRegistersForImageClassification': (
          t.Dinov2WithRegistersForImageClassification, t.Dinov2WithRegistersConfig(
              **{k: v for k, v in SMALL.items() if k != 'intermediate_size'}, mlp_ratio=4,
              num_register_tokens=4, layerscale_value=0.5, num_labels=10),
          lambda out: out.logits),
      'Dinov2Model': (t.Dinov2Model, t.Dinov2Config(
          **{k: v for k, v in SMALL.items() if k != 'intermediate_size'}, mlp_ratio=4,
          layerscale_value=0.5), lambda out: out.pooler_output),
      'Dinov2WithRegistersModel': (t.Dinov2WithRegistersModel, t.Dinov2WithRegistersConfig(
          **{k: v for k, v in SMALL.items() if k != 'intermediate_size'}, mlp_ratio=4,
          num_register_tokens=4, layerscale_value=0.5), lambda out: out.pooler_output),
      'SiglipVisionModel': (t.SiglipVisionModel, t.SiglipVisionConfig(**SMALL),
                            lambda out: out.pooler_output),
      'CLIPVisionModel': (t.CLIPVisionModel, t.CLIPVisionConfig(**SMALL),
                          lambda out: out.pooler_output),
  }


def timm_families():
  return {
      'vit_tiny_patch16_224': dict(depth=2, num_classes=10),
      'deit_tiny_distilled_patch16_224': dict(depth=2, num_classes=10),
      'vit_small_patch14_reg4_dinov2': dict(depth=2, num_classes=0, img_size=224),
      'vit_giant_patch14_dinov2': dict(depth=2, embed_dim=192, num_heads=3, num_classes=0,
                                       img_size=224),  # SwiGLUPacked MLP.
      'vit_medium_patch16_reg4_gap_256': dict(depth=2, num_classes=10, img_size=224),  # fc_norm.
      'vit_base_patch16_siglip_224': dict(depth=2, num_classes=10),
      'vit_base_patch16_clip_quickgelu_224': dict(depth=2, num_classes=10),
  }


def perturbed(model):
  """Random values everywhere (the libraries initialise some tensors to zeros or ones)."""
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
  return model.eval()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--second_resolution', type=int, default=160)
  args = parser.parse_args()
  import timm
  import transformers
  from safetensors.torch import load_file
  torch.manual_seed(0)
  size2 = (args.second_resolution,) * 2
  images = torch.rand(2, 3, 224, 224) * 2 - 1
  images2 = torch.rand(2, 3, *size2) * 2 - 1
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, (cls, config, output) in hf_families().items():
      model = perturbed(cls(config))
      path = os.path.join(tmp, name.split()[0])
      model.save_pretrained(path)
      features = 'Model' in name and 'Classification' not in name and 'Teacher' not in name
      with torch.no_grad():
        theirs = output(model(pixel_values=images)).numpy()
        theirs2 = output(model(pixel_values=images2, interpolate_pos_encoding=True)).numpy()
      rows.append((name, 'transformers -> vit_jax', relative(
          ours(path, images, features=features), theirs),
                   relative(ours(path, images2, size2, features=features), theirs2)))
      back = os.path.join(tmp, name.split()[0] + '_back')
      convert.convert(path, back, 'hf')
      loader = (transformers.AutoModel if features else
                transformers.AutoModelForImageClassification)
      reloaded = loader.from_pretrained(back).eval()
      with torch.no_grad():
        again = output(reloaded(pixel_values=images)).numpy()
      rows.append((name, 'vit_jax -> transformers', relative(again, theirs), None))
    for name, kwargs in timm_families().items():
      model = perturbed(timm.create_model(name, pretrained=False, **kwargs))
      path = os.path.join(tmp, name)  # timm's Hub layout: config.json (architecture) + weights.
      timm.models.save_for_hf(model, path, safe_serialization=True)
      features = not kwargs.get('num_classes')
      patch = model.patch_embed.patch_size[0]
      size2 = ((args.second_resolution // patch) * patch,) * 2
      images2 = torch.rand(2, 3, *size2) * 2 - 1
      with torch.no_grad():
        theirs = model(images).numpy()
        dynamic = perturbed(timm.create_model(name, pretrained=False, dynamic_img_size=True,
                                              **kwargs))
        dynamic.load_state_dict(model.state_dict())
        theirs2 = dynamic(images2).numpy()
      rows.append((name, 'timm -> vit_jax', relative(ours(path, images, features=features),
                                                      theirs),
                   relative(ours(path, images2, size2, features=features), theirs2)))
      back = os.path.join(tmp, name + '_back.safetensors')
      call = convert.convert(path, back, 'timm').splitlines()[0]
      namespace = {'timm': timm, 'torch': torch, 'functools': __import__('functools')}
      exec(call, namespace)  # model = timm.create_model(...): the call convert printed.
      reloaded = namespace['model'].eval()
      reloaded.load_state_dict(load_file(back), strict=True)
      with torch.no_grad():
        again = reloaded(images).numpy()
      rows.append((name, 'vit_jax -> timm', relative(again, theirs), None))
  print(f'torch {torch.__version__}, transformers {transformers.__version__}, timm '
        f'{timm.__version__}; max relative difference at 224 px and at the second resolution '
        f'(~{args.second_resolution} px, a multiple of the patch)')
  for name, direction, first, second in rows:
    print(f'{name:<40} {direction:<26} {first:.2e}  {"" if second is None else f"{second:.2e}"}')


if __name__ == '__main__':
  main()
