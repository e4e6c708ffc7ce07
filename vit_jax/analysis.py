r"""What a ViT learned: the paper's Figures 6 and 7 for any checkpoint.

  attention rollout maps over input images (Fig. 6, App. D.8; Abnar & Zuidema 2020),
  cosine similarity of the position embeddings (Fig. 7 centre),
  mean attention distance per head against depth (Fig. 7 right),
  principal components of the patch-embedding filters (Fig. 7 left).

python -m vit_jax.analysis --checkpoint=runs/demo/finetune/model.npz --dataset=digits \
    --outdir=runs/demo/analysis [IMAGE ...]
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from vit_jax import cpu_tuning, features, files, models

FLAGS = flags.FLAGS

# ------------------------------------------------------------------------------------ values


def attention_weights(model, params, images) -> list:
  """Per layer, the attention probabilities (batch, heads, tokens, tokens)."""
  _, state = model.apply({'params': params}, images, train=False, mutable=['intermediates'])
  blocks = features.block_intermediates(state['intermediates'])
  if not blocks or 'MultiHeadDotProductAttention_1' not in blocks[0]:
    raise ValueError('The model keeps no attention probabilities: build it with '
                     "transformer.attention='einsum'.")
  return [block['MultiHeadDotProductAttention_1']['attention_weights'][0] for block in blocks]


def attention_rollout(weights: list) -> jnp.ndarray:
  """How much each output token draws on each input token, through all layers.

  Each layer's head-averaged attention is mixed half and half with the identity (the residual
  connection), rows renormalised, and the layers multiplied: (batch, tokens, tokens).
  """
  tokens = weights[0].shape[-1]
  rollout = jnp.eye(tokens)
  for layer in weights:
    mixed = 0.5 * layer.mean(axis=1) + 0.5 * jnp.eye(tokens)
    mixed = mixed / mixed.sum(axis=-1, keepdims=True)
    rollout = mixed @ rollout
  return rollout


def rollout_maps(rollout, grid, has_class_token: bool) -> jnp.ndarray:
  """(batch, grid_h, grid_w): what the class token (or, for gap models, the average token)
  attends to among the patches (the last grid_h * grid_w tokens, after any class, distillation
  and register tokens), normalised to a maximum of 1."""
  attention = rollout[:, 0] if has_class_token else rollout.mean(axis=1)
  maps = attention[:, -grid[0] * grid[1]:].reshape((-1,) + tuple(grid))
  return maps / maps.max(axis=(1, 2), keepdims=True)


def position_embedding_similarity(pos_embedding, grid) -> np.ndarray:
  """(grid_h, grid_w, grid_h, grid_w): cosine similarity of each patch's position embedding with
  every other's; `pos_embedding` is (patches, D), without a class-token slot."""
  unit = pos_embedding / np.linalg.norm(pos_embedding, axis=-1, keepdims=True)
  return (unit @ unit.T).reshape(tuple(grid) * 2)


def mean_attention_distance(weights: list, grid, patch_size) -> np.ndarray:
  """(layers, heads): the image-space distance in pixels spanned by attention, averaged over
  query patches and images (the "attention distance" of Fig. 7). Attention to the tokens before
  the patches (class, distillation, register tokens) is left out and the rest renormalised."""
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing='ij')
  centres = np.stack([rows.ravel() * patch_size[0], cols.ravel() * patch_size[1]], axis=-1)
  distance = np.linalg.norm(centres[:, None] - centres[None], axis=-1)  # (patches, patches)
  result = []
  for layer in weights:
    patches = np.asarray(layer)[:, :, -len(distance):, -len(distance):]
    patches = patches / patches.sum(axis=-1, keepdims=True)
    result.append((patches * distance).sum(axis=-1).mean(axis=(0, 2)))
  return np.stack(result)


def embedding_filter_components(kernel, count: int = 28) -> np.ndarray:
  """(count, P, P, C): the leading principal components of the D patch-embedding filters, each
  scaled to [0, 1] for display as an RGB image."""
  patch_h, patch_w, channels, width = kernel.shape
  filters = np.asarray(kernel, np.float64).reshape(-1, width).T  # (D, P*P*C)
  filters = filters - filters.mean(axis=0)
  _, _, components = np.linalg.svd(filters, full_matrices=False)
  components = components[:count].reshape(-1, patch_h, patch_w, channels)
  low = components.min(axis=(1, 2, 3), keepdims=True)
  high = components.max(axis=(1, 2, 3), keepdims=True)
  return (components - low) / np.maximum(high - low, 1e-12)


# ---------------------------------------------------------------------------------- figures


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')  # Files only: no display needed.
  import matplotlib.pyplot as plt
  return plt


def _to_unit_range(images):
  return np.clip((np.asarray(images) + 1) / 2, 0, 1)


def plot_rollout(images, maps, path):
  plt = _pyplot()
  count = len(images)
  figure, axes = plt.subplots(2, count, figsize=(1.6 * count, 3.4), squeeze=False)
  for i in range(count):
    image = _to_unit_range(images[i])
    heat = np.asarray(jax.image.resize(maps[i], image.shape[:2], 'bilinear'))
    axes[0, i].imshow(image)
    axes[1, i].imshow(image * heat[..., None])
    for ax in axes[:, i]:
      ax.axis('off')
  axes[0, 0].set_title('input', fontsize=8, loc='left')
  axes[1, 0].set_title('attention rollout', fontsize=8, loc='left')
  figure.tight_layout()
  figure.savefig(path, dpi=100, format='png')
  plt.close(figure)


def plot_position_similarity(similarity, path):
  plt = _pyplot()
  grid_h, grid_w = similarity.shape[:2]
  figure, axes = plt.subplots(grid_h, grid_w, figsize=(0.6 * grid_w + 1, 0.6 * grid_h),
                              squeeze=False)
  for i in range(grid_h):
    for j in range(grid_w):
      shown = axes[i, j].imshow(similarity[i, j], vmin=-1, vmax=1)
      axes[i, j].axis('off')
  figure.colorbar(shown, ax=axes, shrink=0.8, label='cosine similarity')
  figure.suptitle('Position embedding similarity (row, column of the patch)', fontsize=9)
  figure.savefig(path, dpi=100, format='png')
  plt.close(figure)


def plot_attention_distance(distance, path):
  plt = _pyplot()
  figure, ax = plt.subplots(figsize=(4, 3.2))
  layers, heads = distance.shape
  for head in range(heads):
    ax.scatter(np.arange(layers), distance[:, head], s=10)
  ax.set_xlabel('network depth (layer)')
  ax.set_ylabel('mean attention distance (pixels)')
  figure.tight_layout()
  figure.savefig(path, dpi=100, format='png')
  plt.close(figure)


def plot_filters(components, path):
  plt = _pyplot()
  columns = 7
  rows = -(-len(components) // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(columns, rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for ax, component in zip(axes.ravel(), components):
    ax.imshow(component if component.shape[-1] == 3 else component[..., 0])
  figure.suptitle('Principal components of the patch-embedding filters', fontsize=9)
  figure.savefig(path, dpi=100, format='png')
  plt.close(figure)


# -------------------------------------------------------------------------------------- CLI


FIGURES = ('attention_rollout.png', 'position_embedding_similarity.png',
           'attention_distance.png', 'embedding_filters.png')


def analyse(params, model, config, images, outdir, model_inputs=lambda x: x) -> list:
  """Writes the figures for `params` (all four, or three for models without absolute position
  embeddings); returns their paths. `images` are in [-1, 1]; `model_inputs` normalises them as
  the model takes them (checkpoint.load_model(...).model_inputs). A figure name that a file not
  written there by analysis holds is refused before any work (files.OutputFolder)."""
  from vit_jax import checkpoint, models
  stride = models.token_stride(config)  # Pixels per token (a hybrid's stem included).
  grid = (images.shape[1] // stride[0], images.shape[2] // stride[1])
  posemb = checkpoint.patch_position_embeddings(params, config, grid)
  figures = [name for name in FIGURES
             if posemb is not None or name != 'position_embedding_similarity.png']
  folder = files.OutputFolder(outdir)
  folder.check(figures)
  has_class_token = config.classifier in ('token', 'token_and_gap')
  weights = attention_weights(model, params, model_inputs(images))
  plots = {
      'attention_rollout.png': lambda path: plot_rollout(
          images, rollout_maps(attention_rollout(weights), grid, has_class_token), path),
      'position_embedding_similarity.png': lambda path: plot_position_similarity(
          position_embedding_similarity(posemb, grid), path),
      'attention_distance.png': lambda path: plot_attention_distance(
          mean_attention_distance(weights, grid, stride), path),
      'embedding_filters.png': lambda path: plot_filters(
          embedding_filter_components(checkpoint.patch_embedding_kernel(params)), path)}
  paths = [folder.write(name, plots[name]) for name in figures]
  for name in set(FIGURES) - set(figures):  # An earlier model's figure, if analysis drew it.
    folder.remove(name)
  return paths


def _images(image_paths, image_size, dataset, split, count, resize=None):
  if image_paths:
    from vit_jax import predict
    return np.stack([predict.load_image(p, image_size, resize) for p in image_paths])
  if not dataset:
    raise app.UsageError('Name image files or --dataset.')
  from vit_jax import config_lib, datasets, dense_pipeline, input_pipeline
  config = config_lib.base_config()
  config.dataset = dataset
  config.pp.crop = tuple(image_size)
  pipeline = input_pipeline
  if datasets.has_boxes(dataset) or datasets.has_class_maps(dataset):
    pipeline = dense_pipeline
    config.objective = 'detection' if datasets.has_boxes(dataset) else 'segmentation'
  source = pipeline.get_source(config, split)
  batch = next(pipeline.eval_batches(config, source, batch_size=count, num_steps=1))
  return batch['image'][:int(batch['mask'].sum())]


def main(argv):
  from vit_jax import checkpoint
  if FLAGS.num_images < 1:
    raise app.UsageError(f'--num_images={FLAGS.num_images} must be at least 1.')
  files.OutputFolder(FLAGS.outdir)  # A file, not a folder: refused before the model loads.
  read = checkpoint.load_model(FLAGS.checkpoint)
  model = models.build(read.config, read.num_classes)  # Classifier or dense: the same encoder.
  images = _images(argv[1:], read.image_size, FLAGS.dataset, FLAGS.split, FLAGS.num_images,
                   read.resize)
  for path in analyse(read.params, model, read.config, jnp.asarray(images), FLAGS.outdir,
                      read.model_inputs):
    print(path)


def define_flags():
  """The command line; defined on use, so that importing this module defines no flags."""
  flags.DEFINE_string('checkpoint', None, '.npz checkpoint.', required=True)
  flags.DEFINE_string('outdir', None, 'Where the PNG files go.', required=True)
  flags.DEFINE_string('dataset', None, 'Take images from this dataset\'s test split.')
  flags.DEFINE_string('split', 'test', 'Split of --dataset.')
  flags.DEFINE_integer('num_images', 8, 'Images for the rollout maps.')


if __name__ == '__main__':
  cpu_tuning.tune_command_line()
  define_flags()
  app.run(main)
