"""cma_train.distributed: the process group's settings and the agreement that ends every rank's
set-up (gloo, 2 processes)."""
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cma_train.distributed import EveryRankOrNone, FailedElsewhere, init_distributed

GROUP_TIMEOUT_S = 60   # what a rank waiting for one that has gone would wait


@pytest.mark.parametrize("device, backend", [("auto", "nccl"), ("cuda", "nccl"), ("cpu", "gloo")])
def test_the_process_group_outlasts_a_hung_loader_on_the_backend_of_the_device(monkeypatch, device, backend):
    """A rank whose loader hangs says so after LOADER_TIMEOUT_S while the others wait in the step's
    collectives: the process group's timeout must be longer (NCCL's default, 10 minutes, is not).
    On a machine with GPUs, NCCL on this rank's GPU, set before the group opens; gloo for --device
    cpu (NCCL has no CPU collectives)."""
    from cma_model.data import LOADER_TIMEOUT_S
    opened, current = {}, []
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(opened))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: opened.update(kw, backend=backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    assert init_distributed(device) == (3, 4)
    assert opened["backend"] == backend and current == ([1] if backend == "nccl" else [])
    assert opened["timeout"].total_seconds() >= LOADER_TIMEOUT_S + 60


# each case: what every rank's set-up raises (None: it gets through), rank 0's then rank 1's
CASES = {"both ready": (None, None), "rank 1 fails": (None, "ValueError: no file x on this node"),
         "rank 0 fails": ("OSError: disk full", None),
         "the same error": ("ValueError: bad --lr", "ValueError: bad --lr"),
         "different errors": ("ValueError: a", "OSError: b")}


def _raise(said):
    if said is not None:
        kind, message = said.split(": ", 1)
        raise {"ValueError": ValueError, "OSError": OSError}[kind](message)


def _agreeing_worker(rank, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    outcomes = {}
    for case, errors in {**CASES, "at the block's end": (None, "ValueError: late")}.items():
        began = time.monotonic()
        try:
            with EveryRankOrNone(2) as start:
                _raise(errors[rank])
                outcome = ("ready", None if case == "at the block's end" else start.done({"rank": rank}))
        except FailedElsewhere as e:
            outcome = ("elsewhere", str(e))
        except (ValueError, OSError) as e:
            outcome = ("own", f"{type(e).__name__}: {e}")
        outcomes[case] = (*outcome, time.monotonic() - began)
    torch.save(outcomes, os.path.join(result_dir, f"agreed{rank}.pt"))
    dist.destroy_process_group()


def test_a_rank_whose_set_up_fails_stops_every_rank_at_once_each_cause_said_once(tmp_path):
    """EveryRankOrNone: the ranks that got through learn at once (not after the group's timeout) that
    another could not start, and raise FailedElsewhere naming it; of ranks failing with the same
    message only the lowest raises its own error (cma prints it; FailedElsewhere it does not)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_agreeing_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"agreed{rank}.pt") for rank in range(2))
    assert rank0["both ready"][:2] == rank1["both ready"][:2] == ("ready", [{"rank": 0}, {"rank": 1}])
    assert rank0["rank 1 fails"][:2] == ("elsewhere", "rank 1 failed: ValueError: no file x on this node")
    assert rank1["rank 1 fails"][:2] == ("own", "ValueError: no file x on this node")
    assert rank0["rank 0 fails"][:2] == ("own", "OSError: disk full")
    assert rank1["rank 0 fails"][:2] == ("elsewhere", "rank 0 failed: OSError: disk full")
    assert rank0["the same error"][:2] == ("own", "ValueError: bad --lr")
    assert rank1["the same error"][:2] == ("elsewhere", "rank 0 failed: ValueError: bad --lr")
    assert rank0["different errors"][:2] == ("own", "ValueError: a")
    assert rank1["different errors"][:2] == ("own", "OSError: b")
    assert rank0["at the block's end"][:2] == ("elsewhere", "rank 1 failed: ValueError: late")   # no done()
    assert rank1["at the block's end"][:2] == ("own", "ValueError: late")
    for outcomes in (rank0, rank1):
        assert max(took for _, _, took in outcomes.values()) < GROUP_TIMEOUT_S / 4


def test_one_process_has_nothing_to_agree_on():
    with EveryRankOrNone(1) as start:
        assert start.done("state") == ["state"]
    with pytest.raises(ValueError, match="its own"):
        with EveryRankOrNone(1):
            raise ValueError("its own")


@pytest.mark.parametrize("text, said", [
    ("NCCL error in: NCCLUtils.hpp:268, unhandled system error (run with NCCL_DEBUG=INFO for details), NCCL version "
     "2.21.5\nncclSystemError: System call (e.g. socket, malloc) or external library call failed or device error.\n"
     "Last error:\nError while creating shared memory segment /dev/shm/nccl-1YsMbG (size 7340384)", True),
    ("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error, NCCL version 2.21.5", False),
    ("unable to allocate shared memory(shm) for file </torch_1_2>", False),   # a loader worker's: loader_error's
])
def test_nccl_out_of_shared_memory_is_told_apart_from_other_errors(text, said):
    from cma_train.distributed import SHARED_MEMORY, nccl_shared_memory_error
    error = nccl_shared_memory_error(dist.DistBackendError(text))
    assert (error is not None) == said
    if said:
        assert f"in {SHARED_MEMORY} (" in str(error) and "--shm-size" in str(error)
