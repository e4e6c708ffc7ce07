"""The folder layouts of dense data, read and checked in one pass before anything compiles:

  seg:<dir>  <dir>/images/<split>/<name>.{jpg,png} with <dir>/masks/<split>/<name>.png (label
             maps: 8- or 16-bit single-channel, or a palette PNG whose index is the label; 255 =
             unlabelled; without <split> folders the split is 'train') and <dir>/classes.txt,
             class i's name on line i
  det:<dir>  COCO-format JSON <dir>/annotations/{,instances_}<split>.json, images in
             <dir>/<split>/; polygons and RLEs give the instance masks

Every problem is named with its file, image id and annotation id (dense_pipeline.py reads the
examples these Sources list). What is checked: seg: classes.txt, the listing (one image per
mask, one file per name), and the header of every image and mask (size, mode, format; PIL reads
no pixels for it); label values need the pixels, so each mask's are checked where the pipeline
reads it, the error naming the file. det: one pass over the JSON (ids, keys, categories, boxes
of size >= 0, those of zero width or height dropped with a warning, polygons of >= 3 points,
file names inside the split folder) and one listing of the image folder; images without
annotations are examples without objects; boxes and polygons are in the image file's pixels
(the JSON's height and width are not used). benchmarks/dense_validation.py measures the cost.
"""

import concurrent.futures
import json
import logging
import os
import time

import numpy as np
import tensorflow as tf

from vit_jax import input_pipeline, preprocess, segmentation
from vit_jax.input_pipeline import Source

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')


def _files(directory):
  return sorted(f for f in os.listdir(directory) if not f.startswith('.'))


def _by_stem(directory, files, what):
  """{stem: file name}; two files of one stem (a.jpg and a.png) are refused by name."""
  stems = {}
  for f in files:
    stem = os.path.splitext(f)[0]
    if stem in stems:
      raise ValueError(f'{os.path.join(directory, stems[stem])} and {os.path.join(directory, f)} '
                       f'are two {what} of one name {stem!r}: which one is meant? Remove or '
                       'rename one of them.')
    stems[stem] = f
  return stems


def _class_names(path) -> tuple:
  """classes.txt: class i's name on line i + 1. Trailing blank lines are ignored; a blank line
  before a name would shift every later class by one, so it is refused."""
  with open(path) as f:
    lines = f.read().splitlines()
  while lines and not lines[-1].strip():
    lines.pop()
  if not lines:
    raise ValueError(f'{path} names no classes: class i\'s name belongs on line i + 1.')
  for number, line in enumerate(lines, 1):
    if not line.strip():
      raise ValueError(f'{path}: line {number} is blank, so class {number - 1} has no name and '
                       'every later class would move up by one; name it (e.g. "unused") or '
                       'remove the line if the masks do not use that label.')
  return tuple(line.strip() for line in lines)


# PIL modes of single-channel label maps, the stored integer being the label: 8- and 16-bit grey,
# 1-bit, and palette images (VOC, ADE20K's colour-coded PNGs), whose palette index is the label.
LABEL_MODES = frozenset({'L', 'P', '1', 'I', 'I;16', 'I;16L', 'I;16B', 'I;16N'})


def _header(path):
  """(size (width, height), PIL mode, format) from a file's header alone (PIL reads the pixels
  only when asked), or None where PIL cannot identify the file."""
  from PIL import Image
  try:
    with Image.open(path) as image:
      return image.size, image.mode, image.format
  except Exception:  # PIL raises many kinds for damaged headers; decoding names the file later.
    return None


def _headers(paths, probe: int = 100, slow: float = 5e-4) -> list:
  """_header of every path: in turn where files are at hand (PIL's parsing holds the GIL:
  threads only slow it down), on threads where the first `probe` took over `slow` seconds each
  (a network file system's latency is then overlapped)."""
  start = time.perf_counter()
  headers = [_header(path) for path in paths[:probe]]
  if len(paths) <= probe or (time.perf_counter() - start) / probe < slow:
    return headers + [_header(path) for path in paths[probe:]]
  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    return headers + list(pool.map(_header, paths[probe:], chunksize=64))


def _mask_problem(mask, image, mask_header, image_header):
  """Why a label map cannot be read as its image's class map, or None."""
  if mask_header is None:
    return f'{mask} cannot be read as a PNG image.'
  (width, height), mode, kind = mask_header
  if kind != 'PNG':
    return f'{mask} is a {kind} file; expected a PNG label map (lossless).'
  if mode not in LABEL_MODES:
    if mode in ('LA', 'La', 'PA'):
      return (f'{mask} has an alpha channel (PIL mode {mode}); expected a single-channel label '
              'map (or a palette PNG).')
    if mode.startswith('RGB'):
      return (f'{mask} is an RGB image; expected a single-channel label map (or a palette PNG): '
              'its colours would have to be mapped to class ids first.')
    return f'{mask} has PIL mode {mode}; expected a single-channel label map (or a palette PNG).'
  if image_header is not None and image_header[0] != (width, height):
    return (f'{mask} is {width}x{height} (width x height) but its image {image} is '
            f'{image_header[0][0]}x{image_header[0][1]}: a label map has its image\'s size.')
  return None


def segmentation_folder(root, split, process_index, process_count, num_classes) -> Source:
  """A seg:<dir> folder, checked before anything reads it: classes.txt, one image per mask, and
  every mask's and image's header (size, mode, format: cheap, no pixels). Label values need the
  pixels: each mask is checked where the pipeline reads it, the error naming the file."""
  classes_file = os.path.join(root, 'classes.txt')
  names = None
  if os.path.exists(classes_file):
    names = _class_names(classes_file)
    if num_classes is not None and num_classes != len(names):
      raise ValueError(f'{classes_file} names {len(names)} classes, but num_classes='
                       f'{num_classes}.')
  elif num_classes is None:
    raise ValueError(f'seg:{root} has no classes.txt (class i\'s name on line i) and '
                     'num_classes is not set: one of them must say how many classes there are.')
  num_classes = num_classes or len(names)
  if num_classes > segmentation.IGNORE:
    raise ValueError(f'seg:{root} has {num_classes} classes; label maps hold at most '
                     f'{segmentation.IGNORE} (0..{segmentation.IGNORE - 1}; '
                     f'{segmentation.IGNORE} = unlabelled).')
  split_name = split.split('[')[0].split('+')[0]
  images_dir, masks_dir = os.path.join(root, 'images'), os.path.join(root, 'masks')
  if not os.path.isdir(images_dir) or not os.path.isdir(masks_dir):
    raise ValueError(f'seg:{root} needs the folders images/ and masks/ (PNG label maps).')
  has_splits = os.path.isdir(os.path.join(images_dir, split_name))
  if has_splits:
    images_dir, masks_dir = (os.path.join(d, split_name) for d in (images_dir, masks_dir))
  stems = _by_stem(images_dir, [f for f in _files(images_dir)
                                if f.lower().endswith(IMAGE_EXTENSIONS)], 'images')
  masks = _by_stem(masks_dir, [f for f in _files(masks_dir) if f.lower().endswith('.png')],
                   'masks')
  unmatched = sorted(set(stems) ^ set(masks))
  if unmatched:
    raise ValueError(f'seg:{root}: {len(unmatched)} image(s) without a mask or masks without '
                     f'an image in {images_dir} / {masks_dir}, e.g. {unmatched[:5]} (each '
                     'image needs <name>.png in masks/).')
  order = sorted(stems)
  chosen = input_pipeline.slice_split(f'seg:{root}', split, {
      split_name if has_splits else 'train': np.arange(len(order))})
  keep = np.concatenate([indices for _, indices in chosen])
  image_paths = [os.path.join(images_dir, stems[order[i]]) for i in keep]
  mask_paths = [os.path.join(masks_dir, masks[order[i]]) for i in keep]
  for mask, image, mask_header, image_header in zip(
      mask_paths, image_paths, _headers(mask_paths), _headers(image_paths)):
    problem = _mask_problem(mask, image, mask_header, image_header)
    if problem:
      raise ValueError(f'seg:{root}: {problem}')
  problems = []  # What label_map found wrong: tf.data's error does not carry it intact.

  def label_map(path, image_size):
    from PIL import Image
    path = np.asarray(path).item()
    path = path.decode() if isinstance(path, bytes) else path
    try:
      with Image.open(path) as image:
        labels = np.asarray(image)
    except Exception as e:
      problems.append(f'{path} cannot be decoded as a PNG label map ({e}).')
      raise ValueError(problems[-1]) from e
    if labels.shape != tuple(image_size):
      problems.append(f'{path} has shape {labels.shape}; its image is {tuple(image_size)} '
                      '(height, width): a label map is single-channel, of its image\'s size.')
      raise ValueError(problems[-1])
    if labels.size and (labels.max() >= num_classes or labels.min() < 0):
      bad = (labels >= num_classes) & (labels != segmentation.IGNORE) | (labels < 0)
      if bad.any():
        row, column = np.argwhere(bad)[0]
        problems.append(f'{path} has label {labels[row, column]} (row {row}, column {column}); '
                        f'labels must be < num_classes={num_classes} or '
                        f'{segmentation.IGNORE} (unlabelled).')
        raise ValueError(problems[-1])
    return labels.astype(np.uint8)

  def read(example):
    image = preprocess.decode(tf.io.read_file(example['image']))
    label = tf.numpy_function(label_map, [example['segmentation'], tf.shape(image)[:2]],
                              tf.uint8)
    return {'image': image, 'segmentation': tf.ensure_shape(label, [None, None])}

  def find_unreadable():
    if problems:  # A label map, named where it was read.
      raise ValueError(f'seg:{root}: {problems[0]}')
    return input_pipeline.unreadable(image_paths)

  return Source(num_examples=len(keep), num_classes=num_classes,
                class_names=names, process_index=process_index, process_count=process_count,
                examples={'image': np.array(image_paths), 'segmentation': np.array(mask_paths)},
                read=read, find_unreadable=find_unreadable)


def _coco_json(root, split):
  for name in (f'{split}.json', f'instances_{split}.json'):
    path = os.path.join(root, 'annotations', name)
    if os.path.exists(path):
      with open(path) as f:
        try:
          coco = json.load(f)
        except ValueError as e:
          raise ValueError(f'{path} is not valid JSON: {e}') from None
      if not isinstance(coco, dict) or not isinstance(coco.get('images'), list):
        raise ValueError(f'{path} has no "images" list: not a COCO-format annotation file.')
      return path, coco
  raise ValueError(f'det:{root} has no annotations/{split}.json or '
                   f'annotations/instances_{split}.json (COCO format).')


def _inside(file_name) -> bool:
  """Whether a COCO file_name stays inside its split's folder (no absolute path, no '..' out)."""
  if not isinstance(file_name, str) or not file_name:
    return False
  if file_name[0] != '/' and '..' not in file_name and '\\' not in file_name:
    return True  # The common case, decided without normpath.
  name = os.path.normpath(file_name.replace('\\', '/'))
  return not os.path.isabs(name) and name != '..' and not name.startswith('../')


def _coco_categories(path, coco):
  categories = coco.get('categories')
  if not isinstance(categories, list) or not categories:
    raise ValueError(f'{path} lists no categories: a detector needs at least one class '
                     '("categories": [{"id": 1, "name": ...}, ...]).')
  ids = set()
  for index, category in enumerate(categories):
    if not isinstance(category, dict) or 'id' not in category:
      raise ValueError(f'{path}: category #{index} ({category!r}) has no "id".')
    if category['id'] in ids:
      raise ValueError(f'{path}: category id {category["id"]} appears twice.')
    ids.add(category['id'])
  try:
    return sorted(categories, key=lambda c: c['id'])
  except TypeError:
    raise ValueError(f'{path}: category ids are of mixed types ({sorted(map(repr, ids))}); '
                     'they must all be numbers.') from None


def _coco_images(path, coco) -> dict:
  """{image id: image entry}, each with an id, a file name inside the split folder, once."""
  by_id = {}
  for index, image in enumerate(coco['images']):
    try:
      image_id, file_name = image['id'], image['file_name']
      first = by_id.setdefault(image_id, image)
    except (KeyError, TypeError):
      if not isinstance(image, dict):
        what = f'image #{index} ({image!r:.80}) is not an object'
      elif 'id' not in image or 'file_name' not in image:
        what = (f'image #{index} (id {image.get("id")!r}) has no '
                f'{"id" if "id" not in image else "file_name"!r}')
      else:
        what = f'image #{index} has the id {image["id"]!r}, not a number or string'
      raise ValueError(f'{path}: {what}.') from None
    if first is not image:
      raise ValueError(f'{path}: image id {image_id!r} appears twice ({first["file_name"]!r} '
                       f'and {file_name!r}): annotations name images by id.')
    if not _inside(file_name):
      raise ValueError(f'{path}: image id {image_id!r} has file_name {file_name!r}; a file_name '
                       'is a path inside the split\'s image folder (not absolute, no "..").')
  if not by_id:
    raise ValueError(f'{path} lists no images.')
  return by_id


def _annotation_problem(path, index, annotation, class_of, images) -> str:
  """What is wrong with an annotation the fast pass could not read."""
  if not isinstance(annotation, dict):
    return f'{path}: annotation #{index} ({annotation!r:.80}) is not an object.'
  name = (f'annotation id {annotation["id"]!r}' if 'id' in annotation else
          f'annotation #{index} (no id)')
  name += f' (image id {annotation.get("image_id")!r})'
  for key in ('image_id', 'category_id', 'bbox'):
    if key not in annotation:
      return f'{path}: {name} has no {key!r}.'
  bbox = annotation['bbox']
  if (not isinstance(bbox, list) or len(bbox) != 4 or
      not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
    return f'{path}: {name} has bbox {bbox!r:.80}; expected [x, y, width, height], 4 numbers.'
  try:
    if annotation['image_id'] not in images:
      return f'{path}: {name} is of an image id that "images" does not list.'
    if annotation['category_id'] not in class_of:
      return (f'{path}: {name} has category_id {annotation["category_id"]!r}, which is not '
              f'among the categories\' ids {sorted(class_of)[:20]}.')
  except TypeError:  # An unhashable id.
    return f'{path}: {name} has an image_id or category_id that is not a number or string.'
  return f'{path}: {name} cannot be read.'


def _coco_objects(path, coco, class_of, images) -> dict:
  """{image id: [[annotation id, bbox, class, iscrowd, segmentation], ...]}, every annotation
  checked in the same pass: image and category known, width and height >= 0 (zero: dropped
  with a warning), polygons of >= 3 points, RLEs with counts and size."""
  objects = {image_id: [] for image_id in images}
  annotations = coco.get('annotations', [])
  if not isinstance(annotations, list):
    raise ValueError(f'{path}: "annotations" is not a list.')
  empty = []  # Boxes of zero width or height: nothing to learn, dropped with a word.
  for index, a in enumerate(annotations):
    try:
      x, y, w, h = bbox = a['bbox']
      valid = w >= 0 and h >= 0  # False for NaN.
      target = objects[a['image_id']]
      label = class_of[a['category_id']]
    except (KeyError, TypeError, ValueError):
      raise ValueError(_annotation_problem(path, index, a, class_of, images)) from None
    if not valid:
      raise ValueError(f'{path}: annotation id {a.get("id", f"#{index}")!r} (image id '
                       f'{a["image_id"]!r}) has bbox {bbox}: its width and height must be '
                       'numbers >= 0 ([x, y, width, height]).')
    if w == 0 or h == 0:
      empty.append(a.get('id', f'#{index}'))
      continue
    segm = a.get('segmentation')
    kind = segm.__class__
    if kind is list:
      for polygon in segm:
        if polygon.__class__ is not list or len(polygon) < 6 or len(polygon) % 2:
          raise ValueError(
              f'{path}: annotation id {a.get("id", f"#{index}")!r} (image id '
              f'{a["image_id"]!r}) has the polygon {polygon!r:.80}; a polygon is a list of '
              'x, y pairs of at least 3 points (an even count of >= 6 numbers).')
    elif kind is dict:
      if 'counts' not in segm or 'size' not in segm:
        raise ValueError(f'{path}: annotation id {a.get("id", f"#{index}")!r} (image id '
                         f'{a["image_id"]!r}) has an RLE segmentation without "counts" and '
                         '"size".')
    elif segm is not None:
      raise ValueError(f'{path}: annotation id {a.get("id", f"#{index}")!r} (image id '
                       f'{a["image_id"]!r}) has segmentation {segm!r:.80}; expected polygons '
                       '(a list of lists) or an RLE ({"counts", "size"}).')
    target.append([a.get('id', index), bbox, label, a.get('iscrowd', 0), segm])
  if empty:
    logging.warning('%s: %d annotation(s) with a box of zero width or height dropped (ids %s%s).',
                    path, len(empty), ', '.join(map(str, empty[:5])),
                    ' ...' if len(empty) > 5 else '')
  return objects


def _missing_files(folder, file_names) -> list:
  """The file names (paths relative to `folder`) that are not there: one listing per
  directory, os.path.exists only for names a listing does not show."""
  listed = {}
  missing = []
  for file_name in file_names:
    directory, base = os.path.split(file_name)
    names = listed.get(directory)
    if names is None:
      full = os.path.join(folder, directory)
      names = listed[directory] = set(os.listdir(full)) if os.path.isdir(full) else set()
    if base not in names and not os.path.isfile(os.path.join(folder, file_name)):
      missing.append(file_name)
  return missing


def detection_folder(root, split, process_index, process_count) -> Source:
  """A det:<dir> COCO folder, checked in one pass over its JSON and one listing of its image
  folder before anything reads an image. Boxes and polygons are read in the image file's pixels
  (COCO's coordinates), normalised by the decoded image's size: the JSON's height and width are
  not needed (where they disagree with the file, a warning says so once)."""
  split_name = split.split('[')[0]
  path, coco = _coco_json(root, split_name)
  categories = _coco_categories(path, coco)
  class_of = {c['id']: i for i, c in enumerate(categories)}
  by_id = _coco_images(path, coco)
  objects = _coco_objects(path, coco, class_of, by_id)
  try:
    ids = sorted(by_id)
  except TypeError:
    raise ValueError(f'{path}: image ids are of mixed types; they must all be numbers.') from None
  chosen = input_pipeline.slice_split(f'det:{root}', split, {split_name: np.arange(len(ids))})
  ids = [ids[i] for _, indices in chosen for i in indices]
  folder = os.path.join(root, split_name)
  if not os.path.isdir(folder):
    raise ValueError(f'det:{root} has no folder {split_name}/ for the images of {path}.')
  missing = _missing_files(folder, [by_id[i]['file_name'] for i in ids])
  if missing:
    raise ValueError(f'{len(missing)} image file(s) that {path} lists are not in {folder}: '
                     f'{", ".join(missing[:5])}{" ..." if len(missing) > 5 else ""}')
  if not any(not o[3] for i in ids for o in objects[i]):
    count = sum(len(objects[i]) for i in ids)
    raise ValueError(f'{path}: split {split!r} has no object to learn or evaluate: '
                     + (f'all its {count} annotations are crowds (iscrowd=1).' if count else
                        'no image of it has an annotation.'))
  # An example's 'objects' is its index here: its annotations stay Python objects, read where
  # the image is. (A numpy array of JSON strings is as wide as its longest string, 4 bytes a
  # character: 490 MiB for the 39 MiB of annotations of benchmarks/dense_validation.py.)
  records = [(i, by_id[i]['file_name'], (by_id[i].get('height'), by_id[i].get('width')),
              objects[i]) for i in ids]
  paths = np.array([os.path.join(folder, by_id[i]['file_name']) for i in ids])
  problems, warned = [], []

  def fail(message):
    problems.append(message)
    raise ValueError(message)

  def read_objects(index, size):
    from pycocotools import mask as mask_utils
    image_id, file_name, json_size, image_objects = records[int(index)]
    h, w = int(size[0]), int(size[1])
    where = f'{path}: image id {image_id!r} ({file_name})'
    if None not in json_size and json_size != (h, w) and not warned:
      warned.append(image_id)
      logging.warning('%s is %dx%d (height x width) in its file, %sx%s in the JSON: boxes and '
                      'polygons are read in the file\'s pixels (other images whose sizes '
                      'disagree are not reported).', where, h, w, *json_size)
    boxes, classes, crowd, masks = [], [], [], []
    for annotation_id, (x, y, bw, bh), label, iscrowd, segm in image_objects:
      boxes.append([y / h, x / w, (y + bh) / h, (x + bw) / w])
      classes.append(label)
      crowd.append(iscrowd)
      if isinstance(segm, dict) and list(segm['size']) != [h, w]:
        fail(f'{where}, annotation id {annotation_id!r}: its RLE is of size {segm["size"]}, '
             f'the image {[h, w]} (height, width).')
      try:
        if isinstance(segm, list) and segm:  # Polygons.
          rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
        elif isinstance(segm, dict):
          rle = mask_utils.frPyObjects(segm, h, w) if isinstance(segm['counts'], list) else segm
        else:
          rle = None
        masks.append(np.zeros((h, w), np.uint8) if rle is None else mask_utils.decode(rle))
      except Exception as e:
        fail(f'{where}, annotation id {annotation_id!r}: its segmentation cannot be decoded '
             f'({type(e).__name__}: {e}).')
    return (np.array(boxes, np.float32).reshape(-1, 4), np.array(classes, np.int32),
            np.array(crowd, np.int32), np.array(masks, np.uint8).reshape(-1, h, w))

  def read(example):
    image = preprocess.decode(tf.io.read_file(example['image']))
    size = tf.shape(image)[:2]
    boxes, classes, crowd, masks = tf.numpy_function(
        read_objects, [example['objects'], size], [tf.float32, tf.int32, tf.int32, tf.uint8])
    return {'image': image, 'boxes': tf.reshape(boxes, [-1, 4]),
            'classes': tf.reshape(classes, [-1]), 'is_crowd': tf.reshape(crowd, [-1]),
            'masks': tf.reshape(masks, tf.concat([[-1], size], 0))}

  def find_unreadable():
    if problems:  # An annotation, named where it was read.
      raise ValueError(problems[0])
    return input_pipeline.unreadable(list(paths))

  return Source(num_examples=len(ids), num_classes=len(categories),
                class_names=tuple(str(c.get('name', c['id'])) for c in categories),
                process_index=process_index, process_count=process_count,
                examples={'image': paths, 'objects': np.arange(len(records))}, read=read,
                find_unreadable=find_unreadable)
