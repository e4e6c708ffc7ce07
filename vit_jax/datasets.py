"""Facts about the datasets the recipes know by name (plain data, imported by low-level modules
such as checkpoint.py as well as by the recipes)."""

# Class count, train-set size and the default splits of the datasets the recipes know by name.
# Any other TFDS name works too (its class count is then read from the TFDS builder).
DATASETS = {
    'digits': dict(num_classes=10, train_size=1438, train='train', test='test'),
    'cifar10': dict(num_classes=10, train_size=50_000, train='train[:98%]', test='test'),
    'cifar100': dict(num_classes=100, train_size=50_000, train='train[:98%]', test='test'),
    'imagenet2012': dict(num_classes=1000, train_size=1_281_167, train='train[:99%]',
                         test='validation'),
    # No TFDS builder: the release unpacked into one folder per class (docs/imagenet.md, "ImageNet-21k").
    'imagenet21k': dict(num_classes=21_843, train_size=13_155_000, train='train[:99%]',
                        test='train[99%:]', multi_label=True, dataset='folder:~/imagenet21k'),
    'oxford_iiit_pet': dict(num_classes=37, train_size=3_680, train='train[:90%]', test='test'),
    'oxford_flowers102': dict(num_classes=102, train_size=1_020, train='train', test='test'),
}

# Datasets with class maps (segmentation) or boxes (detection), read by dense_pipeline.py:
# the embedded shapes (both), folders 'seg:<dir>' / 'det:<dir>', and these TFDS ones.
SEGMENTATION_TFDS = {'scene_parse150': 150}  # ADE20K: its classes (label 0, "other", unread).
DETECTION_TFDS = ('coco/2017',)


def has_class_maps(dataset: str) -> bool:
  return dataset == 'shapes' or dataset.startswith('seg:') or dataset in SEGMENTATION_TFDS


def has_boxes(dataset: str) -> bool:
  return dataset == 'shapes' or dataset.startswith('det:') or dataset in DETECTION_TFDS
