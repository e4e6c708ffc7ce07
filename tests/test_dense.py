"""Segmentation and detection: decoders, losses, metrics against independent computations,
data that moves with its image, and tiny models that learn the embedded shapes."""

import itertools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from helpers import parse_config
from vit_jax import (config_lib, decoders, dense_pipeline, detection, models, predict,
                     segmentation, shapes, train)
from vit_jax.evaluators import coco_records


def tiny_model(decoder, posemb='learn', classifier='token', scan=False):
  c = models.vit_config('tiny', hidden_size=16, mlp_dim=32, num_heads=2, num_layers=2, patch=8,
                        classifier=classifier)
  c.transformer.posemb, c.transformer.scan = posemb, scan
  c.decoder = ml_collections.ConfigDict(decoder)
  return c


DECODERS = [dict(type='linear'), dict(type='mask_transformer', num_layers=1),
            dict(type='detection', strides=(4, 8, 16), width=16, tower_depth=1,
                 instance_masks=True)]


@pytest.mark.parametrize('posemb, classifier, scan', list(itertools.product(
    ['learn', 'learn_2d', 'sincos2d', 'relative', 'none'], ['token', 'gap'], [False, True])))
def test_decoder_outputs_have_their_shapes_for_every_backbone_variant(posemb, classifier, scan):
  images = jnp.zeros((2, 32, 48, 3))
  for decoder in DECODERS:
    model = models.build(tiny_model(decoder, posemb, classifier, scan), 5)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
    outputs = jax.eval_shape(lambda v: model.apply(v, images, train=False), variables)
    assert 'head' not in variables['params'] and 'decoder' in variables['params']
    if decoder['type'] != 'detection':
      assert outputs.shape == (2, 4, 6, 5), decoder
      continue
    locations = 8 * 12 + 4 * 6 + 2 * 3  # Strides 4, 8, 16 of a 32 x 48 image.
    assert {k: v.shape for k, v in outputs.items()} == {
        'heatmap': (2, locations, 5), 'box': (2, locations, 4),
        'controller': (2, locations, decoders.dynamic_mask_head_size()),
        'mask_features': (2, 8, 12, decoders.MASK_CHANNELS)}


def test_a_classification_checkpoint_is_the_backbone_of_a_dense_model(tmp_path):
  from vit_jax import checkpoint, test_utils
  config = tiny_model(DECODERS[1])
  backbone = {k: v for k, v in config.items() if k != 'decoder'}
  path = str(tmp_path / 'classifier.npz')
  test_utils.create_checkpoint(ml_collections.ConfigDict(backbone), path, num_classes=7,
                               image_size=16)
  model = models.build(config, 3)
  init = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)), train=False)['params']
  loaded = checkpoint.load_pretrained(pretrained_path=path, init_params=init,
                                      model_config=config, image_size=(32, 32))
  saved = checkpoint.load(path)
  np.testing.assert_array_equal(loaded['embedding']['kernel'], saved['embedding']['kernel'])
  assert loaded['Transformer']['posembed_input']['pos_embedding'].shape == (1, 17, 16)
  assert jax.tree.all(jax.tree.map(np.array_equal, loaded['decoder'], init['decoder']))


# ------------------------------------------------------------------------------- segmentation

def test_pixel_loss_equals_numpy_cross_entropy_over_labelled_pixels():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (2, 3, 4))
  labels[0, 0, :2] = segmentation.IGNORE
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  keep = labels != segmentation.IGNORE
  expected = -np.mean([log_p[b, i, j, labels[b, i, j]] for b, i, j in zip(*np.nonzero(keep))])
  # Logits at the labels' resolution: the upsampling is the identity.
  np.testing.assert_allclose(segmentation.mean_loss(logits, labels), expected, rtol=1e-5)


def test_miou_equals_an_independent_confusion_matrix_computation():
  from sklearn.metrics import confusion_matrix
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, 500)
  labels[:50] = segmentation.IGNORE
  predicted = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 4, 500)) % 4
  keep = labels != segmentation.IGNORE
  reference = confusion_matrix(labels[keep], predicted[keep], labels=range(4))
  confusion = segmentation.confusion_matrix(predicted, labels, 4)
  np.testing.assert_array_equal(confusion, reference)
  iou = [reference[k, k] / (reference[k].sum() + reference[:, k].sum() - reference[k, k])
         for k in range(4)]
  metrics = segmentation.metrics(confusion)
  np.testing.assert_allclose(metrics['miou_test'], np.mean(iou))
  np.testing.assert_allclose(metrics['pixel_accuracy_test'],
                             np.mean(labels[keep] == predicted[keep]))
  with pytest.raises(ValueError, match='class 7, but the model has 4 classes'):
    segmentation.confusion_matrix(np.zeros(2, int), np.array([7, 0]), 4)


# ---------------------------------------------------------------------------------- detection

GEOMETRY = detection.geometry((32, 32), (4, 8))


def test_heatmap_targets_and_focal_loss_equal_numpy():
  boxes = jnp.array([[[4., 4., 12., 10.], [0., 0., 0., 0.]]])  # One object, one empty slot.
  classes = jnp.array([[1, -1]])
  targets = np.asarray(detection.heatmap_targets(boxes, classes, GEOMETRY, 2))
  # Size sqrt(8 * 6) ~ 6.9 px: stride 4 (log2(6.9 / 16) is nearer 4 than 8). Centre (8, 7):
  # cell (2, 1) of the 8 x 8 level. Sigma: (8 / 4 / 6, 6 / 4 / 6) cells, at least 0.5.
  centres = GEOMETRY['centre'][:64]
  cell = np.array([2, 1]) * 4 + 2.0
  sigma = np.maximum(np.array([8, 6]) / 4 / 6, 0.5)
  d = (centres - cell) / 4
  bump = np.exp(-(d[:, 0] ** 2 / (2 * sigma[0] ** 2) + d[:, 1] ** 2 / (2 * sigma[1] ** 2)))
  np.testing.assert_allclose(targets[0, :64, 1], bump, rtol=1e-5, atol=1e-7)
  assert targets[0, 2 * 8 + 1, 1] == 1 and (targets[0, 64:] == 0).all()
  assert (targets[0, :, 0] == 0).all()

  logits = np.random.default_rng(2).normal(size=targets.shape).astype(np.float32)
  p = 1 / (1 + np.exp(-logits))
  positive = targets == 1
  expected = (np.sum(-(1 - p[positive]) ** 2 * np.log(p[positive])) +
              np.sum(-(1 - targets[~positive]) ** 4 * p[~positive] ** 2 *
                     np.log(1 - p[~positive])))
  np.testing.assert_allclose(detection.heatmap_loss(logits, targets, 1), expected, rtol=1e-5)


def test_box_and_dice_losses_equal_numpy():
  boxes = jnp.array([[[4., 4., 12., 10.]]])
  centre, stride = jnp.array([[[10., 6.]]]), jnp.array([[4.]])
  np.testing.assert_allclose(detection.box_targets(boxes, centre, stride)[0, 0],
                             np.log(np.array([6., 2., 2., 4.]) / 4), rtol=1e-6)
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(1, 2, 5, 5)).astype(np.float32)
  masks = rng.integers(0, 2, (1, 2, 5, 5))
  valid = jnp.array([[1.0, 0.0]])
  p = 1 / (1 + np.exp(-logits[0, 0]))
  expected = 1 - 2 * (p * masks[0, 0]).sum() / ((p ** 2).sum() + (masks[0, 0] ** 2).sum())
  np.testing.assert_allclose(detection.dice_loss(logits, masks, valid), expected, rtol=1e-5)


def test_dynamic_mask_head_equals_a_per_instance_numpy_computation():
  rng = np.random.default_rng(4)
  controller = rng.normal(size=(2, 3, decoders.dynamic_mask_head_size())).astype(np.float32)
  features = rng.normal(size=(2, 4, 5, decoders.MASK_CHANNELS)).astype(np.float32)
  centres = rng.uniform(0, 20, size=(2, 3, 2)).astype(np.float32)
  got = decoders.dynamic_mask_logits(controller, features, centres)
  yy, xx = np.meshgrid(np.arange(4), np.arange(5), indexing='ij')
  pixels = np.stack([yy, xx], -1) * 4 + 2.0  # Stride-4 pixel centres.
  c = decoders.MASK_CHANNELS
  for b, n in itertools.product(range(2), range(3)):
    x = np.concatenate([features[b], (pixels - centres[b, n]) / 64], -1)
    p, offset = controller[b, n], 0
    for i, (fan_in, fan_out) in enumerate([(c + 2, c), (c, c), (c, 1)]):
      kernel = p[offset:offset + fan_in * fan_out].reshape(fan_in, fan_out)
      offset += fan_in * fan_out
      x = x @ kernel + p[offset:offset + fan_out]
      offset += fan_out
      x = np.maximum(x, 0) if i < 2 else x
    np.testing.assert_allclose(got[b, n], x[..., 0], rtol=1e-4, atol=1e-5)


def test_decoding_finds_the_peak_and_its_box():
  num_locations = GEOMETRY['centre'].shape[0]
  heatmap = np.full((1, num_locations, 2), -10.0, np.float32)
  heatmap[0, 3 * 8 + 5, 1] = 3.0  # Cell (3, 5) of stride 4: centre (14, 22).
  box = np.zeros((1, num_locations, 4), np.float32)
  box[0, 3 * 8 + 5] = np.log(np.array([2., 1., 1., 3.]))  # x stride 4 pixels.
  found = detection.decode({'heatmap': jnp.asarray(heatmap), 'box': jnp.asarray(box)},
                           GEOMETRY, max_detections=3)
  np.testing.assert_allclose(found['boxes'][0, 0], [14 - 8, 22 - 4, 14 + 4, 22 + 12])
  assert int(found['classes'][0, 0]) == 1
  np.testing.assert_allclose(found['scores'][0, 0], 1 / (1 + np.exp(-3.0)), rtol=1e-6)


def test_coco_map_of_a_hand_made_case_is_its_known_answer():
  """Two objects of a class; a perfect detection (score 0.9), a false one (0.8), the second
  object missed: precision 1 up to recall 0.5 and none after, so COCO's 101-point AP is 51/101
  at every IoU (the other class, without objects, does not count)."""
  h = w = 40
  masks = np.zeros((2, h, w), np.uint8)
  masks[0, 4:16, 4:20] = 1
  masks[1, 24:36, 20:32] = 1
  batch = {'original_size': np.array([[h, w]]), 'scale': np.array([1.0]),
           'boxes': np.array([[[4, 4, 16, 20], [24, 20, 36, 32]]]) / 40.0,
           'classes': np.array([[0, 0]]), 'is_crowd': np.array([[0, 0]]),
           'masks': masks[None]}
  predicted_masks = np.zeros((1, 2, h // 4, w // 4), np.float32)
  predicted_masks[0, 0, 1:4, 1:5] = 1  # At stride 4, as the model's.
  predicted = {'boxes': np.array([[[4, 4, 16, 20], [0, 0, 10, 10]]], np.float32),
               'scores': np.array([[0.9, 0.8]]), 'classes': np.array([[0, 0]]),
               'masks': predicted_masks}
  found, truth = coco_records(batch, predicted, 0, image_id=7)
  assert [t['bbox'] for t in truth] == [[4, 4, 16, 12], [20, 24, 12, 12]]
  metrics = detection.coco_metrics([{'id': 7, 'height': h, 'width': w}], truth, found,
                                   num_classes=2, with_masks=True)
  np.testing.assert_allclose(metrics['box_map_test'], 51 / 101, rtol=1e-6)
  np.testing.assert_allclose(metrics['box_ap50_test'], 51 / 101, rtol=1e-6)
  np.testing.assert_allclose(metrics['mask_map_test'], 51 / 101, rtol=1e-6)


# ----------------------------------------------------------------------------------- the data

def test_masks_and_boxes_move_with_their_image():
  """A white rectangle on black, its box and mask: after scale jitter, crop and flip, the box
  still frames the white pixels and the mask (at stride 4) covers them."""
  image = np.zeros((48, 64, 3), np.uint8)
  image[10:30, 20:44] = 255
  mask = (image[..., 0] > 0).astype(np.uint8)
  example = {'image': tf.constant(image), 'segmentation': tf.constant(mask),
             'boxes': tf.constant([[10 / 48, 20 / 64, 30 / 48, 44 / 64]], tf.float32),
             'classes': tf.constant([0]), 'is_crowd': tf.constant([0]),
             'masks': tf.constant(mask[None])}
  for scale, offset, flip in [(1.0, (0, 0), False), (1.5, (8, 12), True), (0.6, (0, 0), True),
                              (2.0, (20, 40), False)]:
    placed = dense_pipeline.place(example, (32, 32), scale=scale, offset=tf.constant(offset),
                                  flip=flip, max_objects=2)
    white = placed['image'].numpy()[..., 0] > 0.5
    assert white.any()
    ymin, xmin, ymax, xmax = placed['boxes'].numpy()[0]
    rows, columns = np.flatnonzero(white.any(1)), np.flatnonzero(white.any(0))
    np.testing.assert_allclose([ymin, xmin, ymax, xmax],
                               [rows[0], columns[0], rows[-1] + 1, columns[-1] + 1], atol=1.0)
    assert placed['classes'].numpy().tolist() == [0, -1]
    # Pixels resized bilinearly, labels by their nearest pixel: they differ only at the edge.
    assert ((placed['segmentation'].numpy() == 1) == white).mean() > 0.97
    coarse = placed['masks'].numpy()[0]
    assert coarse.shape == (8, 8)
    assert (white[1::4, 1::4] == (coarse > 0)).mean() > 0.9, (scale, offset, flip)


def test_training_batches_are_a_function_of_the_step():
  config = parse_config('--config=configs/detection.py:shapes', '--config.pp.crop=32')
  source = dense_pipeline.get_source(config, 'train[:64]')
  first = next(dense_pipeline.train_batches(config, source, batch_size=8, start_step=3))
  again = list(itertools.islice(dense_pipeline.train_batches(config, source, batch_size=8), 4))
  for key in ('boxes', 'classes', 'masks'):
    np.testing.assert_array_equal(first['labels'][key], again[3]['labels'][key])
  np.testing.assert_array_equal(first['image'], again[3]['image'])
  assert first['labels']['masks'].shape == (8, 8, 8, 8)


def write_segmentation_folder(root, count=6, classes=('sky', 'ground')):
  from PIL import Image
  for split in ('train', 'test'):
    (root / 'images' / split).mkdir(parents=True)
    (root / 'masks' / split).mkdir(parents=True)
    for i in range(count):
      mask = np.zeros((20, 30), np.uint8)
      mask[10 + i:] = 1
      mask[0, 0] = segmentation.IGNORE
      Image.fromarray(np.repeat(mask[..., None] * 200, 3, -1)).save(
          root / 'images' / split / f'{i}.jpg')
      Image.fromarray(mask).save(root / 'masks' / split / f'{i}.png')
  (root / 'classes.txt').write_text('\n'.join(classes) + '\n')
  return root


def test_segmentation_folder_is_read_with_its_classes_and_original_sizes(tmp_path):
  root = write_segmentation_folder(tmp_path / 'data')
  config = parse_config('--config=configs/segmentation.py:shapes', f'--config.dataset=seg:{root}',
                        '--config.pp.crop=32')
  source = dense_pipeline.get_source(config, 'test')
  assert source.num_examples == 6 and source.class_names == ('sky', 'ground')
  batch = next(dense_pipeline.eval_batches(config, source, batch_size=4, num_steps=2))
  assert batch['image'].shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(batch['original_size'], [[20, 30]] * 4)
  assert batch['segmentation'][0, 0, 0] == segmentation.IGNORE
  assert batch['segmentation'][2, 12, 5] == 1
  (root / 'masks' / 'test' / '3.png').unlink()
  with pytest.raises(ValueError, match=r"without a mask .* \['3'\]"):
    dense_pipeline.get_source(config, 'test')


def test_a_coco_format_folder_gives_boxes_classes_and_masks(tmp_path):
  """COCO's own layout: annotations/instances_<split>.json, images in <split>/; category ids
  need not be contiguous; polygons and RLEs both give masks."""
  import json
  from PIL import Image
  from pycocotools import mask as mask_utils
  (tmp_path / 'val' ).mkdir()
  (tmp_path / 'annotations').mkdir()
  for name in ('a.jpg', 'b.jpg'):
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / 'val' / name)
  rle = np.zeros((20, 40), np.uint8)
  rle[2:6, 30:38] = 1
  encoded = mask_utils.encode(np.asfortranarray(rle))
  encoded['counts'] = encoded['counts'].decode()
  coco = {'categories': [{'id': 90, 'name': 'toaster'}, {'id': 3, 'name': 'car'}],
          'images': [{'id': 5, 'file_name': 'b.jpg', 'height': 20, 'width': 40},
                     {'id': 1, 'file_name': 'a.jpg', 'height': 20, 'width': 40}],
          'annotations': [
              {'image_id': 1, 'category_id': 90, 'bbox': [10, 4, 20, 8], 'iscrowd': 0,
               'segmentation': [[10, 4, 30, 4, 30, 12, 10, 12]]},
              {'image_id': 1, 'category_id': 3, 'bbox': [30, 2, 8, 4], 'iscrowd': 1,
               'segmentation': encoded}]}
  (tmp_path / 'annotations' / 'instances_val.json').write_text(json.dumps(coco))
  config = parse_config('--config=configs/detection.py:shapes', f'--config.dataset=det:{tmp_path}',
                        '--config.pp.crop=32')
  source = dense_pipeline.get_source(config, 'val')
  assert source.num_examples == 2 and source.class_names == ('car', 'toaster')
  first = source.read(next(iter(source.shard())))  # Image id 1 comes first.
  np.testing.assert_allclose(first['boxes'].numpy(), [[4 / 20, 10 / 40, 12 / 20, 30 / 40],
                                                      [2 / 20, 30 / 40, 6 / 20, 38 / 40]])
  assert first['classes'].numpy().tolist() == [1, 0]
  assert first['is_crowd'].numpy().tolist() == [0, 1]
  masks = first['masks'].numpy()
  assert masks.shape == (2, 20, 40) and masks[0, 5:11, 11:29].all() and masks[0, :3].sum() == 0
  np.testing.assert_array_equal(masks[1], rle)
  batch = next(dense_pipeline.eval_batches(config, source, batch_size=2, num_steps=1))
  assert batch['classes'].tolist() == [[1, 0], [-1, -1]]  # b.jpg has no objects.
  with pytest.raises(ValueError, match='has no annotations/train.json'):
    dense_pipeline.get_source(config, 'train')


def test_dense_configs_are_checked_before_any_work():
  bad = [(['--config=configs/segmentation.py:shapes', '--config.dataset=digits'],
          'objective=segmentation needs a dataset with class maps'),
         (['--config=configs/detection.py:shapes', '--config.model.decoder.strides=(4, 12)'],
          'Pyramid stride 12 is not the patch size 8 times a power of two'),
         (['--config=configs/segmentation.py:shapes', '--config.model.decoder.type=detection'],
          "model.decoder.type='detection'; expected one of"),
         (['--config=configs/detection.py:shapes', '--config.dataset=coco/2017'],
          'TFDS coco/2017 has boxes only'),
         (['--config=configs/digits.py:pretrain', '--config.dataset=seg:/data'],
          'holds class maps or boxes: set objective=segmentation or detection')]
  for args, message in bad:
    with pytest.raises(ValueError, match=message):
      config_lib.check(parse_config(*args), device_count=1)


# --------------------------------------------------------------------- learning the shapes

SMALL = ['--config.model.hidden_size=64', '--config.model.transformer.mlp_dim=128',
         '--config.model.transformer.num_layers=2', '--config.compilation_cache_dir=',
         '--config.progress_every=100']


def test_a_tiny_segmenter_learns_the_shapes(tmp_path):
  config = parse_config('--config=configs/segmentation.py:shapes', *SMALL,
                        '--config.total_steps=300', '--config.test_split=test[:100]')
  results = train.train_and_evaluate(config, str(tmp_path))
  # Chance: a constant "background" scores mIoU ~0.22 (its IoU ~0.88, the shapes' 0).
  # Measured at 300 steps: 0.38, the shapes' IoUs 0.33 / 0.19 / 0.04.
  assert results['test']['miou_test'] > 0.3, results
  assert np.mean(results['test']['iou_per_class_test'][1:]) > 0.1, results


def test_a_tiny_detector_learns_the_shapes(tmp_path):
  config = parse_config('--config=configs/detection.py:shapes', *SMALL,
                        '--config.model.decoder.width=32', '--config.model.decoder.tower_depth=1',
                        '--config.total_steps=250', '--config.test_split=test[:100]')
  results = train.train_and_evaluate(config, str(tmp_path))
  # Measured at 250 steps: box mAP 0.077, AP50 0.21; an untrained head scores ~0.001.
  assert results['test']['box_ap50_test'] > 0.1, results['test']
  assert results['test']['box_map_test'] > 0.03, results['test']
  assert results['test']['mask_ap50_test'] > 0.02, results['test']


# --------------------------------------------------------------- reliability, predict, analysis

# A 1-layer detector of width 16 with instance masks at 32 px: seconds to compile and run.
TINY_DETECTION = ['--config=configs/detection.py:shapes', '--config.model.hidden_size=16',
                  '--config.model.transformer.mlp_dim=32', '--config.model.transformer.num_heads=2',
                  '--config.model.transformer.num_layers=1', '--config.model.decoder.width=16',
                  '--config.pp.crop=32', '--config.batch=8', '--config.batch_eval=16',
                  '--config.total_steps=12', '--config.warmup_steps=2',
                  '--config.checkpoint_every=2', '--config.eval_every=12',
                  '--config.progress_every=2', '--config.test_split=test[:20]',
                  '--config.compilation_cache_dir=']


@pytest.fixture(scope='module')
def detection_run(tmp_path_factory):
  from helpers import built_once
  workdir = built_once(tmp_path_factory, 'detection_run', lambda path: train.train_and_evaluate(
      parse_config(*TINY_DETECTION), str(path)))
  return workdir, json.loads((workdir / 'results.json').read_text())


def test_a_killed_dense_run_resumes_to_the_uninterrupted_result(detection_run, tmp_path):
  import subprocess
  import time
  from helpers import assert_same_params, load_npz, main_command, ROOT
  reference, results = detection_run
  assert set(results['test']) >= {'box_map_test', 'mask_map_test'}
  process = subprocess.Popen(main_command(*TINY_DETECTION, f'--workdir={tmp_path}'), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  start = time.time()
  while not (tmp_path / 'checkpoints' / '4').exists():
    assert process.poll() is None and time.time() - start < 300, 'ended before being killed'
    time.sleep(0.05)
  process.kill()
  process.wait()
  assert not (tmp_path / 'model.npz').exists()
  resumed = train.train_and_evaluate(parse_config(*TINY_DETECTION), str(tmp_path))
  assert resumed['segments'][-1]['start_step'] >= 4
  assert_same_params(load_npz(tmp_path / 'model.npz'), load_npz(reference / 'model.npz'))
  assert resumed['test'] == results['test']


def test_evaluating_the_export_gives_the_runs_results(detection_run, tmp_path):
  workdir, results = detection_run
  config = parse_config(*TINY_DETECTION, '--config.trainer=evaluate',
                        f'--config.pretrained_path={workdir / "model.npz"}')
  assert train.evaluate(config, str(tmp_path))['test'] == results['test']


def test_predict_draws_boxes_and_masks_of_a_detection_export(detection_run, tmp_path):
  from PIL import Image
  from helpers import run_main
  workdir, _ = detection_run
  image = shapes.example('test', 0)['image']
  Image.fromarray(np.repeat(np.repeat(image, 2, 0), 3, 1)).save(tmp_path / 'wide.png')
  (tmp_path / 'broken.jpg').write_bytes(b'not an image')
  result = run_main(f'--checkpoint={workdir / "model.npz"}', f'--outdir={tmp_path / "out"}',
                    '--threshold=0', str(tmp_path / 'wide.png'), str(tmp_path / 'broken.jpg'),
                    module='vit_jax.predict')
  assert result.returncode == 1 and 'broken.jpg: not a readable' in result.stderr
  assert '1 of 2 images could not be read' in result.stderr
  drawn = Image.open(tmp_path / 'out' / 'wide.png')
  assert drawn.size == (192, 128)  # The image's own size.
  assert any(name in result.stdout for name in shapes.CLASSES), result.stdout
  drawing = (tmp_path / 'out' / 'wide.png').read_bytes()  # Its own drawing: a re-run redraws it.
  assert predict.predict_dense([str(tmp_path / 'wide.png')], str(workdir / 'model.npz'),
                               str(tmp_path / 'out'), threshold=0.0) == 0
  assert (tmp_path / 'out' / 'wide.png').read_bytes() == drawing
  result = run_main(f'--checkpoint={workdir / "model.npz"}', str(tmp_path / 'wide.png'),
                    module='vit_jax.predict')
  assert result.returncode != 0 and 'name --outdir' in result.stderr


def test_analysis_reads_a_detection_export_and_the_shapes(detection_run, tmp_path):
  from helpers import run_main
  workdir, _ = detection_run
  result = run_main(f'--checkpoint={workdir / "model.npz"}', '--dataset=shapes',
                    f'--outdir={tmp_path}', '--num_images=2', module='vit_jax.analysis')
  assert result.returncode == 0, result.stderr[-2000:]
  assert (tmp_path / 'attention_distance.png').exists()


def test_four_devices_with_fsdp_give_the_same_dense_run(detection_run, tmp_path):
  import json
  import os
  from helpers import load_npz, run_main
  workdir, results = detection_run
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  run = run_main(*TINY_DETECTION, '--config.sharding=fsdp', f'--workdir={tmp_path}', env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'Mesh: 4 devices' in run.stderr
  four = json.loads((tmp_path / 'results.json').read_text())
  assert four['train_loss'] == pytest.approx(results['train_loss'], rel=1e-4)
  four_params, one_params = load_npz(tmp_path / 'model.npz'), load_npz(workdir / 'model.npz')
  assert four_params.keys() == one_params.keys()
  for key in one_params:
    if key.endswith('key/bias'):  # Zero gradient: Adam steps on rounding noise (helpers.py).
      continue
    np.testing.assert_allclose(four_params[key], one_params[key], atol=5e-5, rtol=1e-4,
                               err_msg=key)


# The fault catalogue (test_fault_tolerance.py) for a dense objective.

@pytest.fixture
def detection_copy(detection_run, tmp_path):
  import shutil
  from helpers import snapshot
  workdir = tmp_path / 'run'
  shutil.copytree(detection_run[0], workdir)
  return workdir, snapshot(workdir)


def test_a_damaged_latest_dense_checkpoint_falls_back_to_the_previous_one(detection_run,
                                                                         detection_copy, caplog):
  import glob
  import os
  from helpers import assert_same_params, load_npz
  workdir, _ = detection_copy
  for path in glob.glob(str(workdir / 'checkpoints' / '12' / '**'), recursive=True):
    if os.path.isfile(path) and not path.endswith('files.json'):
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
  os.remove(workdir / 'model.npz')
  train.train_and_evaluate(parse_config(*TINY_DETECTION), str(workdir))
  assert 'The checkpoint of step 12 is damaged' in caplog.text
  assert_same_params(load_npz(workdir / 'model.npz'), load_npz(detection_run[0] / 'model.npz'))


@pytest.mark.parametrize('overrides, message', [
    (['--config.model.decoder.width=32'],
     r'holds checkpoints of a different run \(model.decoder.width: 16 in the checkpoints, 32 now'),
    (['--config.dataset=seg:/nowhere'], 'objective=detection needs a dataset with boxes'),
    (['--config.test_split=validation'], r"Unknown split 'validation' of dataset 'shapes'"),
    (['--config.model.decoder.type=linear'], r"model.decoder.type='linear'; expected one of"),
])
def test_bad_dense_input_is_named_and_leaves_the_workdir_intact(detection_copy, overrides,
                                                               message):
  from helpers import assert_unchanged
  workdir, before = detection_copy
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(parse_config(*TINY_DETECTION, *overrides), str(workdir))
  assert_unchanged(before, workdir)


def test_dense_divergence_stops_naming_the_step_and_saves_nothing_of_it(tmp_path):
  import os
  config = parse_config(*TINY_DETECTION, '--config.base_lr=1e30', '--config.warmup_steps=0',
                        '--config.checkpoint_every=1')
  with pytest.raises(FloatingPointError, match=r'Non-finite training at step 1'):
    train.train_and_evaluate(config, str(tmp_path))
  assert os.listdir(tmp_path / 'checkpoints') == []


def test_a_corrupt_image_in_a_segmentation_folder_is_named(tmp_path):
  root = write_segmentation_folder(tmp_path / 'data')
  (root / 'images' / 'train' / '4.jpg').write_bytes(b'this is no JPEG')
  config = parse_config('--config=configs/segmentation.py:shapes', f'--config.dataset=seg:{root}',
                        '--config.pp.crop=32')
  source = dense_pipeline.get_source(config, 'train')
  with pytest.raises(ValueError, match=r'1 image file\(s\) cannot be decoded.*train/4.jpg'):
    next(dense_pipeline.train_batches(config, source, batch_size=6))


def test_tfds_coco_and_ade20k_are_read_through_stand_ins_with_their_real_features(tmp_path):
  """TFDS coco/2017 and scene_parse150 prepared locally with the real builders' names, versions
  and features (ADE20K's annotation: 3 equal channels, 0 = "other"); each example's image says
  which one it is."""
  import tensorflow_datasets as tfds
  from test_vtab import decode_index, encode_index

  def prepare(name, split, make):
    real = tfds.builder(name)
    examples = [make(i) for i in range(12)]

    class StandIn(tfds.core.GeneratorBasedBuilder, skip_registration=True):
      VERSION = real.version
      BUILDER_CONFIGS = [real.builder_config] if real.builder_config else []

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=real.info.features)

      def _split_generators(self, dl_manager):
        return {split: self._generate_examples()}

      def _generate_examples(self):
        yield from enumerate(examples)

    StandIn.name = real.name
    StandIn(config=real.builder_config and real.builder_config.name,
            data_dir=str(tmp_path)).download_and_prepare()
    return examples

  coco = prepare('coco/2017', 'validation', lambda i: {
      'image': encode_index((40, 48, 3), i), 'image/filename': f'{i}.jpg', 'image/id': i,
      'objects': [{'area': 10, 'bbox': tfds.features.BBox(0.1 * k, 0.2, 0.5, 0.6 + 0.1 * k),
                   'id': k, 'is_crowd': k == 1, 'label': (i + k) % 80} for k in range(i % 3)]})
  config = parse_config('--config=configs/detection.py:shapes', '--config.dataset=coco/2017',
                        f'--config.tfds_data_dir={tmp_path}', '--config.pp.crop=32',
                        '--config.model.decoder.instance_masks=False')
  source = dense_pipeline.get_source(config, 'validation')
  assert source.num_examples == 12 and source.num_classes == len(source.class_names) == 80
  for stored in source.shard().as_numpy_iterator():
    read = {k: np.asarray(v) for k, v in source.read(stored).items()}
    i = decode_index(read['image'], binary=False)
    objects = coco[i]['objects']
    np.testing.assert_allclose(read['boxes'], [[0.1 * k, 0.2, 0.5, 0.6 + 0.1 * k]
                                               for k in range(len(objects))] or np.zeros((0, 4)))
    assert read['classes'].tolist() == [o['label'] for o in objects]
    assert read['is_crowd'].tolist() == [int(o['is_crowd']) for o in objects]

  def ade_example(i):
    annotation = np.zeros((40, 48, 3), np.uint8)
    annotation[:20] = i * 13 % 151  # 0 ("other") for i = 0.
    return {'image': encode_index((40, 48, 3), i), 'annotation': annotation}

  ade = prepare('scene_parse150', 'test', ade_example)
  config = parse_config('--config=configs/segmentation.py:shapes', '--config.dataset=scene_parse150',
                        f'--config.tfds_data_dir={tmp_path}', '--config.pp.crop=32')
  source = dense_pipeline.get_source(config, 'test')
  assert source.num_examples == 12 and source.num_classes == 150
  for stored in source.shard().as_numpy_iterator():
    read = {k: np.asarray(v) for k, v in source.read(stored).items()}
    i = decode_index(read['image'], binary=False)
    top = ade[i]['annotation'][0, 0, 0]
    assert (read['segmentation'][:20] == (segmentation.IGNORE if top == 0 else top - 1)).all()
    assert (read['segmentation'][20:] == segmentation.IGNORE).all()
