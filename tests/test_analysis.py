"""The analysis values on constructed cases, the figures, predict and inference_time CLIs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from helpers import run_main, tiny_config
from vit_jax import analysis, checkpoint, fewshot, input_pipeline, models, predict, train
from vit_jax.models_vit import VisionTransformer


def test_rollout_of_identity_attention_is_identity():
  weights = [jnp.broadcast_to(jnp.eye(5), (2, 3, 5, 5)) for _ in range(4)]
  np.testing.assert_allclose(analysis.attention_rollout(weights), np.broadcast_to(np.eye(5),
                                                                                  (2, 5, 5)))


def test_rollout_of_uniform_attention():
  # One layer attending uniformly: half identity (residual) + half uniform.
  weights = [jnp.full((1, 2, 4, 4), 0.25)]
  expected = 0.5 * np.eye(4) + 0.5 * np.full((4, 4), 0.25)
  np.testing.assert_allclose(analysis.attention_rollout(weights)[0], expected, rtol=1e-6)
  maps = analysis.rollout_maps(analysis.attention_rollout(weights), (1, 3), has_class_token=True)
  np.testing.assert_allclose(maps, [[[1.0, 1.0, 1.0]]])


def test_mean_attention_distance_of_known_patterns():
  grid, patch = (2, 2), (16, 16)
  tokens = 1 + 4
  to_self = np.eye(tokens)[None, None]
  uniform = np.full((1, 1, tokens, tokens), 1 / tokens)
  distance = analysis.mean_attention_distance([to_self, uniform], grid, patch)
  assert distance.shape == (2, 1)
  assert distance[0, 0] == 0.0
  # Uniform over a 2x2 grid: from any patch, distances 0, 16, 16, 16*sqrt(2), averaged.
  np.testing.assert_allclose(distance[1, 0], (0 + 16 + 16 + 16 * np.sqrt(2)) / 4)


def test_similarity_of_identical_and_opposite_embeddings():
  posemb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
  similarity = analysis.position_embedding_similarity(posemb, (2, 2))
  assert similarity.shape == (2, 2, 2, 2)
  np.testing.assert_allclose(similarity[0, 0], [[1, 1], [0, -1]], atol=1e-12)


def test_filter_components_recover_the_dominant_direction():
  rng = np.random.default_rng(0)
  direction = rng.normal(size=(4, 4, 3))
  kernel = (direction[..., None] * rng.normal(size=32) * 10 +
            rng.normal(scale=0.01, size=(4, 4, 3, 32)))
  first = analysis.embedding_filter_components(kernel, count=3)[0]
  unit = lambda x: (x - x.mean()) / np.linalg.norm(x - x.mean())
  assert abs(np.sum(unit(first) * unit(direction))) > 0.99
  assert first.min() == 0.0 and first.max() == 1.0


def tiny_model_checkpoint(tmp_path, num_classes=10):
  config = models.vit_config('tiny', hidden_size=16, mlp_dim=32, num_heads=2, num_layers=2,
                             patch=4)
  model = VisionTransformer(num_classes=num_classes, **config)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)['params']
  params = jax.tree.map(lambda p: p + 0.05, params)
  path = str(tmp_path / 'model.npz')
  checkpoint.save(params, path)
  return path, model, params, config


def test_official_imagenet21k_files_are_read_as_sigmoid_models(tmp_path):
  for num_classes, multi_label in [(21_843, True), (1000, False)]:
    path, *_ = tiny_model_checkpoint(tmp_path, num_classes=num_classes)
    assert checkpoint.load_model(path).multi_label == multi_label


def test_infer_model_config_from_a_checkpoint(tmp_path):
  path, _, _, config = tiny_model_checkpoint(tmp_path)
  inferred, num_classes, image_size = checkpoint.infer_model_config(checkpoint.load(path))
  assert (num_classes, image_size) == (10, (16, 16))
  for key in ('hidden_size', 'classifier', 'representation_size'):
    assert inferred[key] == config[key]
  assert inferred.transformer.to_dict() == config.transformer.to_dict()


def test_analysis_cli_writes_the_four_figures(tmp_path):
  path, *_ = tiny_model_checkpoint(tmp_path)
  result = run_main(module='vit_jax.analysis', *(f'--checkpoint={path}', '--dataset=digits',
                           '--num_images=4', f'--outdir={tmp_path / "figures"}'))
  assert result.returncode == 0, result.stderr[-2000:]
  names = sorted(os.listdir(tmp_path / 'figures'))
  assert names == ['.vit_jax-outputs.json',  # What it wrote there: a re-run may replace them.
                   'attention_distance.png', 'attention_rollout.png', 'embedding_filters.png',
                   'position_embedding_similarity.png']
  for name in names[1:]:
    with Image.open(tmp_path / 'figures' / name) as image:
      assert min(image.size) > 100


@pytest.mark.parametrize('multi_label', [False, True], ids=['softmax', 'sigmoid'])
def test_predict_prints_top5_and_names_bad_files(tmp_path, multi_label):
  path, model, params, config = tiny_model_checkpoint(tmp_path)
  if multi_label:  # A self-describing export of a sigmoid model: one probability per class.
    checkpoint.save(params, path, model_config=config, image_size=(16, 16), multi_label=True)
  pixels = np.random.default_rng(0).integers(0, 255, (30, 50, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(tmp_path / 'good.jpg')
  (tmp_path / 'bad.png').write_bytes(b'not an image')
  result = run_main(module='vit_jax.predict', *(f'--checkpoint={path}', '--dataset=digits',
                           str(tmp_path / 'good.jpg'), str(tmp_path / 'bad.png')))
  assert result.returncode != 0
  assert f'{tmp_path / "bad.png"}: not a readable' in result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == str(tmp_path / 'good.jpg') and len(lines) == 6
  # The same probabilities as the model on the eval-preprocessed image.
  from vit_jax import predict
  image = predict.load_image(str(tmp_path / 'good.jpg'), (16, 16))
  activation = jax.nn.sigmoid if multi_label else jax.nn.softmax
  probabilities = activation(model.apply({'params': params}, image[None], train=False))[0]
  top = np.argsort(-np.asarray(probabilities))[:5]
  assert [line.split()[-1] for line in lines[1:]] == [str(i) for i in top]
  assert lines[1].split()[0] == f'{float(probabilities[top[0]]):.2%}'


def test_inference_time_measures_and_writes(tmp_path):
  from helpers import tiny_config
  from vit_jax import inference_time
  results = inference_time.inference_time(
      tiny_config('--config.trainer=inference_time', '--config.batch_eval=16'), str(tmp_path))
  assert results['inference_img_sec_core'] > 0
  written = json.loads((tmp_path / 'inference_time.json').read_text())
  assert len(written) == 1 and written[0]['batch'] == 16 and written[0]['image_size'] == [8, 8]
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(tmp_path))


def accuracy(classify, config) -> float:
  """Top-1 accuracy of `classify` over config's test split, as predict would classify it."""
  source = input_pipeline.get_source(config, config.test_split)
  steps = input_pipeline.eval_steps(source, batch_size=config.batch_eval, process_count=1)
  correct = 0
  for batch in input_pipeline.eval_batches(config, source, batch_size=config.batch_eval,
                                           num_steps=steps):
    hits = np.argmax(np.asarray(classify(batch['image'])), -1) == np.argmax(batch['labels'], -1)
    correct += np.sum(hits * batch['mask'])
  return float(correct / source.num_examples)


VARIANTS = [(posemb, classifier) for classifier in ('token', 'gap')
            for posemb in ('learn', 'learn_2d', 'sincos2d', 'relative', 'none')] + [('learn', 'map')]


def export_variant(tmp_path, posemb, classifier):
  """A tiny model of the variant, exported with its description; (model, params, config,
  images, path) with images of a 2x3 grid."""
  config = models.vit_config('tiny', hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1,
                             patch=4, classifier=classifier)
  config.transformer.update(posemb=posemb, gelu_approximate=False)
  model = VisionTransformer(num_classes=10, **config)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 12, 3))  # A 2x3 grid.
  params = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(images)['params']
  params = jax.tree.map(lambda p: p + 0.05, params)
  path = str(tmp_path / 'model.npz')
  checkpoint.save(params, path, model_config=config, image_size=(8, 12))
  return model, params, config, images, path


@pytest.mark.slow  # Seconds each, many of them: the full tier.
@pytest.mark.parametrize('posemb, classifier', VARIANTS)
def test_exports_of_every_variant_describe_themselves(tmp_path, posemb, classifier):
  model, params, config, images, path = export_variant(tmp_path, posemb, classifier)
  apply = lambda model, p: jax.jit(lambda p: model.apply({'params': p}, images, train=False))(p)
  logits = apply(model, params)
  loaded, loaded_config, num_classes, image_size = checkpoint.load_model(path)[:4]
  assert (loaded_config.to_dict(), num_classes, image_size) == (config.to_dict(), 10, (8, 12))
  np.testing.assert_array_equal(apply(VisionTransformer(num_classes=10, **loaded_config), loaded),
                                logits)
  assert checkpoint.load(path).keys() == params.keys()  # The description is no parameter.

  # The in-process tools, each on the export alone.
  figures = analysis.analyse(loaded, model, loaded_config, images, str(tmp_path / 'figures'))
  assert len(figures) == (4 if posemb in ('learn', 'learn_2d', 'sincos2d') else 3)
  assert sorted(n for n in os.listdir(tmp_path / 'figures') if not n.startswith('.')) == sorted(
      os.path.basename(f) for f in figures)
  classify, size, classes = predict.load_classifier(path)[:3]
  assert (size, classes) == ((8, 12), 10)
  np.testing.assert_allclose(classify(images), jax.nn.softmax(logits), atol=1e-6)

  # Without the description, what the shapes say (and a named error where they cannot).
  if posemb in ('sincos2d', 'none'):
    with pytest.raises(ValueError, match='cannot tell apart'):
      checkpoint.infer_model_config(loaded)
  elif posemb != 'learn':  # The 1D table is taken as square.
    inferred, _, inferred_size = checkpoint.infer_model_config(loaded)
    assert (inferred.transformer.posemb, inferred_size) == (posemb, (8, 12))


@pytest.mark.parametrize('posemb, classifier', [('learn_2d', 'token'), ('relative', 'gap'),
                                                ('learn', 'map')])  # One per pooling.
def test_exports_are_evaluated_as_they_describe_themselves(tmp_path, posemb, classifier):
  _, _, _, _, path = export_variant(tmp_path, posemb, classifier)
  classify = predict.load_classifier(path).classify
  few = fewshot.evaluate_checkpoint(path, dataset='digits', shots=(1, 5), seeds=1)
  assert few.keys() == {1, 5} and 0 <= few[5] <= 1
  # The recipe's config.model is another model (learned 1D posemb, class token): the export's
  # own description decides what is evaluated.
  config = tiny_config('--config.trainer=evaluate', f'--config.pretrained_path={path}',
                       '--config.pp.crop=(8, 12)')
  evaluated = train.evaluate(config, str(tmp_path / 'evaluate'))
  assert evaluated['test']['accuracy_test'] == pytest.approx(accuracy(classify, config), abs=1e-6)


def test_predict_reads_a_model_that_its_parameters_cannot_describe(tmp_path):
  config = models.vit_config('tiny', hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1,
                             patch=4)
  config.transformer.posemb = 'sincos2d'
  model = VisionTransformer(num_classes=10, **config)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)['params']
  path = str(tmp_path / 'model.npz')
  checkpoint.save(jax.tree.map(lambda p: p + 0.05, params), path, model_config=config,
                  image_size=(16, 16))
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'digit.png')
  result = run_main(module='vit_jax.predict', *(f'--checkpoint={path}', '--dataset=digits',
                                                str(tmp_path / 'digit.png')))
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(result.stdout.splitlines()) == 6
