"""One training step over the global batch, in one process or across torchrun's ranks.

Every rank all-gathers the features, computes the loss of the whole global batch, and
back-propagates through its own part; one all-reduce then sums the adapter gradients over the ranks,
which gives exactly the gradient of the global-batch loss (the same as one process on the same
batch). The all-reduce follows the backward instead of overlapping it (DistributedDataParallel's
buckets): the adapters' gradients are a few MB, and a step whose collectives all lie outside forward
and backward lets the ranks agree to redo it with half the videos per pass when one of them runs out
of GPU memory (step_within_memory; DEVELOPERS.md, "The training step under torchrun").

--micro-batch trades one more forward pass per step for the activations of fewer videos alive at a
time (gradient caching), with the same loss and gradients.
"""
import contextlib
import itertools
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

from cma_model.cuda_graphs import recording, release_graphs
from cma_model.losses import infonce, similarity
from cma_model.retrieval import gather_with_grad
from cma_train.backbone import autocast_dtype
from cma_train.distributed import FailedElsewhere


def train_step(forward, logit_scale, batch, cfg, device, to_input=None, scaler=None):
    """Loss of the global batch (features gathered across ranks), back-propagated, the adapter
    gradients summed over ranks; returns the loss. forward: a RetrievalForward; to_input(frames,
    device): the loader's frames -> model input on the device (VideoFrames.to_model_input: raw
    uint8 frames are normalised there); default: moved as they are. The towers run under autocast
    to cfg.precision's dtype; scaler: a torch.amp.GradScaler (--precision fp16) that scales the
    loss before backward (the gradients stay scaled: the caller unscales them).

    cfg.micro_batch < the local batch: the same loss and gradients with the activations of only
    micro_batch videos alive at a time (gradient caching): embed the whole batch in chunks without
    autograd, take the loss and its gradient with respect to the embeddings, then run each chunk
    again with autograd and back-propagate that gradient. One more forward pass per step.

    Out of GPU memory on any rank: torch.OutOfMemoryError on every rank, after the same phase.
    A batch without "frames" (none of its videos could be read): this rank takes part with no
    videos; returns None, and back-propagates nothing, where no rank had one."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    if "frames" not in batch:
        return _step_without_videos(forward, logit_scale, cfg, device, world)
    to_input = to_input or (lambda frames, device: frames.to(device))
    mask, tokens = batch["mask"].to(device, non_blocking=True), batch["tokens"].to(device, non_blocking=True)
    dtype = autocast_dtype(cfg.precision, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    chunk = cfg.micro_batch or len(tokens)
    if chunk >= len(tokens):
        with _every_rank_fits(device, world), autocast:
            frame_feats, text_feats = forward(to_input(batch["frames"], device), mask, tokens)
        loss = _global_loss(frame_feats.float(), text_feats.float(), mask, logit_scale, cfg)
        with _every_rank_fits(device, world):
            scale(loss).backward()
        _sum_grads_over_ranks(forward, world)
        return loss.detach()
    frames = batch["frames"].to(device, non_blocking=True)   # as loaded (uint8): normalised a chunk at a time
    chunks = list(zip(frames.split(chunk), mask.split(chunk), tokens.split(chunk)))
    with _every_rank_fits(device, world), torch.no_grad(), autocast:
        feats = [forward(to_input(f, device), m, t) for f, m, t in chunks]
    frame_feats = torch.cat([f for f, _ in feats]).float().requires_grad_()   # [B_local, T, E]
    text_feats = torch.cat([t for _, t in feats]).float().requires_grad_()    # [B_local, E]
    loss = _global_loss(frame_feats, text_feats, mask, logit_scale, cfg)
    with _every_rank_fits(device, world):
        scale(loss).backward()   # gradients of the embeddings only
        grads = zip(frame_feats.grad.split(chunk), text_feats.grad.split(chunk))
        for i, ((f, m, t), (frame_grad, text_grad)) in enumerate(zip(chunks, grads)):
            with autocast:
                chunk_frame_feats, chunk_text_feats = forward(to_input(f, device), m, t)
            torch.autograd.backward([chunk_frame_feats.float(), chunk_text_feats.float()], [frame_grad, text_grad])
            if i == 0:
                _own_grads(forward)
    _sum_grads_over_ranks(forward, world)
    return loss.detach()


def record_cuda_graphs(forward, cfg, device, frames, words, local_batch):
    """Record the towers' CUDA graphs (cma_model.cuda_graphs.graph_towers first) for every shape
    train_step calls them with: the local batch, or its micro-batch chunks (the last one may be
    smaller), these both without gradients (the pass that embeds the whole batch) and with. Runs
    the towers on blank frames of `frames` (the run's VideoFrames) and `words` tokens per caption,
    under the step's autocast, before the loader starts: a recording breaks where another thread
    uses CUDA. Leaves no gradients. Returns the chunk sizes recorded."""
    chunk = min(cfg.micro_batch or local_batch, local_batch)
    sizes = sorted({chunk, local_batch % chunk} - {0}, reverse=True)   # train_step's order: whole chunks first
    passes = [False, True] if chunk < local_batch else [True]   # gradients off, then on: train_step's order
    dtype = autocast_dtype(cfg.precision, device)
    forward.train()
    with recording(forward.model), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for grad, n in itertools.product(passes, sizes):
            blank, mask = frames.example_batch(n)
            tokens = torch.zeros(n, words, dtype=torch.long, device=device)
            try:
                with torch.set_grad_enabled(grad):
                    forward(frames.to_model_input(blank, device), mask.to(device), tokens)
            except torch.OutOfMemoryError as e:
                raise torch.OutOfMemoryError(f"out of GPU memory recording the towers' CUDA graphs for {n} videos per "
                                             f"pass: pass a smaller --micro-batch, or leave out --cuda-graphs") from e
            except RuntimeError as e:   # e.g. an operation a recording does not allow
                raise RuntimeError(f"recording the towers' CUDA graphs for {n} videos per pass failed: {e}\n"
                                   f"train without --cuda-graphs (and please report it)") from e
    return sizes


def _step_without_videos(forward, logit_scale, cfg, device, world):
    """train_step of a rank none of whose videos could be read: it joins the step's collectives
    with an empty share, so the other ranks get the loss and gradients of the global batch without
    it, and the run goes on (a rank that stopped would stop them all, and a resumed run would stop
    at the same batch again). None where no rank had a video."""
    with _every_rank_fits(device, world):
        pass   # a forward of no videos
    frame_feats = torch.zeros(0, cfg.max_frames, forward.embed_dim, device=device, requires_grad=True)
    text_feats = torch.zeros(0, forward.embed_dim, device=device, requires_grad=True)
    mask = torch.zeros(0, cfg.max_frames, dtype=torch.bool, device=device)
    loss = _global_loss(frame_feats, text_feats, mask, logit_scale, cfg)
    if loss is None:
        return None
    with _every_rank_fits(device, world):
        loss.backward()   # reaches no parameter: the gradient sum gets zeros from this rank
    _sum_grads_over_ranks(forward, world)
    return loss.detach()


class OutOfMemoryElsewhere(torch.OutOfMemoryError):
    """Raised on the ranks that had the memory for a phase of the step where another ran out (that
    rank raises its own error, which says what failed)."""


RAN_OUT, LEAVING = 1, 2   # what a rank tells the others in _every_rank_fits' agreement (0: it got through)


@contextlib.contextmanager
def _every_rank_fits(device, world):
    """Run a phase of the step that holds no collective. Under torch.distributed the ranks then
    agree whether each had the memory for it: where one ran out, every rank raises
    torch.OutOfMemoryError (its own, or OutOfMemoryElsewhere), so that all redo the step together
    (step_within_memory) instead of the others waiting for that rank in the step's next collective.
    Where a rank left before the step (batches_for_steps), every rank raises FailedElsewhere."""
    if world == 1:
        yield
        return
    told = torch.zeros((), dtype=torch.int32, device=device)   # allocated before the phase's memory
    try:
        yield
    except torch.OutOfMemoryError:
        told.fill_(RAN_OUT)
        dist.all_reduce(told, op=dist.ReduceOp.MAX)   # tell the others
        if told.item() != LEAVING:
            raise   # this rank's own error: every rank redoes the step
    else:
        dist.all_reduce(told, op=dist.ReduceOp.MAX)
    told = told.item()   # one read from the device
    if told == LEAVING:
        raise FailedElsewhere("another process stopped before this step (its own error says why)")
    if told == RAN_OUT:
        raise OutOfMemoryElsewhere("another process ran out of GPU memory in this step")


def batches_for_steps(batches, device, world):
    """The batches of a `batches` iterator, one per step. A rank that cannot get its next batch (a
    loader worker died, or hung for LOADER_TIMEOUT_S) says so to the others in the step's first
    agreement (_every_rank_fits, which every step starts with), then raises its own error: the
    others stop at once with FailedElsewhere instead of waiting for it in that step (across nodes,
    until the process group's timeout)."""
    batches = iter(batches)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception:
            if world > 1:
                leaving = torch.full((), LEAVING, dtype=torch.int32, device=device)
                dist.all_reduce(leaving, op=dist.ReduceOp.MAX)
            raise
        yield batch


def _sum_grads_over_ranks(module, world):
    """Sum the trainable parameters' gradients over the ranks, all of them in one all-reduce."""
    if world == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    for p, summed in zip(params, flat.split([p.numel() for p in params])):
        p.grad = summed.view_as(p)


def step_within_memory(forward, logit_scale, batch, cfg, device, to_input, world, scaler=None):
    """train_step; where a process runs out of GPU memory, the same step again with half the
    videos per pass (cfg.micro_batch, down to 1) on every rank, said in a note: gradient caching
    gives the same gradients, so the run is the one it would have been. With dropout (a second
    forward draws new masks) the error stands."""
    while True:
        try:
            return train_step(forward, logit_scale, batch, cfg, device, to_input, scaler)
        except torch.OutOfMemoryError:
            per_pass = cfg.micro_batch or cfg.batch_size // world   # the same on every rank
            if cfg.dropout > 0 or per_pass <= 1:
                raise
        # here, past the except block, the failed step's tensors are free (its traceback held them)
        forward.zero_grad(set_to_none=True)   # what the failed step's backward had added
        graphs = release_graphs(forward.model)   # and the memory the towers' CUDA graphs held, if any
        torch.cuda.empty_cache()
        cfg.micro_batch = per_pass // 2   # the checkpoint keeps it: a resumed run starts there
        if world == 1 or dist.get_rank() == 0:
            who = "" if world == 1 else " in one of the processes"
            released = " without CUDA graphs from here (they held memory)" if graphs else ""
            tqdm.write(f"note: out of GPU memory{who} with {per_pass} videos per pass; retrying the step with "
                       f"--micro-batch {cfg.micro_batch}{released} (the same gradients, one more forward pass per "
                       f"step; pass it to start there)", file=sys.stderr)


def _own_grads(module):
    """Give each parameter's .grad storage of its own. Autograd keeps a parameter's first gradient
    as it arrives, without a copy; under CUDA graphs (--compile reduce-overhead or max-autotune)
    that is an output buffer of the backward graph, which the next chunk's replay overwrites before
    autograd adds that chunk's gradient to it (pytorch/pytorch#169545: an error or wrong sums).
    One copy of the trainable parameters' gradients per step, with --micro-batch only."""
    for p in module.parameters():
        if p.grad is not None:
            p.grad = p.grad.clone()


def uneven_chunks_recompile(cfg, local_batch):
    """Whether --micro-batch splits each process's batch into chunks of two sizes under --compile
    (the smaller last chunk is a new shape: one more compilation of the towers)."""
    return bool(cfg.compile) and 0 < cfg.micro_batch < local_batch and local_batch % cfg.micro_batch != 0


def _global_loss(frame_feats, text_feats, mask, logit_scale, cfg):
    """InfoNCE over the global batch: this rank's features [B_local, T, E], [B_local, E] and frame
    mask [B_local, T] gathered from every rank, autograd through this rank's part. None where the
    global batch is empty (no rank had a readable video)."""
    frame_feats, text_feats = gather_with_grad(frame_feats), gather_with_grad(text_feats)
    mask_all = gather_with_grad(mask.to(torch.uint8)).bool()
    if len(text_feats) == 0:
        return None
    return infonce(similarity(text_feats, frame_feats, mask_all, cfg.pooling, cfg.temperature), logit_scale)
