"""torch.distributed set-up shared by the training commands.

One process per GPU (or one or more CPU processes with gloo). The process
group is initialised from the environment that the launcher leaves:

- torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- SLURM (srun, one task per GPU): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
  with MASTER_ADDR/MASTER_PORT exported by fcmae.runtime.launch.launcher (or the first
  host of SLURM_JOB_NODELIST and port 29500 when unset). Only inside an srun
  step (or with the launcher's FCMAE_SLURM_RANKS=1): the batch shell of
  `sbatch --ntasks-per-node 8` has SLURM_PROCID=0 and SLURM_NTASKS=8 too, and
  a plain `python -m ...` there is one process (fcmae.runtime.launch.slurm);
- neither: a single process, no process group.

NCCL is used on CUDA devices, gloo on CPU. A collective that waits longer
than the process group's timeout fails instead of hanging: 30 minutes by
default, `FCMAE_DIST_TIMEOUT` seconds when that is set (tests use a few
seconds).

Decisions that every rank must share are made once and agreed on:
`broadcast_object` (rank 0 decides, e.g. the checkpoint to resume) and
`first_error` (an error that some ranks met is raised on all of them).
"""

import datetime
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist

from fcmae.runtime.errors import ConfigError, DeviceError
from fcmae.runtime.launch import slurm


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None  # None when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank_info(env: Optional[Mapping[str, str]] = None) -> Dict[str, int]:
    """rank, world_size and local_rank from torchrun's or SLURM's variables (defaults 0, 1, 0)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return {
            "rank": int(env["RANK"]),
            "world_size": int(env["WORLD_SIZE"]),
            "local_rank": int(env.get("LOCAL_RANK", 0)),
        }
    if slurm.rank_variables_apply(env):
        tasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
        if tasks <= 1:
            return {"rank": 0, "world_size": 1, "local_rank": 0}
        return {
            "rank": int(env["SLURM_PROCID"]),
            "world_size": tasks,
            "local_rank": int(env.get("SLURM_LOCALID", 0)),
        }
    return {"rank": 0, "world_size": 1, "local_rank": 0}


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when CUDA is available, else cpu; 'cuda' -> cuda:<local_rank>.

    A clear error when CUDA is requested but unavailable.
    """
    name = str(name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} was requested but CUDA is not available; use --device cpu")
        if name == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


TIMEOUT_VARIABLE = "FCMAE_DIST_TIMEOUT"
DEFAULT_TIMEOUT_MINUTES = 30


def process_group_timeout() -> datetime.timedelta:
    """How long a collective may wait: `FCMAE_DIST_TIMEOUT` seconds when set, else `DEFAULT_TIMEOUT_MINUTES`."""
    value = os.environ.get(TIMEOUT_VARIABLE, "")
    if value == "":
        return datetime.timedelta(minutes=DEFAULT_TIMEOUT_MINUTES)
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_VARIABLE} must be a positive number of seconds, got {value!r}")
    return datetime.timedelta(seconds=seconds)


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the default process group from the environment (if several processes).

    Returns a `DistInfo`; on CUDA, also selects this process's GPU. Collectives
    time out after `process_group_timeout()` (30 minutes, or FCMAE_DIST_TIMEOUT seconds).
    """
    info = env_rank_info()
    dev = resolve_device(device, info["local_rank"])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if info["world_size"] <= 1:
        return DistInfo(0, 1, 0, dev, None)
    if "RANK" not in os.environ:  # SLURM's variables: export torch's for init_method="env://"
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = slurm.master_addr(os.environ)
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(info["rank"]), str(info["world_size"])
        os.environ["LOCAL_RANK"] = str(info["local_rank"])
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=info["rank"],
            world_size=info["world_size"],
            timeout=process_group_timeout(),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(info["rank"], info["world_size"], info["local_rank"], dev, backend)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def _all_reduce(value: Union[float, torch.Tensor], op, device: Optional[torch.device]) -> torch.Tensor:
    """`value` as a tensor (float64 for a number), reduced with `op` over all processes on `device`."""
    t = value.detach().clone().float() if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64)
    if device is not None:
        t = t.to(device)
    elif dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return t


def all_reduce_mean(value: Union[float, torch.Tensor], device: Optional[torch.device] = None):
    """Mean of a number or tensor over all processes (the value itself when single-process)."""
    if not is_dist():
        return value
    t = _all_reduce(value, dist.ReduceOp.SUM, device) / get_world_size()
    return t if torch.is_tensor(value) else float(t.item())


def all_reduce_max(value: Union[float, torch.Tensor], device: Optional[torch.device] = None):
    """Maximum of a number or tensor over all processes (e.g. to agree on stop flags)."""
    if not is_dist():
        return value
    t = _all_reduce(value, dist.ReduceOp.MAX, device)
    return t if torch.is_tensor(value) else float(t.item())


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank `src`'s `value` (any picklable object) on every rank; `value` itself when single-process."""
    if not is_dist():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(value: Any) -> List[Any]:
    """Every rank's `value`, in rank order (`[value]` when single-process)."""
    if not is_dist():
        return [value]
    values: List[Any] = [None] * get_world_size()
    dist.all_gather_object(values, value)
    return values


def first_error(error: Optional[BaseException]) -> Optional[Tuple[int, BaseException]]:
    """(rank, error) of the lowest rank that met an error, the same on every rank; None when none did.

    Every rank must call it (it is a collective); pass None when this rank is fine.
    """
    for rank, found in enumerate(all_gather_object(error)):
        if found is not None:
            return rank, found
    return None


def raise_first_error(error: Optional[BaseException]) -> None:
    """Raise on every rank the error of the lowest rank that met one (its message prefixed with that rank when
    several run); nothing when none did. A collective like `first_error`: a rank that fails alone in a loop over
    its shard calls it instead of raising, so that the others do not wait for it in their next collective. The
    error's type must take its message as its one argument."""
    found = first_error(error)
    if found is not None:
        rank, found_error = found
        agreed = type(found_error)(f"rank {rank}: {found_error}") if get_world_size() > 1 else found_error
        agreed.raised_on_every_rank = True  # the Trainer may then save on every rank before it leaves
        raise agreed


# What gloo, NCCL and the rendezvous store say when a peer is gone, and the reason `lost_contact` gives.
_LOST_CONTACT = (
    (re.compile(r"connection reset by peer", re.I), "connection reset by peer"),
    (re.compile(r"connection closed by peer", re.I), "connection closed by peer"),
    (re.compile(r"broken pipe", re.I), "broken pipe"),
    (re.compile(r"connection refused", re.I), "connection refused"),
    (re.compile(r"timed out waiting (\d+)ms", re.I), "no answer within {0} ms"),
    (re.compile(r"remote process exited or there was a network error", re.I),
     "NCCL: a remote process exited or the network failed"),
    (re.compile(r"NCCL communicator was aborted", re.I), "NCCL: the communicator was aborted"),
)


def lost_contact(error: BaseException) -> Optional[str]:
    """Why `error` (or an exception it chains) says that another rank is gone, in a few words; None otherwise.

    A rank that died (killed, crashed, its node lost) breaks its peers' next collective: gloo raises a
    RuntimeError ("Connection reset by peer", "Timed out waiting ...ms"), NCCL a DistBackendError, the store a
    DistNetworkError. Training commands turn these into one line (fcmae.runtime.command.TrainSpec.run).
    """
    seen: Optional[BaseException] = error
    while seen is not None:
        if isinstance(seen, RuntimeError):
            text = str(seen)
            for pattern, reason in _LOST_CONTACT:
                found = pattern.search(text)
                if found:
                    return reason.format(*found.groups())
            if isinstance(seen, dist.DistNetworkError):
                return "network error: " + text.strip().splitlines()[0][:200] if text.strip() else "network error"
        seen = seen.__cause__ or seen.__context__
    return None


def cleanup() -> None:
    """Destroy the process group if one was created, unless an error is on its way out.

    When every rank stops on the same agreed error, the ranks leave their last
    collective at slightly different moments; destroying the group then races
    the peers' closing connections, and gloo can abort the process (SIGABRT,
    "terminate called without an active exception") instead of letting it
    exit with the error's code. The process exits right after, which frees
    the group anyway.
    """
    if is_dist() and sys.exc_info()[1] is None:
        dist.destroy_process_group()
