"""Checks that need a CUDA device (marker `cuda`; launch/gpu_check.sh runs them).

They skip without one. Tiny configurations: they check correctness on the
device, not speed (speed is the GPU check's bench part).
"""

from functools import partial
from pathlib import Path

import pytest
import torch

import sparse
from fcmae import build_fcmae
from fcmae.pretrain.optim import build_optimizer
from fcmae.runtime.checkpoint import load_checkpoint
from fcmae.runtime.logs import read_jsonl
from tests.helpers import TINY_DEPTHS, TINY_DIMS, assert_close, random_mask, randomize_, tiny_args
from tests.sparse.test_encoder import dense_timm_model, forward_and_grads

NO_CUDA = not torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(NO_CUDA, reason="no CUDA device")]
CUDA = torch.device("cuda")


@pytest.fixture
def no_tf32(monkeypatch):
    """Exact float32 matmuls and convolutions for this test only (the flags are process-wide)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def tiny_encoder(backend, seed=0):
    return randomize_(sparse.build_encoder("atto", backend, TINY_DEPTHS, TINY_DIMS), seed).to(CUDA)


@pytest.mark.parametrize("dtype,rel,grad_rel", [(torch.float32, 1e-4, 1e-3), (torch.bfloat16, 5e-2, 1e-1)])
def test_torch_backend_equals_dense_masked_on_cuda(no_tf32, dtype, rel, grad_rel):
    imgs = torch.randn(3, 3, 96, 64, generator=torch.Generator().manual_seed(0)).to(CUDA)
    mask = random_mask(3, 6, 3, seed=1).to(CUDA)
    out_weights = torch.randn(3, TINY_DIMS[-1], 3, 2, device=CUDA)
    results = []
    for backend in ("torch", "dense-masked"):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            results.append(forward_and_grads(tiny_encoder(backend), imgs, mask, out_weights))
    (out, img_grad, grads), (ref_out, ref_img_grad, ref_grads) = results
    assert out.dtype == dtype
    assert_close(out.float(), ref_out.float(), rel=rel)
    assert_close(img_grad, ref_img_grad, rel=grad_rel)
    for name in grads:
        assert_close(grads[name], ref_grads[name], rel=grad_rel)


def test_unmasked_encoder_equals_timm_dense_on_cuda(no_tf32):
    encoder = tiny_encoder("torch").eval()
    dense = dense_timm_model(encoder.cpu()).to(CUDA)
    encoder.to(CUDA)
    imgs = torch.randn(2, 3, 64, 96, device=CUDA)
    with torch.no_grad():
        assert_close(encoder(imgs), dense.forward_features(imgs), rel=1e-4)


def test_training_step_has_no_host_sync():
    """Forward (mask drawn inside), backward and fused AdamW step without one device-to-host sync (bf16)."""
    model = build_fcmae("atto", img_size=64, mask_ratio=0.5, decoder_dim=16, depths=TINY_DEPTHS, dims=TINY_DIMS,
                        drop_path_rate=0.1).to(CUDA).train()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.05)
    assert all(group["fused"] for group in optimizer.param_groups)  # every parameter on CUDA
    imgs = torch.randn(4, 3, 64, 64, device=CUDA)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(imgs)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step()  # the first step creates the optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()


def write_images(folder: Path, count: int):
    from tests.pretrain.test_pretrain_run import write_images as write

    write(folder / "train" / "synthetic", count)


# The shared tiny run on the GPU, eager (inductor's compilation is the bench's: minutes of GPU time).
tiny_pretrain_args = partial(tiny_args, vis_images=0, save_every=None, keep_checkpoints=None, device="cuda",
                             compile="false")


def train_losses(out):
    return [r["loss"] for r in read_jsonl(out / "log.jsonl") if r["type"] == "train"]


def test_pretraining_with_fp16_and_the_grad_scaler(tmp_path):
    from fcmae.pretrain import main as main_pretrain

    write_images(tmp_path / "data", 12)
    out = tmp_path / "out"
    cfg = main_pretrain.resolve_config(tiny_pretrain_args(tmp_path / "data", out, "--amp", "fp16"))
    assert main_pretrain.run(cfg) == 0
    losses = train_losses(out)
    assert len(losses) == 6 and all(loss == loss and abs(loss) < 1e4 for loss in losses), losses
    saved = load_checkpoint(out / "checkpoint-last.pth")
    assert saved.get("scaler") and saved["scaler"]["scale"] > 0, "fp16 runs through a GradScaler"


def _ddp_worker(rank: int, world_size: int, init_file: str):
    """One DDP process: its gradients must equal the mean of every process's local gradients."""
    import copy

    import torch.distributed as dist

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # same weights in every process
        model = build_fcmae("atto", img_size=64, mask_ratio=0.5, decoder_dim=16, depths=TINY_DEPTHS,
                            dims=TINY_DIMS).to(device).train()
        local = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(100 + rank)  # different data per process
        imgs = torch.randn(2, 3, 64, 64, generator=gen).to(device)
        mask = random_mask(2, 4, 2, seed=200 + rank).to(device)
        local(imgs, mask)[0].backward()
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
        ddp(imgs, mask)[0].backward()
        local_grads = torch.cat([p.grad.flatten() for p in local.parameters()])
        ddp_grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        every = [torch.empty_like(local_grads) for _ in range(world_size)]
        dist.all_gather(every, local_grads)
        assert_close(ddp_grads, torch.stack(every).mean(0), rel=1e-4)
        assert dist.get_backend() == "nccl"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.slow
def test_ddp_on_nccl_averages_gradients(tmp_path, world_size):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"DDP with {world_size} processes needs {world_size} CUDA devices, found "
                    f"{torch.cuda.device_count()}")
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(world_size, str(tmp_path / "store")), nprocs=world_size, join=True)
