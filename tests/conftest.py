"""Fixtures every test module may use: a single-process environment, a private demo cache, an image folder."""

import os

import pytest

from tests.helpers import is_dist_variable, write_images


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """No torchrun / SLURM / launcher variables leak in from the shell (or the SLURM job) that runs the tests."""
    for var in [name for name in os.environ if is_dist_variable(name)]:
        monkeypatch.delenv(var)


@pytest.fixture
def demo_cache(tmp_path, monkeypatch):
    """Demo data sets are built in this test's own folder, not in ~/.cache/fcmae."""
    monkeypatch.setenv("FCMAE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """An unlabelled image folder: train/class_a and train/class_b, 12 small PNGs each."""
    root = tmp_path_factory.mktemp("data")
    write_images(root / "train" / "class_a", 12, seed=0)
    write_images(root / "train" / "class_b", 12, seed=1)
    return root
