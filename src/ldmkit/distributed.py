"""Process groups and collectives: a leaf every layer may use (training, encoding, evaluation).

`torchrun` sets RANK/WORLD_SIZE/LOCAL_RANK; the process group is NCCL on GPUs and gloo on the CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    cpu_group: object = None  # a gloo group for host-side agreement (stop signals); None: the default group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(
    device_pref: str = "auto",
    process_group: bool = True,
    timeout_s: float = 600,
    setting: str = "config key 'train.device'",
) -> Dist:
    """This process's rank and device from torchrun's variables; with process_group, also join the group
    (training). `ldmkit encode` needs none: its processes share only the file system. A collective that waits
    longer than timeout_s for another process (frozen or dead) raises instead of hanging."""
    cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}: 'cuda', but no GPU is visible here (use auto or cpu)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda and local >= torch.cuda.device_count():
        raise ConfigError(
            f"process {rank} has LOCAL_RANK {local}, but only {torch.cuda.device_count()} GPU(s) are visible"
        )
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    cpu_group = None
    if process_group and world > 1:
        timeout = datetime.timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, **restart_store(timeout))
        if dist.get_backend() != "gloo":
            cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    return Dist(rank, world, local, device, cpu_group)


def restart_store(timeout: datetime.timedelta) -> dict:
    """Under torchrun --max-restarts, a store whose keys belong to this attempt: a restarted process group would
    otherwise read the previous attempt's addresses from torchrun's store and connect to processes that are gone."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart == "0":
        return {}
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    return {"store": dist.PrefixStore(f"ldmkit/attempt_{restart}", store), "rank": rank, "world_size": world}


def pick_device(device_pref: str = "auto", setting: str = "--device") -> torch.device:
    """The device to sample or evaluate on (auto: this process's GPU when there is one), with no process group."""
    return init_distributed(device_pref, process_group=False, setting=setting).device


class LostProcess(ValueError):
    """A collective failed or timed out: another process froze or died (one line, exit code 2)."""


LOST_PEER_MESSAGES = ("timed out", "connection reset", "connection closed", "broken pipe")


@contextlib.contextmanager
def lost_process_errors(d: "Dist | None", timeout_s: float):
    """Turn a failed or timed-out collective of a multi-process run into one line that says what happened."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        message = str(e).lower()
        lost = isinstance(e, dist.DistError) or any(m in message for m in LOST_PEER_MESSAGES)
        if d is None or d.world_size == 1 or not lost:
            raise
        detail = " ".join(str(e).split())[:200]
        raise LostProcess(
            f"process {d.rank}: a collective with the other processes failed or waited longer than "
            f"train.dist_timeout_s ({timeout_s:g} s); another process froze or died ({detail})"
        ) from None


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world_size
    return x


def all_reduce_max(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


def gather_to_main(rows: torch.Tensor, indices: list[int], d: Dist) -> torch.Tensor | None:
    """Each process's rows (row k is item indices[k]) -> all items in index order on process 0; None elsewhere."""
    if d.world_size == 1:
        return rows
    parts = [None] * d.world_size if d.is_main else None
    dist.gather_object((rows, indices), parts, dst=0, group=d.cpu_group)
    if not d.is_main:
        return None
    out = torch.empty(sum(len(i) for _, i in parts), *rows.shape[1:], dtype=rows.dtype)
    for part, where in parts:
        out[where] = part
    return out


def shut_down() -> None:
    """End this process's part in a process group cleanly (once its command succeeded): wait for the others, so
    that none exits while another still talks to it, then leave the group."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
