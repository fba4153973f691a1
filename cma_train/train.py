"""Adapter training: frozen open_clip + Cross-Modal Adapters, symmetric InfoNCE over the global batch.

Single process or `torchrun --nproc_per_node N -m cma_train.cli train ...` (NCCL on GPU, gloo on
CPU; multi-node with torchrun's --nnodes/--node_rank/--rdzv_endpoint). Each step is the loss of the
global batch, back-propagated, the adapter gradients summed over the ranks (cma_train.step): the
same gradient as one process on the same batch.

Resume is exact: each epoch's order is a permutation seeded by (seed, epoch), a resumed run skips
the steps already taken, and optimizer, scheduler, step and RNG states come back from the
checkpoint. Checkpoints are written to a temporary file and renamed.

SIGINT (Ctrl-C), SIGTERM (a job scheduler's preemption) or SIGHUP (a terminal that hung up) stops a
run cleanly (cma_train.signals): the current step (or evaluation) finishes, every rank agrees on the
step, the checkpoint is written and train() raises TrainingStopped; `--resume` then continues
exactly.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from cma_kernels import describe_device, triton_runs_on
from cma_model import adapter_state_dict, count_trainable_parameters, load_adapter_state_dict, set_recompute
from cma_model.cache import FrameCache, folder_lock
from cma_model.cuda_graphs import graph_towers
from cma_model.data import LOADER_TIMEOUT_S, CaptionVideoDataset, VideoFrames, batches, video_loader
from cma_model.datasets import check_sources, load_annotations
from cma_model.progress import progress_bar
from cma_model.retrieval import RetrievalForward, compile_towers
from cma_train.backbone import autocast_dtype, build_model, unfused_gpu_note
from cma_train.checkpoint import (CHECKPOINT_FORMAT, RUN_LOCK, CheckpointError, adapters_file, drop_records_after,
                                  load_checkpoint, rng_state, save_checkpoint, set_rng_state)
from cma_train.config import TrainConfig
from cma_train.distributed import EveryRankOrNone, FailedElsewhere, agree_after_step, init_distributed, rank_device
from cma_train.evaluate import evaluate
from cma_train.signals import StopSignals, TrainingStopped
from cma_train.step import batches_for_steps, record_cuda_graphs, step_within_memory, uneven_chunks_recompile

RESUME_MUST_MATCH = ("model", "model_config", "dataset", "split", "reduction_dim", "shared_dim", "activation",
                     "dropout", "batch_size", "seed", "max_frames", "max_words", "sample_fps", "pooling", "temperature",
                     "epochs", "warmup")   # the loss, the data and the learning-rate schedule of the run
EMPTY_BATCHES_STOP = 5   # global batches in a row without a readable video that stop a run
# --precision fp16: the loss scale starts at torch's default and halves at each step whose gradients
# overflow (that step updates nothing); this many such steps in a row stop the run, which would
# otherwise go on learning nothing
FP16_INIT_SCALE = 2.0 ** 16
FP16_OVERFLOWS_STOP = 20


def param_groups(model, weight_decay):
    """Weight decay on adapter weights (2-D), none on biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def cosine_with_warmup(total_steps, warmup_fraction):
    """LambdaLR factor of a step: linear warm-up over the first warmup_fraction of the steps, then
    a cosine from 1 to 0 at total_steps."""
    warmup = int(total_steps * warmup_fraction)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def epoch_order(n, seed, epoch):
    """The permutation of range(n) epoch `epoch` visits: seeded by (seed, epoch), so a resumed run
    sees the batches it would have seen."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def unused_gpus_note(device, world):
    """The note for a run in one process on one of several visible GPUs (None for any other run)."""
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if world > 1 or count < 2:
        return None
    return (f"note: {count} GPUs are visible and this run uses one ({device}): `torchrun --nproc_per_node {count} "
            f"-m cma_train.cli train ...` trains on all of them (CUDA_VISIBLE_DEVICES picks which)")


def check_video_sources(cache, ann, what, say=True):
    """Every video of `what` (a split's Annotations) comes from the FrameCache `cache` (or None), its
    file or its folder of frame images. Refuses a split none of whose videos outside the cache is
    there (a wrong --root or --video-dir: every batch would be unreadable), and files to decode
    without decord; with `say`, notes how many the cache lacks."""
    uncached = [i for i, v in enumerate(ann.video_ids) if cache is None or not cache.covers(v)]
    if not uncached:
        return
    lacks = " that the frame cache lacks" if cache is not None else ""
    check_sources([ann.video_paths[i] for i in uncached], f"of {what}{lacks}")
    if cache is not None and say:
        print(f"note: {len(uncached)} of the {len(ann.video_ids)} videos of {what} are not in the frame cache "
              f"{cache.out_dir} (e.g. {ann.video_ids[uncached[0]]!r}): they are read from their video files "
              f"(`cma prepare --split train,test` caches several splits in one folder)")


def video_frames(cfg, cache, image_size):
    """The VideoFrames `cma train` and `cma eval` read: from the FrameCache `cache` (or None) or the
    files, at cfg's frames and fps, as uint8 through the loader (normalised on the device)."""
    return VideoFrames(cache, cfg.max_frames, image_size, cfg.sample_fps, raw=True,
                       hang_exit_s=LOADER_TIMEOUT_S)   # --workers 0: a hung decoder ends the run, said


def _resumed_from(ckpt):
    """(step, sha1 of the adapter weights) of a checkpoint: what the ranks compare on resume."""
    adapters = hashlib.sha1()
    for name, tensor in sorted(ckpt["adapters"]["state_dict"].items()):
        adapters.update(name.encode() + tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return ckpt["step"], adapters.hexdigest()


def _check_one_checkpoint(path, seen, rank):
    """ValueError (rank 0; FailedElsewhere on the others) where the ranks resumed from different
    checkpoints at `path` (`seen`: every rank's _resumed_from): across nodes, an --out on each node's
    own disk (a copy that only rank 0's node updates) would resume each node at its own step and
    adapters, and train diverging copies without a word."""
    other = next((r for r, s in enumerate(seen) if s != seen[0]), None)
    if other is None:
        return
    same_step = ", other adapters" if seen[other][0] == seen[0][0] else ""
    message = (f"the ranks resumed from different checkpoints at {path} (rank 0 at step {seen[0][0]}, rank {other} at "
               f"step {seen[other][0]}{same_step}): across nodes, --out must be one folder every node sees (a shared "
               f"filesystem), not a copy on each node's disk")
    raise ValueError(message) if rank == 0 else FailedElsewhere(f"rank 0: {message}")


def _no_run_to_resume(out, latest, rank, world):
    """The error of --resume where `latest` is not there; across nodes, why one rank may not see it."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 0))
    nodes = (f" (rank {rank} sees none: across nodes, --out must be one folder every node sees, on a shared "
             f"filesystem)") if 0 < local < world else ""
    return f"--resume: {out} holds no training run to continue (no {latest}); leave out --resume to start one{nodes}"


def train(cfg: TrainConfig):
    """Run training as configured; returns {"losses": [one per step that had a readable video],
    "steps": steps run, "skipped": {...}, "checkpoint": path, "model", "eval", "best"}."""
    rank, world = init_distributed(cfg.device)
    latest = os.path.join(cfg.out, "checkpoint_latest.pt")
    with EveryRankOrNone(world) as set_up:   # where the set-up fails on any rank, every rank stops at once
        if cfg.resume and not os.path.isfile(latest):   # first: this rank's settings are not the run's then
            raise ValueError(_no_run_to_resume(cfg.out, latest, rank, world))
        cfg.validate()
        if cfg.batch_size % world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")
        device = rank_device(cfg.device, rank)
        dtype = autocast_dtype(cfg.precision, device)   # bf16 on a GPU without it fails here, not after the model
        if cfg.cuda_graphs and device.type != "cuda":
            raise ValueError(f"--cuda-graphs needs a CUDA GPU, this run is on {describe_device(device)}; leave it out")
        if cfg.compile and device.type == "cuda" and not triton_runs_on(device):   # inductor writes Triton kernels
            raise ValueError(f"--compile needs a GPU of compute capability 7.0+ (torch.compile writes Triton kernels), "
                             f"got {describe_device(device)}; leave out --compile")
        for note in (unused_gpus_note(device, world), unfused_gpu_note(cfg.backend, device) if rank == 0 else None):
            if note:
                print(note, file=sys.stderr)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        if not cfg.resume and os.path.exists(latest):   # a fresh run would overwrite it at its first checkpoint
            raise ValueError(f"{cfg.out} already holds a training run ({latest}): continue it with --resume, or "
                             f"train into another --out")
        os.makedirs(cfg.out, exist_ok=True)   # an --out that cannot be made fails now, not after the model is built
        with folder_lock(cfg.out, RUN_LOCK, "cma train") if rank == 0 else contextlib.nullcontext():
            return _train_in_folder(cfg, rank, world, device, dtype, latest, set_up)


def _train_in_folder(cfg, rank, world, device, dtype, latest, set_up):
    """train(), once rank 0 holds the run folder; `set_up`: the EveryRankOrNone its set-up ends in."""
    # data first: a wrong --root, split or --cache fails in a second, not after the model is built
    ann = load_annotations(cfg.dataset, cfg.root, cfg.split, cfg.video_dir)
    eval_ann = load_annotations(cfg.dataset, cfg.root, cfg.eval_split, cfg.video_dir) if cfg.eval_split else None
    cache = FrameCache(cfg.cache) if cfg.cache else None
    for split, split_ann in ((cfg.split, ann), (cfg.eval_split, eval_ann)):
        if split_ann is not None:
            check_video_sources(cache, split_ann, f"split {split!r}", say=rank == 0)
    model, tokenizer, image_size = build_model(cfg, device)
    if cfg.recompute_mlp or not cfg.recompute_out_proj:
        set_recompute(model, mlp=cfg.recompute_mlp, out_proj=cfg.recompute_out_proj)
    if cfg.compile:
        compile_towers(model, cfg.compile)
    frames = video_frames(cfg, cache, image_size)
    dataset = CaptionVideoDataset(ann, tokenizer, frames, cfg.max_words, model.context_length)
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} captions cannot fill one batch of {cfg.batch_size}; lower --batch-size")
    total_steps = steps_per_epoch * cfg.epochs
    local_batch = cfg.batch_size // world
    if rank == 0 and uneven_chunks_recompile(cfg, local_batch):
        print(f"note: --micro-batch {cfg.micro_batch} does not divide the {local_batch} videos per process: the "
              f"last, smaller chunk of each step makes torch.compile compile the towers once more")

    forward = RetrievalForward(model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  fused=device.type == "cuda")   # one kernel for all adapter tensors
    # fp16 gradients would underflow: the loss is scaled up before backward, the gradients unscaled before
    # clipping (disabled, the scaler passes everything through)
    scaler = torch.amp.GradScaler(device.type, init_scale=FP16_INIT_SCALE, enabled=dtype == torch.float16)
    schedule = cosine_with_warmup(total_steps, cfg.warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step, skipped = 0, {}
    best, evaluated_step, last_eval = None, -1, None   # best: t2v R@1 so far, and when
    resumed_from = None
    if cfg.resume:
        ckpt = load_checkpoint(latest)
        resumed_from = _resumed_from(ckpt)
        _restore(ckpt, latest, cfg, model, optimizer, scheduler, schedule, scaler)
        step, skipped = ckpt["step"], dict(ckpt["skipped"])
        best, evaluated_step = ckpt.get("best"), ckpt.get("evaluated_step", -1)
    if cfg.cuda_graphs:   # after the adapters are restored, before any loader starts and any log is opened
        started = time.perf_counter()
        graph_towers(model)
        sizes = record_cuda_graphs(forward, cfg, device, frames, dataset.tokens.shape[1], local_batch)
        if rank == 0:
            print(f"recorded the towers' CUDA graphs for {' and '.join(map(str, sizes))} videos per pass in "
                  f"{time.perf_counter() - started:.1f} s")

    written = None   # (step, evaluated_step) of the last checkpoint written: the state it holds
    written_at = time.monotonic()   # when (or when the run began): --save-every-min counts from there

    def checkpoint():   # every rank calls it at the same step
        nonlocal written, written_at
        if world > 1:   # the unreadable videos of every rank, not only rank 0's, go into the checkpoint
            per_rank = [None] * world
            dist.all_gather_object(per_rank, skipped)
            for other in per_rank:
                skipped.update(other)
        with EveryRankOrNone(world):   # rank 0's full disk stops every rank at once
            if rank == 0 and written != (step, evaluated_step):   # a stop right after a save writes nothing new
                written, written_at = (step, evaluated_step), time.monotonic()
                save_checkpoint(latest, {"format": CHECKPOINT_FORMAT, "adapters": adapter_state_dict(model),
                                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                         "step": step, "config": _plain(cfg), "rng": rng_state(), "skipped": skipped,
                                         "best": best, "evaluated_step": evaluated_step,
                                         "scaler": scaler.state_dict() if scaler.is_enabled() else None})

    def run_eval():
        """Evaluate on eval_split (every rank takes part), log it, keep the best adapters, checkpoint."""
        nonlocal best, evaluated_step
        bar.clear()
        res = evaluate(model, tokenizer, eval_ann, frames, cfg.pooling, cfg.temperature, cfg.max_words,
                       workers=cfg.workers, device=device, progress=cfg.progress, precision=cfg.precision)
        evaluated_step = step
        better = best is None or res["t2v"]["R1"] > best["t2v"]["R1"]
        if rank == 0 and step < last_step:   # a periodic one (cma train prints the final one's table)
            t2v, v2t = res["t2v"], res["v2t"]
            tqdm.write(f"evaluation at step {step} (epoch {step / steps_per_epoch:g}) on {cfg.eval_split}: t2v R@1 "
                       f"{t2v['R1']:.1f}, R@5 {t2v['R5']:.1f}, R@10 {t2v['R10']:.1f}; v2t R@1 {v2t['R1']:.1f}"
                       f"{' (best so far)' if better else ''}")
        with EveryRankOrNone(world):   # rank 0 writes; its full disk stops every rank at once
            if better:
                best = {"step": step, "epoch": step / steps_per_epoch, "t2v": res["t2v"], "v2t": res["v2t"]}
                if rank == 0:
                    save_checkpoint(os.path.join(cfg.out, "adapters_best.pt"), adapters_file(model, cfg))
            _log_line(log, {"step": step, "epoch": step / steps_per_epoch, "eval_split": cfg.eval_split,
                            "t2v": res["t2v"], "v2t": res["v2t"], "num_videos": res["num_videos"],
                            "num_captions": res["num_captions"], "skipped_videos": len(res["skipped"])})
            if writer:
                for direction in ("t2v", "v2t"):
                    for name, value in res[direction].items():
                        writer.add_scalar(f"eval/{direction}_{name}", value, step)
        checkpoint()
        return res

    def periodic_eval_due():
        return bool(cfg.eval_every and step % steps_per_epoch == 0 and (step // steps_per_epoch) % cfg.eval_every == 0
                    and 0 < step < last_step and step != evaluated_step)

    log_path = os.path.join(cfg.out, "metrics.jsonl")
    if rank == 0 and cfg.resume:
        drop_records_after(log_path, step, evaluated_step)
    log = open(log_path, "a" if cfg.resume else "w") if rank == 0 else None
    writer = _tensorboard(cfg) if rank == 0 else None
    seen = set_up.done(resumed_from)   # the set-up's end: the first collective follows
    if cfg.resume:
        _check_one_checkpoint(latest, seen, rank)
    elif world > 1:   # every rank starts from rank 0's adapters (the same seed gives them anyway)
        for p in model.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, 0)
    losses, unread_in_a_row, overflows_in_a_row, first_step = [], 0, 0, step
    scale = scaler.get_scale()   # the loss scale of the next step (1.0 without fp16); one read per step below
    last_step = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    if rank == 0:
        todo = f"steps {step + 1}-{last_step} of {total_steps}" if step < last_step else "no step left to run"
        print(f"training {count_trainable_parameters(model):,} adapter parameters (r={cfg.reduction_dim}, "
              f"d_s={cfg.shared_dim}) on {len(dataset)} captions of {len(ann.video_ids)} videos ({cfg.dataset} "
              f"{cfg.split}; {cfg.max_frames} frames, {cfg.max_words} words): {steps_per_epoch} steps per epoch, "
              f"{todo}, global batch {cfg.batch_size} over {world} process(es) on {describe_device(device)} in "
              f"{_PRECISION_NAMES[dtype]}; writing to {cfg.out}")
    bar = progress_bar(total=last_step, initial=step, desc="train", unit="step", disable=rank != 0 or not cfg.progress)
    say_epochs = rank == 0 and (bar.disable or not sys.stderr.isatty())   # a line per epoch in a log, or no bar
    model.train()
    with StopSignals(announce=rank == 0) as stop:
        if periodic_eval_due():   # a run stopped during an evaluation: do it first
            run_eval()
        while step < last_step:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            order = epoch_order(len(dataset), cfg.seed, epoch)[: steps_per_epoch * cfg.batch_size]
            mine = order[rank::world][in_epoch * local_batch:]
            epoch_losses, epoch_times = [], []   # this epoch's, in this run; (step, of it waiting for data) seconds
            # a loader per epoch, for its sampler; persistent workers would save only their start, once an epoch
            loader = video_loader(dataset, frames, local_batch, cfg.workers, device, sampler=mine, say=rank == 0)
            ready = time.perf_counter()   # from here to the batch's arrival: waiting for data
            for batch in batches_for_steps(batches(loader), device, world):   # a rank that fails stops all
                wait = time.perf_counter() - ready
                for reason in batch["skipped"]:
                    skipped[reason.split(":")[0]] = reason
                optimizer.zero_grad(set_to_none=True)
                loss = step_within_memory(forward, model.logit_scale, batch, cfg, device, frames.to_model_input, world,
                                          scaler)
                if loss is not None:   # else no gradients (no video of the global batch was readable): no update
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    scaler.step(optimizer)   # skipped where the fp16 gradients overflowed
                    scaler.update()
                if step == first_step:
                    _first_scheduler_step(scheduler)
                else:
                    scheduler.step()
                step += 1
                epoch_ends = step == last_step or step % steps_per_epoch == 0
                took = time.perf_counter() - ready   # the step, its wait for data included (loss.item(): synced)
                epoch_times.append((took, wait))
                if loss is None:   # the step still counts: the schedule, and a resumed run, stay the same
                    unread_in_a_row += 1
                    if unread_in_a_row == EMPTY_BATCHES_STOP:   # the run stops: what it learnt stays
                        checkpoint()
                    _no_readable_video(step, unread_in_a_row, batch["skipped"], say=rank == 0)
                    record = {"no_readable_video": True}
                else:
                    unread_in_a_row = 0
                    losses.append(loss.item())
                    epoch_losses.append(losses[-1])
                    if not math.isfinite(losses[-1]):
                        hint = " (--resume then continues from the last checkpoint)" if os.path.isfile(latest) else ""
                        fp16 = ", or train with --precision fp32 (fp16 ends at 65504)" if scaler.is_enabled() else ""
                        raise FloatingPointError(f"loss became {losses[-1]} at step {step}; lower --lr{fp16}{hint}")
                    record = {"loss": losses[-1], "videos_per_s": cfg.batch_size / took, "data_wait_s": wait}
                    if scaler.is_enabled():
                        record["loss_scale"], scale = scale, scaler.get_scale()   # this step's, the next one's
                        overflows_in_a_row = overflows_in_a_row + 1 if scale < record["loss_scale"] else 0
                        if overflows_in_a_row == FP16_OVERFLOWS_STOP:
                            checkpoint()   # for the resume in another precision
                            raise FloatingPointError(
                                f"the fp16 gradients overflowed in {overflows_in_a_row} steps in a row (steps "
                                f"{step - overflows_in_a_row + 1}-{step}; loss scale now {scale:g}), "
                                f"which updated nothing: train with --precision fp32, or bf16 on a GPU that has it "
                                f"(`--resume --precision fp32` continues from the last checkpoint)")
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                                    vid_s=f"{record['videos_per_s']:.1f}", data_wait=f"{wait / took:.0%}",
                                    refresh=False)   # bar.update refreshes
                bar.update(1)
                if say_epochs and epoch_ends:
                    print(_epoch_line(cfg, epoch, step, last_step, epoch_losses, epoch_times), flush=True)
                # rank 0's error writing the step's record (a full disk): every rank stops at the agreement
                unwritten = _write_step(log, writer, latest, step, step / steps_per_epoch, scheduler.get_last_lr()[0],
                                        record)
                # rank 0's clock decides a checkpoint by time: the ranks' clocks differ, and all must save together
                save_now = rank == 0 and 0 < cfg.save_every_min * 60 <= time.monotonic() - written_at
                signum, save_now = agree_after_step(device, world, stop.received, unwritten, save_now)
                save_due = save_now or (cfg.save_every and step % cfg.save_every == 0)
                if signum or save_due or epoch_ends:
                    checkpoint()
                if not signum and periodic_eval_due():
                    run_eval()   # checkpointed
                    signum, _ = agree_after_step(device, world, stop.received)   # a signal during the evaluation
                if signum:
                    bar.close()
                    raise TrainingStopped(signum, step, latest)
                if epoch_ends:
                    break
                ready = time.perf_counter()   # checkpoints and evaluations are not the next step's wait
    bar.close()
    with EveryRankOrNone(world):   # the final evaluation's collectives follow
        if rank == 0:
            save_checkpoint(os.path.join(cfg.out, "adapters.pt"), adapters_file(model, cfg))
            if skipped:
                print(f"skipped {len(skipped)} unreadable video(s):")
                for reason in list(skipped.values())[:20]:
                    print(f"  {reason}")
    if cfg.eval_split:
        last_eval = run_eval()
    if log:
        log.close()
    if writer:
        writer.close()
    return {"losses": losses, "steps": step - first_step, "skipped": skipped, "checkpoint": latest, "model": model,
            "eval": last_eval, "best": best}


def _restore(ckpt, path, cfg, model, optimizer, scheduler, schedule, scaler):
    """Load the checkpoint `ckpt` (read from `path`) into the run's adapters, optimizer, scheduler,
    loss scaler and RNGs, after checking that it was made with this run's RESUME_MUST_MATCH
    settings. This run's optimizer settings win over the saved ones (a diverged run resumes with a
    lower --lr), on the learning-rate `schedule` (a LambdaLR factor) at the step reached."""
    for key in RESUME_MUST_MATCH:
        if ckpt["config"].get(key) != getattr(cfg, key):
            raise CheckpointError(f"{path} was made with {key}={ckpt['config'].get(key)!r}, this run has "
                                  f"{key}={getattr(cfg, key)!r}; resume with the same setting (`cma train "
                                  f"--resume` takes the run's own where no flag sets it)")
    load_adapter_state_dict(model, ckpt["adapters"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    for group, fresh in zip(optimizer.param_groups, param_groups(model, cfg.weight_decay)):
        group.update(initial_lr=cfg.lr, lr=cfg.lr * schedule(ckpt["step"]), betas=tuple(cfg.betas), eps=cfg.eps,
                     weight_decay=fresh["weight_decay"])
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    if scaler.is_enabled() and ckpt.get("scaler"):   # a run that was fp16 before: its loss scale goes on
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])


def _epoch_line(cfg, epoch, step, last_step, losses, times):
    """The line that ends epoch `epoch` (from 0) at `step` in a log: the mean of this run's `losses`
    in it, and its videos/s and share of the time waiting for data from `times`, the (step, of it
    waiting) seconds of each of this run's steps in it."""
    mean = f"mean loss {sum(losses) / len(losses):.4f}" if losses else "no loss"
    seconds, waited = map(sum, zip(*times))
    rate = cfg.batch_size * len(times) / seconds
    return (f"epoch {epoch + 1}/{cfg.epochs}: step {step}/{last_step}, {mean}, {rate:.1f} videos/s "
            f"({waited / seconds:.0%} of the time waiting for data)")


def _write_step(log, writer, latest, step, epoch, lr, record):
    """Rank 0's line for a step in metrics.jsonl (its step, epoch, lr and `record`), and `record`'s
    numbers in tensorboard (`writer`, or None) for a step with a loss. Returns the OSError of a
    write that failed (a full disk), to stop every rank at the step's agreement, or None."""
    try:
        _log_line(log, {"step": step, "epoch": epoch, "lr": lr, **record})
        if writer and "loss" in record:
            for name, value in record.items():
                writer.add_scalar(f"train/{name}", value, step)
    except OSError as error:
        hint = " (--resume continues from the last checkpoint)" if os.path.isfile(latest) else ""
        return OSError(f"{error}{hint}")
    return None


def _log_line(log, record):
    """Append the dict `record` to metrics.jsonl: `log` is rank 0's open file (None on the other
    ranks). An OSError (a full disk) names the file."""
    if log is None:
        return
    try:
        log.write(json.dumps(record) + "\n")
        log.flush()
    except OSError as error:
        raise OSError(f"cannot write {log.name}: {error.strerror or error}") from error


class NoReadableVideos(ValueError):
    """No video of EMPTY_BATCHES_STOP global batches in a row could be read; every rank raises it
    at the same step (`cma train` prints it from rank 0)."""


def _no_readable_video(step, in_a_row, reasons, say):
    """After a step whose global batch had no readable video (reasons: this rank's messages naming
    the files): a note where `say`; NoReadableVideos at the EMPTY_BATCHES_STOP-th such step in a row,
    which means broken files or a decoder that cannot read them, not bad luck."""
    example = f" (e.g. {reasons[0]})" if reasons else ""
    if in_a_row >= EMPTY_BATCHES_STOP:
        raise NoReadableVideos(f"no video could be read in {in_a_row} batches in a row (steps {step - in_a_row + 1}"
                               f"-{step}){example}: check the video files and that decord reads them (`cma prepare` "
                               f"lists the videos it cannot read); the checkpoint is written, `--resume` continues "
                               f"after step {step}")
    if say:
        tqdm.write(f"note: step {step}: no video of its batch could be read{example}; the step updates nothing",
                   file=sys.stderr)


def _first_scheduler_step(scheduler):
    """scheduler.step() without PyTorch's warning that the optimizer took no step before it: a first
    step without an update (skipped by the fp16 loss scaler, or no readable video) is not a misuse.
    Only for the first step: entering catch_warnings resets the once-per-place warning registry."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        scheduler.step()


_PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 with loss scaling"}


def _plain(cfg):
    d = dataclasses.asdict(cfg)
    d["betas"] = list(d["betas"])
    return d


def _tensorboard(cfg):
    if not cfg.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter   # validate() checked that tensorboard is installed
    return SummaryWriter(os.path.join(cfg.out, "tensorboard"))
