"""The training step has no host syncs and compiles to one graph (CPU, tiny configs).

A tensor value read on the host (`.item()`, `float(t)`, `nonzero()`, a
`torch.all` in an `if`) is a device-to-host sync per step on CUDA and a graph
break under torch.compile; `torch._dynamo.explain` counts the breaks.
"""

import pytest
import torch

import sparse
from fcmae import build_fcmae
from sparse.masking import num_kept, random_mask
from tests.helpers import TINY_DEPTHS, TINY_DIMS, assert_close, randomize_

IMG = 64  # a 2x2 grid of 32x32 patches


def tiny_fcmae(backend="torch", seed=0):
    torch.manual_seed(seed)
    return build_fcmae("atto", img_size=IMG, mask_ratio=0.5, decoder_dim=16, backend=backend,
                       depths=TINY_DEPTHS, dims=TINY_DIMS)


def one_graph(fn, *args, **kwargs):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), reasons


@pytest.mark.parametrize("backend,given_mask", [("torch", False), ("torch", True), ("dense-masked", False)])
@pytest.mark.slow
def test_fcmae_train_step_is_one_graph(backend, given_mask):
    model = tiny_fcmae(backend).train()
    imgs = torch.randn(2, 3, IMG, IMG)
    mask = model.random_mask(imgs) if given_mask else None
    one_graph(model, imgs, mask)


@pytest.mark.parametrize("backend,masked", [("torch", False), ("torch", True), ("dense-masked", True)])
@pytest.mark.slow
def test_encoder_is_one_graph(backend, masked):
    encoder = sparse.build_encoder("atto", backend, TINY_DEPTHS, TINY_DIMS, drop_path_rate=0.1).train()
    imgs = torch.randn(2, 3, IMG, IMG)
    if masked:
        # The caller states the kept count (FCMAE does, from its mask ratio).
        one_graph(encoder, imgs, random_mask(2, 4, 0.5), num_kept=num_kept(4, 0.5))
    else:
        one_graph(encoder, imgs, None)


def test_patch_indices_are_raster_order_without_nonzero():
    visible = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 0, 0, 1, 0, 1]], dtype=torch.bool).reshape(2, 2, 3)
    sites = sparse.sites.PatchSites(visible, num_kept=3)
    assert sites.rows.tolist() == [[0, 0, 1], [0, 1, 1]]
    assert sites.cols.tolist() == [[1, 2, 1], [0, 0, 2]]
    counted = sparse.sites.PatchSites(visible)  # count read from the map
    assert counted.num_kept == 3 and torch.equal(counted.rows, sites.rows)


def test_random_mask_by_count_and_by_ratio():
    gen = torch.Generator().manual_seed(0)
    mask = random_mask(3, 7, num_masked=4, generator=gen)
    assert mask.sum(1).tolist() == [4, 4, 4]
    assert random_mask(3, 10, 0.6).sum(1).tolist() == [6, 6, 6]
    with pytest.raises(ValueError, match="exactly one"):
        random_mask(3, 7, 0.5, num_masked=2)
    with pytest.raises(ValueError, match=r"num_masked must be in \[0, 7\)"):
        random_mask(3, 7, num_masked=7)


@pytest.mark.slow
def test_compiled_step_matches_eager():
    """Same loss and gradients, compiled and eager, for the same mask and drop-path-free model.

    The aot_eager backend runs dynamo and AOTAutograd (graph capture, the
    functionalised forward and backward) but not inductor's C++ codegen,
    which takes minutes on 2 CPU cores; inductor itself runs in the GPU check.
    """
    eager = randomize_(tiny_fcmae(seed=1), seed=1).train()
    compiled_model = randomize_(tiny_fcmae(seed=1), seed=1).train()
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    imgs = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    mask = eager.random_mask(imgs, generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    for model, run in ((eager, eager), (compiled_model, compiled)):
        loss, _, _ = run(imgs, mask)
        loss.backward()
        model.loss = loss.detach()
    assert_close(compiled_model.loss, eager.loss, rel=1e-5)
    grads = dict(compiled_model.named_parameters())
    for name, param in eager.named_parameters():
        assert param.grad is not None and param.grad.abs().max() > 0, name
        assert_close(grads[name].grad, param.grad, rel=1e-4)
