"""seg:<dir> and det:<dir> folders that are wrong are refused by name when the Source is built
(before anything compiles), and the ones that are merely unusual are read right (issue 36:
silent nonsense is a bug). Tiny folders, no training: seconds."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from helpers import parse_config
from vit_jax import dense_pipeline, segmentation

IGNORE = segmentation.IGNORE


# ------------------------------------------------------------------------ seg:<dir> folders

def labels_of(i, h=16, w=16):
  labels = np.zeros((h, w), np.uint8)
  labels[8:, :] = 1
  labels[0, i] = IGNORE
  return labels


def seg_folder(root, count=3, classes='sky\nground\n', split='train'):
  """images/<split>/<i>.jpg, masks/<split>/<i>.png (8-bit grey), classes.txt."""
  (root / 'images' / split).mkdir(parents=True)
  (root / 'masks' / split).mkdir(parents=True)
  for i in range(count):
    Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(
        root / 'images' / split / f'{i}.jpg')
    Image.fromarray(labels_of(i)).save(root / 'masks' / split / f'{i}.png')
  (root / 'classes.txt').write_text(classes)
  return root


def seg_config(root, *overrides):
  return parse_config('--config=configs/segmentation.py:shapes', f'--config.dataset=seg:{root}',
                      '--config.pp.crop=16', *overrides)


def read_labels(source, index):
  stored = {k: v[index] for k, v in source.examples.items()}
  return source.read(stored)['segmentation'].numpy()


def first_batch(config, source):
  return next(dense_pipeline.eval_batches(config, source, batch_size=2, num_steps=1))


def test_16_bit_masks_keep_their_values(tmp_path):
  root = seg_folder(tmp_path)
  Image.fromarray(labels_of(1).astype(np.uint16)).save(root / 'masks' / 'train' / '1.png')
  assert Image.open(root / 'masks' / 'train' / '1.png').mode == 'I;16'  # A 16-bit PNG.
  config = seg_config(root)
  source = dense_pipeline.get_source(config, 'train')
  np.testing.assert_array_equal(read_labels(source, 1), labels_of(1))  # Not all zeros.
  labels = labels_of(2).astype(np.uint16)
  labels[3, 4] = 300  # Fits 16 bits, not the 2 classes (nor 8 bits: 300 % 256 = 44).
  Image.fromarray(labels).save(root / 'masks' / 'train' / '2.png')
  source = dense_pipeline.get_source(config, 'train')
  with pytest.raises(ValueError, match=r'masks/train/2.png has label 300 \(row 3, column 4\); '
                                       r'labels must be < num_classes=2 or 255'):
    for _ in dense_pipeline.eval_batches(config, source, batch_size=2, num_steps=2):
      pass


def test_a_palette_mask_s_index_is_the_label(tmp_path):
  """VOC / ADE20K colour PNGs: the palette index is the class, whatever colour it shows."""
  root = seg_folder(tmp_path)
  mask = Image.fromarray(labels_of(0), mode='P')
  palette = [0, 0, 0, 128, 0, 0] + [0] * (3 * 253) + [224, 224, 192]  # VOC's 0, 1 and 255.
  mask.putpalette(palette)
  mask.save(root / 'masks' / 'train' / '0.png')
  assert Image.open(root / 'masks' / 'train' / '0.png').mode == 'P'
  source = dense_pipeline.get_source(seg_config(root), 'train')
  np.testing.assert_array_equal(read_labels(source, 0), labels_of(0))


def test_an_rgb_mask_is_refused_by_name(tmp_path):
  root = seg_folder(tmp_path)
  Image.fromarray(np.repeat(labels_of(1)[..., None], 3, -1)).save(
      root / 'masks' / 'train' / '1.png')
  with pytest.raises(ValueError, match=r'masks/train/1.png is an RGB image; expected a '
                                       r'single-channel label map \(or a palette PNG\)'):
    dense_pipeline.get_source(seg_config(root), 'train')


def test_a_label_above_the_class_count_is_named_with_the_file(tmp_path):
  """Training used to end in "Non-finite training ... Lower base_lr"."""
  root = seg_folder(tmp_path)
  labels = labels_of(0)
  labels[5, 6] = 7
  Image.fromarray(labels).save(root / 'masks' / 'train' / '0.png')
  config = seg_config(root)
  source = dense_pipeline.get_source(config, 'train')
  with pytest.raises(ValueError, match=r'masks/train/0.png has label 7 \(row 5, column 6\); '
                                       r'labels must be < num_classes=2 or 255 \(unlabelled\)'):
    next(dense_pipeline.train_batches(config, source, batch_size=3))


def test_classes_txt_with_a_blank_line_or_no_names_is_refused(tmp_path):
  root = seg_folder(tmp_path, classes='sky\n\nground\n')
  with pytest.raises(ValueError, match=r'classes.txt: line 2 is blank, so class 1 has no name'):
    dense_pipeline.get_source(seg_config(root), 'train')
  (root / 'classes.txt').write_text('sky\nground\n\n  \n')  # Trailing blank lines shift nothing.
  assert dense_pipeline.get_source(seg_config(root), 'train').class_names == ('sky', 'ground')
  (root / 'classes.txt').write_text('\n')
  with pytest.raises(ValueError, match=r'classes.txt names no classes'):
    dense_pipeline.get_source(seg_config(root), 'train')
  (root / 'classes.txt').write_text('sky\nground\n')
  with pytest.raises(ValueError, match=r'classes.txt names 2 classes, but num_classes=3'):
    dense_pipeline.get_source(seg_config(root, '--config.num_classes=3'), 'train')


def test_a_mask_of_another_size_than_its_image_is_refused_naming_both(tmp_path):
  root = seg_folder(tmp_path)
  Image.fromarray(np.zeros((16, 12), np.uint8)).save(root / 'masks' / 'train' / '2.png')
  with pytest.raises(ValueError, match=r'masks/train/2.png is 12x16 \(width x height\) but its '
                                       r'image .*images/train/2.jpg is 16x16'):
    dense_pipeline.get_source(seg_config(root), 'train')


def test_two_images_of_one_name_are_refused_naming_both(tmp_path):
  root = seg_folder(tmp_path)
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / 'images' / 'train' / '0.png')
  with pytest.raises(ValueError, match=r'images/train/0.jpg and .*images/train/0.png are two '
                                       r"images of one name '0'"):
    dense_pipeline.get_source(seg_config(root), 'train')


# ------------------------------------------------------------------------ det:<dir> folders

def det_folder(root, annotations=None, images=None, categories=None, size=(20, 40)):
  """val/{a,b,c}.jpg (h, w = size), annotations/instances_val.json; by default a.jpg has a
  box of class 'car' (id 3), b.jpg one of 'toaster' (id 90), c.jpg none."""
  (root / 'val').mkdir(parents=True)
  (root / 'annotations').mkdir()
  for name in ('a.jpg', 'b.jpg', 'c.jpg'):
    Image.fromarray(np.zeros(size + (3,), np.uint8)).save(root / 'val' / name)
  if images is None:
    images = [{'id': i, 'file_name': name, 'height': size[0], 'width': size[1]}
              for i, name in [(1, 'a.jpg'), (2, 'b.jpg'), (3, 'c.jpg')]]
  if annotations is None:
    annotations = [
        {'id': 10, 'image_id': 1, 'category_id': 3, 'bbox': [8, 4, 16, 8], 'iscrowd': 0,
         'segmentation': [[8, 4, 24, 4, 24, 12, 8, 12]]},
        {'id': 11, 'image_id': 2, 'category_id': 90, 'bbox': [20, 2, 10, 6], 'iscrowd': 0}]
  if categories is None:
    categories = [{'id': 90, 'name': 'toaster'}, {'id': 3, 'name': 'car'}]
  coco = {'images': images, 'annotations': annotations, 'categories': categories}
  (root / 'annotations' / 'instances_val.json').write_text(json.dumps(coco))
  return root


def det_config(root):
  return parse_config('--config=configs/detection.py:shapes', f'--config.dataset=det:{root}',
                      '--config.pp.crop=32')


def det_source(root):
  return dense_pipeline.get_source(det_config(root), 'val')


def read_objects(source, index):
  return {k: v.numpy() for k, v in source.read(
      {k: v[index] for k, v in source.examples.items()}).items()}


def test_boxes_are_placed_by_the_image_file_s_size_not_the_json_s(tmp_path, caplog):
  """The JSON says 40x80 (and nothing for b.jpg): COCO's boxes are in the file's pixels."""
  images = [{'id': 1, 'file_name': 'a.jpg', 'height': 40, 'width': 80},
            {'id': 2, 'file_name': 'b.jpg'}, {'id': 3, 'file_name': 'c.jpg'}]
  source = det_source(det_folder(tmp_path, images=images))
  first = read_objects(source, 0)
  assert 'image id 1 (a.jpg) is 20x40 (height x width) in its file, 40x80 in the JSON' in (
      caplog.text)
  np.testing.assert_allclose(first['boxes'], [[4 / 20, 8 / 40, 12 / 20, 24 / 40]])
  assert first['masks'].shape == (1, 20, 40) and first['masks'][0, 5:11, 9:23].all()
  assert first['masks'][0].sum() == first['masks'][0, 4:13, 8:25].sum()
  second = read_objects(source, 1)  # No height or width in the JSON: not needed.
  np.testing.assert_allclose(second['boxes'], [[2 / 20, 20 / 40, 8 / 20, 30 / 40]])
  assert second['classes'].tolist() == [1] and second['masks'].shape == (1, 20, 40)


def test_an_rle_of_another_size_than_its_image_is_named_where_it_is_read(tmp_path):
  annotations = [{'id': 10, 'image_id': 1, 'category_id': 3, 'bbox': [1, 1, 4, 4]},
                 {'id': 11, 'image_id': 2, 'category_id': 3, 'bbox': [1, 1, 4, 4], 'iscrowd': 1,
                  'segmentation': {'counts': [5, 10, 85], 'size': [10, 10]}}]
  config = det_config(det_folder(tmp_path, annotations=annotations))
  source = dense_pipeline.get_source(config, 'val')
  with pytest.raises(ValueError, match=r'image id 2 \(b.jpg\), annotation id 11: its RLE is of '
                                       r'size \[10, 10\], the image \[20, 40\]'):
    first_batch(config, source)


def test_a_negative_box_is_refused_and_an_empty_one_dropped_with_a_word(tmp_path, caplog):
  negative = [{'id': 17, 'image_id': 1, 'category_id': 3, 'bbox': [8, 4, 16, -2]}]
  with pytest.raises(ValueError, match=r'instances_val.json: annotation id 17 \(image id 1\) '
                                       r'has bbox .*: its width and height must be numbers >= 0'):
    det_source(det_folder(tmp_path / 'negative', annotations=negative))
  # Real datasets hold a few degenerate boxes: dropped, counted and named, not fatal ...
  empty = [{'id': 17, 'image_id': 1, 'category_id': 3, 'bbox': [8, 4, 0, 8]},
           {'id': 18, 'image_id': 1, 'category_id': 3, 'bbox': [1, 1, 4, 4]}]
  with caplog.at_level(logging.WARNING):
    det_source(det_folder(tmp_path / 'empty', annotations=empty))
  assert '1 annotation(s) with a box of zero width or height dropped (ids 17)' in caplog.text
  # ... unless nothing else is left to learn.
  with pytest.raises(ValueError, match='has no object to learn or evaluate'):
    det_source(det_folder(tmp_path / 'all_empty', annotations=empty[:1]))


def test_a_split_of_crowds_only_or_no_objects_is_refused(tmp_path):
  annotations = [{'id': 5, 'image_id': 1, 'category_id': 3, 'bbox': [1, 1, 4, 4], 'iscrowd': 1}]
  with pytest.raises(ValueError, match=r"split 'val' has no object to learn or evaluate: all "
                                       r'its 1 annotations are crowds'):
    det_source(det_folder(tmp_path / 'crowds', annotations=annotations))
  with pytest.raises(ValueError, match=r'no image of it has an annotation'):
    det_source(det_folder(tmp_path / 'none', annotations=[]))


def test_duplicate_image_ids_are_refused_naming_the_id(tmp_path):
  images = [{'id': 1, 'file_name': 'a.jpg'}, {'id': 2, 'file_name': 'b.jpg'},
            {'id': 1, 'file_name': 'c.jpg'}]
  with pytest.raises(ValueError, match=r"image id 1 appears twice \('a.jpg' and 'c.jpg'\)"):
    det_source(det_folder(tmp_path, images=images))


def test_an_image_without_annotations_trains_with_no_objects(tmp_path):
  """COCO train2017 has about 1,000 such images; c.jpg is one."""
  config = det_config(det_folder(tmp_path))
  config.pp.scale_range = (1.0, 1.0)  # No crop takes a box away.
  source = dense_pipeline.get_source(config, 'val')
  empty = read_objects(source, 2)
  assert empty['boxes'].shape == (0, 4) and empty['masks'].shape == (0, 20, 40)
  batches = dense_pipeline.train_batches(config, source, batch_size=3)
  for _ in range(2):
    batch = next(batches)
    assert batch['image'].shape == (3, 32, 32, 3)
    assert sorted((batch['labels']['classes'] >= 0).sum(1).tolist()) == [0, 1, 1]
  batch = next(dense_pipeline.eval_batches(config, source, batch_size=3, num_steps=1))
  assert batch['classes'].tolist() == [[0], [1], [-1]]


@pytest.mark.parametrize('change, message', [
    (lambda a: a.pop('bbox'), r"annotation id 10 \(image id 1\) has no 'bbox'"),
    (lambda a: a.pop('category_id'), r"annotation id 10 \(image id 1\) has no 'category_id'"),
    (lambda a: a.update(category_id=7),
     r"annotation id 10 \(image id 1\) has category_id 7, which is not among the "
     r"categories' ids \[3, 90\]"),
    (lambda a: a.update(bbox=[1, 2, 3]), r'annotation id 10 \(image id 1\) has bbox \[1, 2, 3\]'),
    (lambda a: a.update(image_id=9),
     r'annotation id 10 \(image id 9\) is of an image id that "images" does not list'),
])
def test_a_missing_key_or_unknown_category_is_named(tmp_path, change, message):
  annotations = [{'id': 10, 'image_id': 1, 'category_id': 3, 'bbox': [1, 1, 4, 4]}]
  change(annotations[0])
  with pytest.raises(ValueError, match=message):
    det_source(det_folder(tmp_path, annotations=annotations))


def test_an_image_entry_without_file_name_is_named(tmp_path):
  images = [{'id': 1, 'file_name': 'a.jpg'}, {'id': 2}]
  with pytest.raises(ValueError, match=r"image #1 \(id 2\) has no 'file_name'"):
    det_source(det_folder(tmp_path, images=images))


@pytest.mark.parametrize('polygon', [[1, 1, 5], [1, 1, 5, 1], [1, 1, 5, 1, 5, 5, 1]])
def test_a_polygon_of_fewer_than_three_points_is_refused_naming_its_annotation(tmp_path,
                                                                                polygon):
  annotations = [{'id': 12, 'image_id': 2, 'category_id': 3, 'bbox': [1, 1, 4, 4],
                  'segmentation': [[1, 1, 5, 1, 5, 5], polygon]}]
  with pytest.raises(ValueError, match=r'annotation id 12 \(image id 2\) has the polygon .*; '
                                       r'a polygon is a list of x, y pairs of at least 3 points'):
    det_source(det_folder(tmp_path, annotations=annotations))


def test_a_missing_image_file_is_named_before_reading(tmp_path):
  root = det_folder(tmp_path)
  os.remove(root / 'val' / 'b.jpg')
  with pytest.raises(ValueError, match=r'1 image file\(s\) that .*instances_val.json lists are '
                                       r'not in .*val: b.jpg'):
    det_source(root)
  assert det_source(det_folder(tmp_path / 'sliced')).num_examples == 3
  os.remove(tmp_path / 'sliced' / 'val' / 'c.jpg')  # Outside the slice read: not needed.
  assert dense_pipeline.get_source(det_config(tmp_path / 'sliced'), 'val[:2]').num_examples == 2


def test_no_categories_is_refused_by_name(tmp_path):
  with pytest.raises(ValueError, match=r'instances_val.json lists no categories'):
    det_source(det_folder(tmp_path, annotations=[], categories=[]))


@pytest.mark.parametrize('file_name', ['../../../x.jpg', 'sub/../../x.jpg', '/etc/x.jpg'])
def test_a_file_name_outside_the_split_folder_is_refused(tmp_path, file_name):
  images = [{'id': 1, 'file_name': 'a.jpg'}, {'id': 2, 'file_name': file_name}]
  with pytest.raises(ValueError, match=r'image id 2 has file_name .*; a file_name is a path '
                                       r'inside the split\'s image folder'):
    det_source(det_folder(tmp_path, images=images))
