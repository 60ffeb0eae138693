"""The `minkowski` backend is optional: without MinkowskiEngine, asking for it
fails clearly and says how to install it; nothing else needs it.

These tests run whether or not MinkowskiEngine is installed: its absence is
simulated by hiding it from the import system.
"""

import subprocess
import sys

import pytest
import torch

import sparse
import sparse.minkowski as minkowski


@pytest.fixture
def without_minkowski(monkeypatch):
    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)  # `import MinkowskiEngine` now fails
    monkeypatch.setattr(minkowski, "_ME", None)  # forget a previous successful import


def test_backend_without_minkowski_says_how_to_install(without_minkowski):
    with pytest.raises(ImportError, match=r"launch/install_minkowski\.sh") as info:
        sparse.build_encoder("atto", backend="minkowski")
    assert isinstance(info.value, minkowski.MinkowskiEngineUnavailable)
    assert "MinkowskiEngine" in str(info.value) and "docs/MINKOWSKI.md" in str(info.value)
    # The other backends are unaffected.
    encoder = sparse.build_encoder("atto", backend="torch", depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))
    with pytest.raises(ImportError, match="MinkowskiEngine"):
        encoder.set_backend("minkowski")
    assert encoder.backend == "torch"


@pytest.mark.slow
def test_nothing_imports_minkowski_engine():
    code = (
        "import sys, sparse, sparse.encoder, sparse.sites, sparse.minkowski, finetune.convert\n"
        "m = sparse.build_encoder('atto', depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))\n"
        "assert 'MinkowskiEngine' not in sys.modules, 'MinkowskiEngine was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kernel_layout_helpers_need_no_minkowski(without_minkowski):
    w = torch.randn(3, 1, 7, 7)
    kernel = minkowski.depthwise_to_me(w)
    assert kernel.shape == (49, 3)
    # ME's offset index k = ky + 7 * kx (first coordinate axis fastest); torch's is ky * 7 + kx.
    assert torch.equal(kernel[1 + 7 * 2], w[:, 0, 1, 2])
    assert torch.equal(minkowski.depthwise_from_me(kernel), w)
    v = torch.randn(4, 3, 2, 2)
    assert torch.equal(minkowski.conv_to_me(v)[1], v[:, :, 1, 0].t())
    assert torch.equal(minkowski.conv_from_me(minkowski.conv_to_me(v)), v)
