from setuptools import find_packages, setup

setup(
    name="fcmae",
    version="0.1.0",
    description="ConvNeXt V2 FCMAE pre-training with a pure-PyTorch sparse encoder, "
    "sparse-to-dense conversion and fine-tuning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["sparse", "sparse.*", "fcmae", "fcmae.*", "finetune", "finetune.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "timm>=1.0",
        "numpy>=1.22",
        "tensorboard>=2.10",
        "pyyaml>=5.4",
        "scikit-image>=0.19",  # its bundled photographs are the built-in demo data
    ],
    extras_require={"hf": ["transformers>=4.40"], "test": ["pytest>=7", "transformers>=4.40"]},
    entry_points={
        "console_scripts": [
            "fcmae-pretrain=fcmae.main_pretrain:main",
            "fcmae-convert=finetune.convert:main",
            "fcmae-finetune=finetune.main_finetune:main",
            "fcmae-knn=finetune.knn:main",
            "fcmae-linprobe=finetune.linprobe:main",
        ]
    },
)
