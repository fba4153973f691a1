"""cma_train.step: the training step over the global batch (one process or gloo ranks), gradient
caching (--micro-batch), and --micro-batch under CUDA graphs."""
import contextlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import gpu_check, requires_cuda, tiny_train_model

from cma_model.losses import infonce, similarity
from cma_model.retrieval import RetrievalForward, encode_text
from cma_train.config import TrainConfig
from cma_train.step import train_step, uneven_chunks_recompile

GLOBAL, WORLD = 6, 2


def _batch():
    g = torch.Generator().manual_seed(7)
    mask = torch.ones(GLOBAL, 4, dtype=torch.bool)
    mask[1, 2:] = False
    mask[4, 1:] = False
    return {"frames": torch.randn(GLOBAL, 4, 3, 32, 32, generator=g), "mask": mask,
            "tokens": torch.randint(1, 49000, (GLOBAL, 16), generator=g)}


def _model(device="cpu"):
    return tiny_train_model(device, pooling="softmax", max_words=12)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _ddp_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    model, cfg = _model()
    forward = RetrievalForward(model)
    local = GLOBAL // WORLD
    batch = {k: v[rank * local:(rank + 1) * local] for k, v in _batch().items()}
    loss = train_step(forward, model.logit_scale, batch, cfg, torch.device("cpu"))
    grads = _grads(model)
    model.zero_grad(set_to_none=True)
    cfg.micro_batch = 2   # chunks of 2 + 1 on each rank, the gradients summed over ranks after the last one
    micro_loss = train_step(forward, model.logit_scale, batch, cfg, torch.device("cpu"))
    torch.save({"loss": loss, "grads": grads, "micro_loss": micro_loss, "micro_grads": _grads(model)},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_give_the_gradients_of_one_process_on_the_global_batch(tmp_path):
    """train_step on 2 gloo ranks with 3 of the 6 videos each, whole and in micro-batches: on every
    rank the loss and the adapter gradients of one process on all 6 (fp32, 1e-4)."""
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    model, cfg = _model()
    loss = train_step(RetrievalForward(model), model.logit_scale, _batch(), cfg, torch.device("cpu"))
    single = _grads(model)
    # and the loss really is the global-batch loss, written out independently
    with torch.no_grad():
        b = _batch()
        frames = torch.zeros(GLOBAL, 4, 32)
        frames[b["mask"]] = model.encode_image(b["frames"][b["mask"]])
        direct = infonce(similarity(encode_text(model, b["tokens"]), frames, b["mask"], "softmax"), model.logit_scale)
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
        assert got["grads"].keys() == single.keys() == got["micro_grads"].keys()
        assert got["micro_loss"].item() == pytest.approx(loss.item(), rel=1e-5)
        for n in single:
            torch.testing.assert_close(got["grads"][n], single[n], rtol=1e-4, atol=1e-6, msg=n)
            torch.testing.assert_close(got["micro_grads"][n], single[n], rtol=1e-4, atol=1e-6, msg=n)


class _PeakSaved:
    """Peak bytes of activations autograd keeps alive at once (saved-tensor hooks; a kept tensor is
    released when its graph is freed). Tensors that share storage with the model's parameters (the
    frozen weights, saved for backward as they are or as transposed views) do not count."""

    def __init__(self, model):
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.live = self.peak = 0

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda held: held.tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    def _pack(self, tensor):
        tracker = self
        weight = tensor.untyped_storage().data_ptr() in self.weights
        size = 0 if weight else tensor.numel() * tensor.element_size()

        class Held:
            def __init__(self):
                self.tensor = tensor
                tracker.live += size
                tracker.peak = max(tracker.peak, tracker.live)

            def __del__(self):
                tracker.live -= size
        return Held()


@pytest.mark.parametrize("micro_batch", [1, 2, 4])
def test_micro_batches_give_the_whole_batch_loss_and_gradients(micro_batch):
    """Gradient caching: chunks of 1, 2 or 4 of the 6 videos (4 leaves an uneven last chunk) give
    the whole batch's loss and adapter gradients (fp32, 1e-5), while autograd keeps the
    activations of one chunk at a time."""
    model, cfg = _model()
    with _PeakSaved(model) as whole:
        loss = train_step(RetrievalForward(model), model.logit_scale, _batch(), cfg, torch.device("cpu"))
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    cfg.micro_batch = micro_batch
    with _PeakSaved(model) as chunked:
        got_loss = train_step(RetrievalForward(model), model.logit_scale, _batch(), cfg, torch.device("cpu"))
    assert got_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    got = _grads(model)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)
    assert chunked.peak < (micro_batch / GLOBAL + 0.15) * whole.peak, (chunked.peak, whole.peak)


@gpu_check
@requires_cuda
def test_micro_batches_under_cuda_graphs_give_the_whole_batch_gradients():
    """--micro-batch 2 (3 chunks) with --compile reduce-overhead: on the step that replays the
    recorded CUDA graphs (the third: warm-up, recording, replay), the adapter gradients are those
    of the eager whole batch within 0.15 of each gradient's norm. Autograd keeps the first chunk's
    gradients in the graphs' output buffers unless the trainer copies them out; the next replay
    would then overwrite them: an error, or sums off by 0.7 of the norm or more (this model and
    batch on the CPU, chunk 0's gradients replaced by chunk 1's), where bf16 autocast against fp32
    differs by at most 0.04 (CPU). Compiling takes a while: gpu_check.sh runs this
    (`-k micro_batches_under_cuda_graphs`) in its compiled section, after the quick tests."""
    from torch._dynamo.utils import counters
    from cma_model.retrieval import compile_towers
    device = torch.device("cuda")
    batch = {k: v.to(device) for k, v in _batch().items()}
    eager, cfg = _model(device)
    train_step(RetrievalForward(eager), eager.logit_scale, batch, cfg, device)
    want = _grads(eager)
    model, cfg = _model(device)
    compile_towers(model, "reduce-overhead")
    cfg.micro_batch = 2
    counters.clear()
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        train_step(RetrievalForward(model), model.logit_scale, batch, cfg, device)
    assert counters["inductor"]["cudagraph_skips"] == 0, "the towers did not run as CUDA graphs"
    got = _grads(model)
    assert got.keys() == want.keys()
    for n in want:
        err = ((got[n] - want[n]).norm() / want[n].norm()).item()
        assert err <= 0.15, (n, err)


@pytest.mark.parametrize("compile_mode,micro,local,expected", [
    ("default", 3, 8, True), ("default", 4, 8, False), ("", 3, 8, False), ("default", 0, 8, False),
    ("reduce-overhead", 16, 8, False)])
def test_uneven_micro_batches_under_compile_are_pointed_out(compile_mode, micro, local, expected):
    cfg = TrainConfig(pretrained="none", compile=compile_mode, micro_batch=micro)
    assert uneven_chunks_recompile(cfg, local) is expected


@pytest.mark.parametrize("micro_batch", [0, 2])
def test_fp16_steps_scale_the_loss_and_unscaled_give_the_fp32_gradients(micro_batch):
    """--precision fp16 with a GradScaler, whole and in micro-batches: the adapter gradients come
    back multiplied by the loss scale (2^10), and divided by it they are fp32's within fp16 noise
    (2e-2 of each gradient's norm); the loss is fp32's within 1e-2."""
    model, cfg = _model()
    loss = train_step(RetrievalForward(model), model.logit_scale, _batch(), cfg, torch.device("cpu"))
    want = _grads(model)
    model.zero_grad(set_to_none=True)
    cfg.precision, cfg.micro_batch = "fp16", micro_batch
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    got_loss = train_step(RetrievalForward(model), model.logit_scale, _batch(), cfg, torch.device("cpu"), scaler=scaler)
    assert got_loss.item() == pytest.approx(loss.item(), rel=1e-2) and got_loss.item() != loss.item()
    got = _grads(model)
    for n in want:
        error = (got[n] / 2.0 ** 10 - want[n]).norm() / want[n].norm()
        assert error < 2e-2, (n, error.item())


@pytest.mark.parametrize("this_rank, others, raised", [
    ("gets through", "got through", None), ("gets through", "ran out", "OutOfMemoryElsewhere"),
    ("gets through", "left", "FailedElsewhere"), ("runs out", "got through", "its own OutOfMemoryError"),
    ("runs out", "ran out", "its own OutOfMemoryError"), ("runs out", "left", "FailedElsewhere")])
def test_what_the_ranks_tell_each_other_after_a_phase_of_the_step(monkeypatch, this_rank, others, raised):
    """_every_rank_fits' agreement (the MAX over the ranks of what each tells): where one rank ran
    out of memory, every rank raises an OutOfMemoryError and all redo the step; where another left
    before the step (batches_for_steps), this one stops (FailedElsewhere), even when it ran out of
    memory itself, since no rank will redo the step."""
    from cma_train.step import LEAVING, RAN_OUT, _every_rank_fits
    told_by_others = {"got through": 0, "ran out": RAN_OUT, "left": LEAVING}[others]
    monkeypatch.setattr(dist, "all_reduce", lambda t, op: t.fill_(max(int(t), told_by_others)))
    own = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
    with pytest.raises(Exception) if raised else contextlib.nullcontext() as error:
        with _every_rank_fits(torch.device("cpu"), world=2):
            if this_rank == "runs out":
                raise own
    if raised:
        assert (error.value is own) if raised.startswith("its own") else type(error.value).__name__ == raised
