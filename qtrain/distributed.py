"""DDP plumbing for `torchrun --nproc_per_node N -m qtrain ...` (gloo on CPU, nccl on CUDA).

Rank 0 alone prints, writes metrics and publishes checkpoints; every rank shares one run
directory, chosen by rank 0 and broadcast before Hydra creates it.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist


def _export_slurm_env() -> None:
    """Under a SLURM job with several tasks (Hydra's submitit launcher, `tasks_per_node`),
    export the torchrun-style variables from SLURM's, via submitit's own helper."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:  # not under submitit: leave the job single-process
        return
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def env_world_size() -> int:
    """WORLD_SIZE set by torchrun or exported from SLURM (1 otherwise)."""
    _export_slurm_env()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(device: str) -> None:
    """Join the torchrun process group (idempotent); nccl when running on CUDA, else gloo."""
    if env_world_size() <= 1 or dist.is_initialized():
        return
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")


def shared_run_dir(argv: list[str]) -> list[str]:
    """Add `hydra.run.dir=...` chosen by rank 0 so every rank writes to one run directory."""
    if not is_distributed() or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    chosen = [time.strftime("outputs/%Y-%m-%d/%H-%M-%S")]
    dist.broadcast_object_list(chosen, src=0)
    return [*argv, f"hydra.run.dir={chosen[0]}"]


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (a collective call)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return bool(t.item() > 0)


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        dist.barrier()


def finish() -> None:
    """Leave the process group."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
