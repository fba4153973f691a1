"""torchrun for `cma train` and `cma eval`: the process group, each rank's device, and the phases
every rank gets through or none does.

A rank that fails alone before a collective (a file its node lacks, the run folder locked on rank
0, a full disk under rank 0's checkpoint) would leave the others waiting in that collective. On
one node torchrun stops them when it exits; across nodes it does not, and they wait for the process
group's timeout, 15 minutes. So such phases hold no collective and end in one agreement
(EveryRankOrNone): where any rank failed, every rank stops at once, each cause said once.
"""
import contextlib
import datetime
import os
import shutil

import torch
import torch.distributed as dist

from cma_model.data import LOADER_TIMEOUT_S, SHARED_MEMORY

# Under torchrun a rank whose loader hangs says so after LOADER_TIMEOUT_S; the others wait in the
# step's collectives meanwhile and must not time out first: NCCL's default timeout (10 minutes, the
# loader's too) would kill every rank with its watchdog's trace instead of that message.
PROCESS_GROUP_TIMEOUT_S = LOADER_TIMEOUT_S + 300


def init_distributed(device="auto"):
    """(rank, world size): torchrun's process group, opened once (NCCL where `device`, a
    TrainConfig.device, runs on CUDA, gloo on the CPU); (0, 1) outside torchrun. Each NCCL rank is
    put on its node's GPU LOCAL_RANK first, so that no collective ever runs on another rank's."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not dist.is_initialized():
            nccl = device != "cpu" and torch.cuda.is_available()
            if nccl:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
            dist.init_process_group("nccl" if nccl else "gloo",
                                    timeout=datetime.timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_device(device, rank):
    """The torch.device of this rank for a TrainConfig.device setting: the CPU, or its node's GPU
    LOCAL_RANK (made the current CUDA device)."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count()
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def nccl_shared_memory_error(error):
    """The ValueError saying what to do for NCCL's error (torch's DistBackendError, raised by the
    first collective) where it could not create its shared-memory segment in /dev/shm, through
    which the GPUs of a node talk: a container's 64 MiB default is too little for several GPUs.
    None for any other error."""
    if "NCCL" not in str(error) or "shared memory segment" not in str(error):
        return None
    size = shutil.disk_usage(SHARED_MEMORY).total / 2**20 if os.path.isdir(SHARED_MEMORY) else 0
    return ValueError(f"NCCL could not create its shared memory in {SHARED_MEMORY} ({size:,.0f} MiB here), which the "
                      f"GPUs of a node talk through: raise it (a container: docker run --shm-size 8g, or --ipc host), "
                      f"or set NCCL_SHM_DISABLE=1 (slower)")


class FailedElsewhere(RuntimeError):
    """Raised on a rank that could go on where another could not: that rank raises its own error,
    which says what failed (`cma` prints nothing more for this one)."""


FAILED = 256   # above every signal number: agree_after_step's word for "a rank failed"


def agree_after_step(device, world, signum=0, failed=None, save=False):
    """The training step's one agreement, the same on every rank: (the signal number any rank
    received, else 0; whether any rank asks for a checkpoint now), from this rank's `signum` and
    `save`. Where a rank passes `failed` (what it could not do after the step: rank 0's metrics.jsonl
    line), every rank stops instead: that rank raises `failed`, the others FailedElsewhere. One
    all-reduce of two numbers (none in one process)."""
    if world == 1:
        if failed is not None:
            raise failed
        return signum, save
    flags = torch.tensor([FAILED if failed is not None else signum, int(save)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    code, save = flags.tolist()
    if code == FAILED:
        if failed is not None:
            raise failed
        raise FailedElsewhere("another process failed after this step (its own error says why)")
    return code, bool(save)


class EveryRankOrNone(contextlib.AbstractContextManager):
    """A phase that holds no collective (a run's set-up; a file rank 0 writes), ended by one
    agreement of every rank: at the end of the `with` block, or earlier at `done()`. A rank whose
    phase raises joins it from __exit__, so the ranks learn of it at once: every rank then stops,
    the failed ones with their own error (or FailedElsewhere where a lower rank failed with the same
    message: each cause is said once), the others with FailedElsewhere. One process (world 1):
    nothing to agree on."""

    def __init__(self, world):
        self.world, self.agreed = world, False

    def done(self, state=None):
        """This rank got through (the rest of the `with` block is past the agreement): [every rank's
        `state`] (for the caller to compare), or FailedElsewhere where another rank did not."""
        return self._agree(None, state)

    def __exit__(self, kind, error, traceback):
        if self.agreed or not (error is None or isinstance(error, Exception)):
            return   # a KeyboardInterrupt ends the process as it is
        self._agree(error, None)   # raises FailedElsewhere where another rank failed (and not this one first)

    def _agree(self, error, state):
        self.agreed = True
        if self.world == 1:
            return [state]
        said = [None] * self.world
        dist.all_gather_object(said, (None if error is None else f"{type(error).__name__}: {error}", state))
        failures = [(rank, message) for rank, (message, _) in enumerate(said) if message is not None]
        mine = dist.get_rank()
        if error is not None and next(rank for rank, message in failures if message == said[mine][0]) == mine:
            return None   # this rank's error goes on, the first of its kind
        if failures:
            rank, message = failures[0]
            raise FailedElsewhere(f"rank {rank} failed: {message}") from error
        return [s for _, s in said]
