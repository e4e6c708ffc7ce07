"""What the checks of seg:/det: folders (dense_folders.py) cost (issue 36), against building the
Source without them: dense_pipeline.py at --revision, loaded from git (default 426eb03, the
commit before the checks landed).

  .venv/bin/python benchmarks/dense_validation.py [--images 20000 --annotations 100000]

det: a synthetic COCO-sized JSON (default 20k image entries, 100k annotations: polygons of 20
points as COCO's, 1% crowds with RLEs) whose image files are tiny JPEGs, all created here. Timed,
best of --repeats: json.load alone; get_source of the revision; get_source now; and the parts of
the checks alone (the annotation pass, the one listing of the image folder).
seg: a folder of --seg image/mask pairs; get_source then and now (the difference is the header of
every image and mask, read with PIL), and per-file header costs.
Everything is on the page cache (warm): a cold network file system costs more per file.
"""

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))


def best(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def interleaved(parts, repeats):
  """{name: best time} of parts {name: fn}, run in turn: a busy machine slows each alike."""
  times = {name: float('inf') for name in parts}
  for _ in range(repeats):
    for name, fn in parts.items():
      times[name] = min(times[name], best(fn, 1))
  return times


def module_at(revision):
  """dense_pipeline.py as it was at `revision`, imported under another name."""
  text = subprocess.run(['git', '-C', ROOT, 'show', f'{revision}:vit_jax/dense_pipeline.py'],
                        check=True, capture_output=True, text=True).stdout
  path = os.path.join(tempfile.mkdtemp(), 'dense_pipeline_before.py')
  with open(path, 'w') as f:
    f.write(text)
  spec = importlib.util.spec_from_file_location('dense_pipeline_before', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_jpeg():
  import io
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buffer, 'JPEG')
  return buffer.getvalue()


def write_coco(root, num_images, num_annotations):
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, 'annotations'))
  os.makedirs(os.path.join(root, 'train'))
  data = tiny_jpeg()
  images = []
  for i in range(num_images):
    name = f'{i + 1:012d}.jpg'
    with open(os.path.join(root, 'train', name), 'wb') as f:
      f.write(data)
    images.append({'id': i + 1, 'file_name': name, 'height': 480, 'width': 640,
                   'license': 1, 'coco_url': f'http://images.cocodataset.org/train2017/{name}',
                   'date_captured': '2013-11-14 16:28:13', 'flickr_url': 'http://farm.x/y.jpg'})
  annotations = []
  for a in range(num_annotations):
    x, y = rng.uniform(0, 500, 2).round(2).tolist()
    w, h = rng.uniform(1, 140, 2).round(2).tolist()
    crowd = a % 100 == 0
    if crowd:
      segmentation = {'counts': rng.integers(1, 300, 60).tolist(), 'size': [480, 640]}
    else:
      angles = np.linspace(0, 2 * np.pi, 20, endpoint=False)
      polygon = np.stack([x + w / 2 * (1 + np.cos(angles)), y + h / 2 * (1 + np.sin(angles))], 1)
      segmentation = [polygon.round(2).ravel().tolist()]
    annotations.append({'id': a + 1, 'image_id': int(rng.integers(1, num_images + 1)),
                        'category_id': int(rng.integers(1, 81)), 'bbox': [x, y, w, h],
                        'area': round(w * h, 2), 'iscrowd': int(crowd),
                        'segmentation': segmentation})
  coco = {'info': {}, 'licenses': [], 'images': images, 'annotations': annotations,
          'categories': [{'id': c, 'name': f'class{c}', 'supercategory': 's'}
                         for c in range(1, 81)]}
  path = os.path.join(root, 'annotations', 'instances_train.json')
  with open(path, 'w') as f:
    json.dump(coco, f)
  return path


def write_seg(root, count):
  from PIL import Image
  for kind in ('images', 'masks'):
    os.makedirs(os.path.join(root, kind, 'train'))
  data = tiny_jpeg()
  for i in range(count):
    with open(os.path.join(root, 'images', 'train', f'{i:06d}.jpg'), 'wb') as f:
      f.write(data)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(
        os.path.join(root, 'masks', 'train', f'{i:06d}.png'))
  with open(os.path.join(root, 'classes.txt'), 'w') as f:
    f.write('a\nb\n')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--images', type=int, default=20_000)
  parser.add_argument('--annotations', type=int, default=100_000)
  parser.add_argument('--seg', type=int, default=4_000, help='seg: image/mask pairs')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--revision', default='426eb03', help='the code without the checks')
  args = parser.parse_args()
  before = module_at(args.revision)
  work = tempfile.mkdtemp(prefix='dense_validation_')
  try:
    measure(args, before, work)
  finally:
    shutil.rmtree(work)


def measure(args, before, work):
  from helpers import parse_config
  from vit_jax import dense_folders, dense_pipeline

  # ------------------------------------------------------------------------------------ det
  coco_root = os.path.join(work, 'coco')
  start = time.perf_counter()
  path = write_coco(coco_root, args.images, args.annotations)
  print(f'det: {args.images} image entries and files, {args.annotations} annotations, JSON '
        f'{os.path.getsize(path) / 2**20:.0f} MiB, written in {time.perf_counter() - start:.0f} s')
  config = parse_config('--config=configs/detection.py:shapes',
                        f'--config.dataset=det:{coco_root}')
  with open(path) as f:
    coco = json.load(f)

  def load():
    with open(path) as f:
      json.load(f)

  parts = {
      'json.load alone': load,
      'get_source before (no checks)': lambda: before.get_source(config, 'train'),
      'get_source now (with checks)': lambda: dense_pipeline.get_source(config, 'train'),
  }
  times = interleaved(parts, args.repeats)

  # The checks' own parts, on the loaded JSON.
  categories = dense_folders._coco_categories(path, coco)
  class_of = {c['id']: i for i, c in enumerate(categories)}
  by_id = dense_folders._coco_images(path, coco)

  def group_only():  # What the code before did per annotation: group by image, one dict each.
    by_image = {}
    for a in coco['annotations']:
      by_image.setdefault(a['image_id'], []).append(a)
    for annotations in by_image.values():
      [{'bbox': a['bbox'], 'class': class_of[a['category_id']], 'iscrowd': a.get('iscrowd', 0),
        'segmentation': a.get('segmentation')} for a in annotations]

  folder = os.path.join(coco_root, 'train')
  names = [image['file_name'] for image in coco['images']]
  parts = {
      'annotation pass before (no checks)': group_only,
      'annotation pass now (with the checks)': lambda: dense_folders._coco_objects(
          path, coco, class_of, by_id),
      'image entries: ids, duplicates, file_name paths': lambda: dense_folders._coco_images(
          path, coco),
      'image files exist: one listing': lambda: dense_folders._missing_files(folder, names),
      'image files exist: os.path.exists each (not used)': lambda: [
          os.path.exists(os.path.join(folder, n)) for n in names],
  }
  times.update(interleaved(parts, args.repeats))
  for name, seconds in times.items():
    print(f'  {name:52s} {seconds * 1e3:8.1f} ms')
  extra = (times['annotation pass now (with the checks)'] -
           times['annotation pass before (no checks)'] +
           times['image entries: ids, duplicates, file_name paths'] +
           times['image files exist: one listing'])
  listing = times['get_source before (no checks)']
  print(f'  the checks (annotation pass now - before + image entries + listing): '
        f'{extra * 1e3:.1f} ms = {100 * extra / listing:.1f}% of building the Source before '
        f'({listing * 1e3:.0f} ms)')
  now = times['get_source now (with checks)']
  print(f'  the checks: {100 * extra / now:.1f}% of building the Source now ({now * 1e3:.0f} ms: '
        'annotations are no longer copied into JSON strings)')
  print(f'  get_source now - before: {(now - listing) * 1e3:+.1f} ms = '
        f'{100 * (now - listing) / listing:+.1f}%')

  objects = before.get_source(config, 'train').examples['objects']
  print(f'  before, the annotations as a numpy array of JSON strings: {objects.dtype}, '
        f'{objects.nbytes / 2**20:.0f} MiB for {sum(map(len, objects)) / 2**20:.0f} MiB of text '
        '(now: kept as Python objects, the example holds an index)')

  # Reading every image's header (a refusal of JSON sizes that disagree would need it).
  sample = [os.path.join(folder, n) for n in names[:2000]]
  header = best(lambda: [dense_folders._header(p) for p in sample], args.repeats) / len(sample)
  print(f'  PIL header of a JPEG: {header * 1e6:.0f} us per file: {args.images} images '
        f'{header * args.images * 1e3:.0f} ms = {100 * header * args.images / listing:.0f}% of '
        'building the Source (not done: boxes use the decoded image\'s size)')

  # ------------------------------------------------------------------------------------ seg
  seg_root = os.path.join(work, 'seg')
  write_seg(seg_root, args.seg)
  config = parse_config('--config=configs/segmentation.py:shapes',
                        f'--config.dataset=seg:{seg_root}')
  seg_before = best(lambda: before.get_source(config, 'train'), args.repeats)
  seg_now = best(lambda: dense_pipeline.get_source(config, 'train'), args.repeats)
  masks = [os.path.join(seg_root, 'masks', 'train', f'{i:06d}.png') for i in range(args.seg)]
  images = [os.path.join(seg_root, 'images', 'train', f'{i:06d}.jpg') for i in range(args.seg)]
  png = best(lambda: [dense_folders._header(p) for p in masks], args.repeats) / args.seg
  jpeg = best(lambda: [dense_folders._header(p) for p in images], args.repeats) / args.seg
  threads = best(lambda: dense_folders._headers(masks + images, slow=0), args.repeats) / (
      2 * args.seg)  # Forced onto threads, as on a slow file system.
  decode = best(lambda: [dense_pipeline.preprocess.decode(
      dense_pipeline.tf.io.read_file(p)) for p in images[:500]], 1) / 500
  print(f'seg: {args.seg} image/mask pairs')
  print(f'  get_source before {seg_before * 1e3:.0f} ms, now {seg_now * 1e3:.0f} ms '
        f'({(seg_now - seg_before) / args.seg * 1e6:.0f} us per pair more)')
  print(f'  PIL header: PNG mask {png * 1e6:.0f} us, JPEG image {jpeg * 1e6:.0f} us; on 32 '
        f'threads {threads * 1e6:.0f} us per file (used where the first files are slow); decoding a 16x16 JPEG with tf '
        f'{decode * 1e6:.0f} us')
  print(f'  ADE20K-sized (20,210 pairs): {(png + jpeg) * 20_210:.1f} s of headers, warm cache')


if __name__ == '__main__':
  main()
