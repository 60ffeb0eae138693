from setuptools import find_packages, setup

setup(
    name="fcmae",
    version="0.1.0",
    description="ConvNeXt V2 FCMAE pre-training with a pure-PyTorch sparse encoder, "
    "sparse-to-dense conversion and fine-tuning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # Every lower bound is the lowest version the whole test suite passed with (README, "Tested
    # versions": torch 2.6.0, torchvision 0.21.0, timm 1.0.21, numpy 1.26.4; torch 2.3.1 fails it).
    # The sources alone need Python 3.8 (vermin, checked in .ci/run); timm needs 3.9, webdataset 1.0 3.10.
    python_requires=">=3.10",
    packages=find_packages(include=["sparse", "sparse.*", "fcmae", "fcmae.*", "finetune", "finetune.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.6.0",
        "torchvision>=0.21.0",
        "timm>=1.0.21",
        "numpy>=1.26.4",
        "tensorboard>=2.21",
        "pyyaml>=6.0.3",
        "scikit-image>=0.24",  # its bundled photographs are the built-in demo data
        "Pillow>=13.0.0",  # reads JPEG, PNG and the other 8-bit formats (fcmae/data)
        "tifffile>=2026.3.3",  # reads .tif/.tiff domain images (fcmae/data/image_io.py)
        "webdataset>=1.0.2",  # reads and writes tar shards (fcmae/data/shards.py, fcmae/data/make_shards.py)
    ],
    # transformers: the version the Hugging Face export tests ran with; it needs Python >= 3.11, so on
    # older Pythons the test extra leaves it out (those tests then skip, saying why).
    # torchcodec: decodes 16-bit PNGs and GPU JPEG batches (fcmae/data/decoders.py); without it (older torch,
    # Python < 3.10) torchvision's deprecated decoders do, with the same pixels.
    extras_require={"hf": ["transformers>=5.24"],
                    "codec": ["torchcodec>=0.17"],
                    "test": ["pytest>=8.4", "vermin>=1.9", "ruff>=0.17.6",  # ruff: the lint in .ci/run
                             'transformers>=5.24; python_version >= "3.11"',
                             'torchcodec>=0.17; python_version >= "3.10"']},
    entry_points={
        "console_scripts": [
            "fcmae-pretrain=fcmae.pretrain.main:main",
            "fcmae-convert=finetune.convert:main",
            "fcmae-finetune=finetune.main_finetune:main",
            "fcmae-knn=finetune.knn:main",
            "fcmae-linprobe=finetune.linprobe:main",
            "fcmae-env=fcmae.tools.env:main",
            "fcmae-make-shards=fcmae.data.make_shards:main",
        ]
    },
)
