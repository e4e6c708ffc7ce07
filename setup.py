"""vit_jax: Vision Transformers in JAX/Flax (Dosovitskiy et al. 2020, arXiv:2010.11929)."""

from setuptools import find_packages, setup

setup(
    name='vit_jax',
    version='0.1.0',
    description='Vision Transformer pre-training, fine-tuning and analysis in JAX/Flax.',
    packages=find_packages(include=['vit_jax', 'vit_jax.*']),
    python_requires='>=3.10',
    install_requires=[
        'absl-py>=2.1,<3',
        'clu>=0.0.12,<0.1',
        'flax>=0.12.8,<0.13',
        'huggingface_hub>=0.34,<3',  # hf://ORG/NAME checkpoints, through its local cache.
        'importlib_resources>=6,<8',  # TFDS imports it when it downloads and prepares a dataset.
        'jax>=0.10.2,<0.11',
        'matplotlib>=3.9,<4',  # The analysis figures.
        'ml_collections>=1.1,<2',
        'numpy>=2.0,<3',
        'optax>=0.2.8,<0.3',
        'orbax-checkpoint>=0.12.8,<0.13',
        'pillow>=11,<14',
        'pycocotools>=2.0.8,<3',  # COCO box and mask mAP (detection), the field's reference.
        'safetensors>=0.4,<1',  # Hugging Face and timm weights (never pickles).
        'scikit-learn>=1.5,<2',  # Only for its bundled digits dataset (the offline demo).
        'tensorboard>=2.21,<2.22',  # clu's metric writers need it.
        'tensorflow-cpu>=2.21,<2.22; platform_machine=="x86_64"',
        'tensorflow>=2.21,<2.22; platform_machine!="x86_64"',
        'tensorflow-datasets>=4.9.10,<5',
    ],
    extras_require={
        'notebooks': ['ipykernel>=6.29,<8', 'nbclient>=0.10,<0.12', 'nbformat>=5.10,<6'],
        # The XLA:TPU compiler (libtpu), for vit_jax.plan on any host: jax's own pin.
        'tpu': ['jax[tpu]>=0.10.2,<0.11'],
        'test': ['jax[tpu]>=0.10.2,<0.11', 'pytest>=8,<10', 'pytest-xdist>=3.6,<4',
                 'filelock>=3.12,<5',
                 'ipykernel>=6.29,<8', 'nbclient>=0.10,<0.12', 'nbformat>=5.10,<6'],
        # PyTorch timm and transformers, for interoperability checks and side-by-side
        # benchmarks. This torch /
        # torchvision pair imports together on a CPU-only machine.
        'bench': ['timm>=1.0,<2', 'torch==2.14.1', 'torchvision==0.29.1',
                  'transformers>=5,<6'],
    },
)
