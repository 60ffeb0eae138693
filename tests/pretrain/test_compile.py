"""The training step has no host syncs and compiles to one graph (CPU, tiny configs).

A tensor value read on the host (`.item()`, `float(t)`, `nonzero()`, a
`torch.all` in an `if`) is a device-to-host sync per step on CUDA and a graph
break under torch.compile; `torch._dynamo.explain` counts the breaks.

The compiled step's proofs (what CPU can show of a step fit for CUDA
graphs): compiled once, it runs 10 different random masks with no
recompilation (`error_on_recompile`), and the ATen graphs of its forward
and backward hold no operation that reads a tensor value on the host
(HOST_READS); the same for regional compilation (fcmae.runtime.device),
with one graph per stage width. The optimizer step is not compiled (fused
AdamW, eager).
"""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import sparse
from fcmae import build_fcmae
from fcmae.runtime.device import compile_regions
from sparse.masking import num_kept, random_mask
from tests.helpers import TINY_DEPTHS, TINY_DIMS, assert_close, randomize_

# ATen operations whose result the host must read (a device-to-host sync on CUDA): scalars out of tensors,
# and outputs whose shape depends on the values.
HOST_READS = ("aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.nonzero",
              "aten.masked_select", "aten.unique", "aten._unique", "aten.unique_consecutive", "aten.bincount",
              "aten.repeat_interleave.Tensor", "aten.allclose", "aten.argwhere")

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


class RecordingBackend:
    """A torch.compile backend (AOTAutograd, graphs run as traced) that keeps every forward and backward graph."""

    def __init__(self):
        self.forward, self.backward = [], []
        self.backend = aot_autograd(fw_compiler=self._keep(self.forward), bw_compiler=self._keep(self.backward))

    @staticmethod
    def _keep(graphs):
        def compiler(graph_module, example_inputs):
            graphs.append(graph_module)
            return make_boxed_func(graph_module.forward)
        return compiler

    def host_reads(self):
        """(graph, op) of every operation in HOST_READS in the kept graphs."""
        return [(i, str(node.target)) for i, g in enumerate(self.forward + self.backward) for node in g.graph.nodes
                if node.op == "call_function" and str(node.target).startswith(HOST_READS)]


def test_host_read_check_finds_item_and_nonzero():
    """The check can fail: `.item()` and `nonzero()` captured into the graph are found."""
    torch._dynamo.reset()
    recorder = RecordingBackend()

    def reads(x):  # an integer count read on the host, and a shape that depends on values
        return x * (x > 0).sum().item() + torch.nonzero(x > 0).shape[0]

    with torch._dynamo.config.patch(capture_scalar_outputs=True, capture_dynamic_output_shape_ops=True):
        torch.compile(reads, backend=recorder.backend, fullgraph=True)(torch.randn(4, requires_grad=True))
    found = {op.split(".")[1] for _, op in recorder.host_reads()}
    assert {"_local_scalar_dense", "nonzero"} <= found, recorder.host_reads()


def train_steps(run, model, masks, seed=4):
    """One training step (forward, loss, backward) per mask (None: drawn inside); returns the masks used."""
    used = []
    gen = torch.Generator().manual_seed(seed)
    for mask in masks:
        imgs = torch.randn(2, 3, IMG, IMG, generator=gen)
        loss, _, used_mask = run(imgs, mask)
        loss.backward()
        used.append(used_mask.detach().clone())
        model.zero_grad(set_to_none=True)
    return used


def ten_masks(model):
    gen = torch.Generator().manual_seed(5)
    imgs = torch.zeros(2, 3, IMG, IMG)
    return [model.random_mask(imgs, generator=gen) for _ in range(10)]


@pytest.mark.parametrize("given_masks", [False, True])
@pytest.mark.slow
def test_compiled_step_never_recompiles_across_masks_and_reads_nothing_on_the_host(given_masks):
    """Whole-model compile: the first step compiles one forward and one backward graph; 10 more masks add none."""
    model = tiny_fcmae(seed=2).train()
    torch._dynamo.reset()
    recorder = RecordingBackend()
    run = torch.compile(model, backend=recorder.backend, fullgraph=True, dynamic=False)
    masks = ten_masks(model) if given_masks else [None] * 10
    train_steps(run, model, masks[:1])
    with torch._dynamo.config.patch(error_on_recompile=True):
        used = train_steps(run, model, masks[1:])
    assert len({tuple(m.flatten().tolist()) for m in used}) >= 5  # the masks did change (4 patches, 2 kept)
    assert (len(recorder.forward), len(recorder.backward)) == (1, 1)
    assert recorder.host_reads() == []


@pytest.mark.parametrize("backend", ["torch", "dense-masked"])
@pytest.mark.slow
def test_regional_step_compiles_each_stage_once_and_matches_eager(backend):
    """Regional compile: one graph per stage width and one for the decoder block; 10 masks add none; eager's values.

    9 encoder blocks over 4 stage widths and the decoder's block (another width): 5 graphs.
    """
    depths = (2, 3, 2, 2)
    eager, regional = (randomize_(build_fcmae("atto", img_size=IMG, mask_ratio=0.5, decoder_dim=16, backend=backend,
                                              depths=depths, dims=TINY_DIMS), seed=3).train() for _ in range(2))
    torch._dynamo.reset()
    recorder = RecordingBackend()
    compile_regions(regional, recorder.backend)
    masks = ten_masks(eager)
    train_steps(regional, regional, masks[:1])
    with torch._dynamo.config.patch(error_on_recompile=True):
        train_steps(regional, regional, masks[1:])
    assert (len(recorder.forward), len(recorder.backward)) == (5, 5)
    assert recorder.host_reads() == []
    imgs = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(6))
    for model in (eager, regional):
        model.loss = model(imgs, masks[0])[0]
        model.loss.backward()
    assert_close(regional.loss, eager.loss, rel=1e-5)
    grads = dict(regional.named_parameters())
    for name, param in eager.named_parameters():
        assert_close(grads[name].grad, param.grad, rel=1e-4)
