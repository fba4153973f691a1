"""The `cma` command: train, eval, prepare, bench, demo.

Settings come from the defaults (the paper's recipe; adapter shape, frames, words and epochs per
--dataset, config.PAPER_RECIPES), then `--config FILE` (YAML or JSON, keys as the flag names with -
or _), then flags: a flag always wins over the file.
"""
import argparse
import dataclasses
import json
import os
import signal
import sys
import typing

from cma_train.signals import TrainingStopped, output_may_close
from cma_train.config import PAPER_RECIPES, TrainConfig, available_cpus, paper_recipe

HELP = {
    "model": "open_clip architecture name (ViT-B-32, ViT-B-16, ViT-L-14, ...)",
    "pretrained": "the backbone's weights: an open_clip checkpoint file, OpenAI's CLIP file (ViT-B-32.pt), an "
                  "open_clip pretrained tag of --model (needs network), or 'none' for random init",
    "model_config": "a custom open_clip model config instead of --model: a JSON file laid out as open_clip's "
                    "model_configs/*.json (embed_dim, vision_cfg, text_cfg), or that JSON itself",
    "reduction_dim": "adapter bottleneck width r",
    "shared_dim": "up-projection channels shared between the vision and text towers (the last d_s)",
    "activation": "adapter activation: quick_gelu or gelu",
    "dropout": "dropout after the adapter activation (the fused kernels do none: > 0 trains on the PyTorch path)",
    "backend": "adapter implementation: auto (fused Triton on GPUs of compute capability 8.0+, PyTorch elsewhere), "
               "triton or reference",
    "compile": "torch.compile the towers: default, reduce-overhead (adds CUDA graphs), max-autotune; "
               "unset = eager (the default until a GPU benchmark shows compile pays; minutes of compiling first)",
    "cuda_graphs": "replay each tower's training forward and backward as CUDA graphs (recorded before the first "
                   "step, a second or so): the host no longer launches each kernel. CUDA only, not with --compile; "
                   "off by default until a GPU benchmark shows it pays",
    "recompute_mlp": "recompute each frozen block's MLP hidden activation in backward instead of keeping it: "
                     "4 fewer [tokens, width] activations per block, one more matmul per block",
    "recompute_out_proj": "recompute each frozen block's attention output projection and attention adapter in "
                          "backward instead of keeping their outputs: 2 fewer [tokens, width] activations per block "
                          "(1 with --recompute-mlp), one more [tokens, width] x [width, width] matmul and adapter "
                          "per block",
    "dataset": "msrvtt, msvd, didemo, activitynet, vatex or jsonl",
    "root": "folder with the dataset's annotation files (jsonl: a folder of {split}.jsonl files, or one .jsonl file, "
            "which is then every split)",
    "split": "split to train on (msrvtt: train = 9k, train7k; others: train)",
    "video_dir": "folder with the videos (default ROOT/videos; jsonl: paths relative to the file)",
    "cache": "frame cache made by `cma prepare` (no decoding during training; videos it lacks, such as another "
             "split's, are decoded from their files)",
    "max_frames": "frames per video (sampled at --sample-fps, then uniformly)",
    "max_words": "caption tokens, start and end included",
    "sample_fps": "candidate frames per second before uniform sampling",
    "workers": "data-loading processes (fewer where /dev/shm cannot hold their batches, said in a note)",
    "epochs": "training epochs",
    "batch_size": "global batch (all processes together); negatives come from the whole global batch",
    "micro_batch": "videos per forward/backward pass on each process (0: its whole share): a global batch "
                   "larger than GPU memory holds, with the same gradients, for one more forward pass per step "
                   "(halved by itself where GPU memory runs out)",
    "lr": "peak learning rate (AdamW, cosine schedule with warm-up)",
    "weight_decay": "weight decay on adapter weights (biases get none)",
    "warmup": "fraction of the steps spent warming up the learning rate",
    "grad_clip": "gradient norm clip (inf: none)",
    "betas": "AdamW betas",
    "eps": "AdamW epsilon",
    "pooling": "video-text similarity: softmax (the paper's parameter-free pooling) or meanP",
    "temperature": "softmax pooling temperature",
    "seed": "random seed (also fixes the data order of every epoch)",
    "out": "output folder: checkpoints, adapters.pt, metrics.jsonl, results",
    "resume": "continue from OUT/checkpoint_latest.pt exactly where it stopped, with the run's own settings "
              "(flags may change the optimizer's)",
    "save_every": "also checkpoint every N steps (0: once per epoch)",
    "save_every_min": "also checkpoint once this many minutes have passed since the last checkpoint, so that a crash "
                      "loses no more (0: only per epoch and --save-every)",
    "eval_split": "evaluate on this split after training (e.g. test); on all GPUs under torchrun",
    "eval_every": "also evaluate on --eval-split every N epochs during training, log it to metrics.jsonl and keep "
                  "the adapters with the best t2v R@1 as adapters_best.pt (0: after training only)",
    "tensorboard": "also log to OUT/tensorboard (needs the tensorboard package)",
    "device": "auto, cpu or cuda",
    "precision": "dtype the towers run in: auto (bf16 on GPUs of compute capability 8.0+, fp16 with loss scaling "
                 "on older ones such as V100 and T4, fp32 on CPU), bf16, fp16 or fp32",
    "max_steps": "stop after N steps in total (0: run all epochs)",
    "progress": "show progress: bars on a terminal, lines in a log (at most one a minute); --no-progress: a line per "
                "epoch",
}


REQUIRED = ("pretrained", "root")   # no default: `cma train` refuses to start without them


def _add_config_flags(parser):
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        text = f"{HELP[f.name]} ({_default_text(f)})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.name == "betas":
            parser.add_argument(flag, type=float, nargs=2, default=None, metavar=("B1", "B2"), help=text)
        elif f.name == "model_config":
            parser.add_argument(flag, default=None, metavar="FILE_OR_JSON", help=text)
        else:
            base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
            parser.add_argument(flag, type=base, default=None, help=text)
    parser.add_argument("--config", help="YAML or JSON file of settings; flags override it")


def _default_text(field):
    """A setting's default for --help: the paper's value per dataset where it depends on --dataset."""
    if field.name in PAPER_RECIPES["msrvtt"]:
        return f"default: {_recipe_text(field.name)}"
    return "required" if field.name in REQUIRED else f"default: {field.default!r}"


def _recipe_text(name):
    values = ", ".join(f"{dataset} {recipe[name]}" for dataset, recipe in PAPER_RECIPES.items())
    return f"the paper's for --dataset: {values}; jsonl as msrvtt"


def _read_config_file(path):
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ValueError(f"--config {path}: not a text file (UTF-8)") from None
    if path.endswith((".yaml", ".yml")):
        import yaml
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:   # syntax: say where, as for JSON below
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ValueError(f"--config {path}{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of settings")
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in hints:
            raise ValueError(f"--config {path}: unknown setting {key!r}; known: {', '.join(sorted(hints))}")
        if name == "model_config" and isinstance(value, str):   # a file or JSON text: TrainConfig reads it
            out[name] = value
        else:
            out[name] = _typed(value, hints[name], f"--config {path}: {key}")
    return out


def _typed(value, kind, where):
    """A config file's value as the setting's type, as its flag would parse it. YAML reads 1e-5 (no
    dot) as a string, so numbers may come as strings; a value that is not the type is an error."""
    optional = typing.get_origin(kind) is typing.Union
    kind = typing.get_args(kind)[0] if optional else kind
    if value is None and optional:
        return None
    try:
        if kind is tuple:   # betas: two floats
            value = tuple(float(v) for v in value)
        elif kind is float and not isinstance(value, bool):
            value = float(value)
        elif kind is int and not isinstance(value, bool) and float(value) == int(float(value)):
            value = int(float(value))
        if isinstance(value, kind):
            return value
    except (TypeError, ValueError, OverflowError):   # OverflowError: int(inf)
        pass
    raise ValueError(f"{where} must be {'two numbers' if kind is tuple else kind.__name__}, got {value!r}")


# Settings of one invocation, never taken from the checkpoint a resumed run continues.
PER_INVOCATION = ("out", "resume", "max_steps", "progress", "workers", "device")


def config_from_args(args) -> TrainConfig:
    """The TrainConfig of a command line: defaults, then --config, then flags. `cma train --resume`
    starts from the run's own settings (its checkpoint's) instead of the defaults, so `cma train
    --out DIR --resume` is the whole command."""
    values = _read_config_file(args.config) if args.config else {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = tuple(v) if f.name == "betas" else v
    if args.command == "train" and values.get("resume"):
        values = _resumed_settings(values)
    return TrainConfig(**values)


def _resumed_settings(given):
    """The resumed run's settings: its checkpoint's, under those given on purpose (a note names the
    ones that differ; train() refuses a change to the settings that define the run, and a missing
    checkpoint)."""
    from cma_train.checkpoint import load_checkpoint
    from cma_train.train import RESUME_MUST_MATCH
    out = given.get("out", TrainConfig.out)
    path = os.path.join(out, "checkpoint_latest.pt")
    if not os.path.isfile(path):   # train() says so, on every rank that lacks it (across nodes: why)
        return given
    run = {k: v for k, v in load_checkpoint(path)["config"].items()
           if k in TrainConfig.__dataclass_fields__ and k not in PER_INVOCATION}
    run["betas"] = tuple(run.get("betas", TrainConfig.betas))
    changed = [f"--{k.replace('_', '-')} {given[k]} (the run had {run[k]})" for k in sorted(given.keys() & run.keys())
               if given[k] != run[k] and k not in RESUME_MUST_MATCH]
    if changed and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: resuming with {', '.join(changed)}", file=sys.stderr)
    return {**run, **given}


def _given_settings(args):
    """The TrainConfig settings set on the command line or in --config (the rest are defaults)."""
    given = set(_read_config_file(args.config)) if args.config else set()
    return given | {f.name for f in dataclasses.fields(TrainConfig) if getattr(args, f.name) is not None}


def cmd_train(args):
    """`cma train`: train adapters as the flags (and --config, or the run's own settings on --resume) say."""
    import torch
    from cma_train.checkpoint import results_record
    from cma_train.evaluate import format_results, save_results
    from cma_train.step import OutOfMemoryElsewhere
    from cma_train.train import NoReadableVideos, train
    cfg = config_from_args(args)
    rank = int(os.environ.get("RANK", 0))
    try:
        result = train(cfg)
    except OutOfMemoryElsewhere:   # torchrun: the process that ran out says so, once
        return 2
    except NoReadableVideos:   # every rank stops at the same step: rank 0 says why
        if rank != 0:
            return 2
        raise
    except torch.OutOfMemoryError as e:   # a setting to change, not a bug: say which ones
        raise ValueError(f"out of GPU memory ({str(e).splitlines()[0]}); lower --batch-size, or keep it and add "
                         f"--micro-batch N (the same gradients for one more forward pass per step; cma train "
                         f"halves it by itself down to 1, except with --dropout), or add --recompute-mlp") from None
    if rank != 0:
        return 0
    if cfg.eval_split:
        print(format_results(result["eval"], f"{cfg.dataset} {cfg.eval_split}, final adapters"))
        save_results({**result["eval"], **results_record(cfg, cfg.eval_split, os.path.join(cfg.out, "adapters.pt"))},
                     os.path.join(cfg.out, f"results_{cfg.eval_split}.json"))
        best = result["best"]
        if cfg.eval_every:
            print(f"best t2v R@1 {best['t2v']['R1']:.1f} at epoch {best['epoch']:g} (step {best['step']}): "
                  f"{os.path.join(cfg.out, 'adapters_best.pt')}")
    last = f", last loss {result['losses'][-1]:.4f}" if result["losses"] else ""
    print(f"wrote {os.path.join(cfg.out, 'adapters.pt')} (for `cma eval --adapters`): " +
          (f"{result['steps']} step(s) in this run{last}" if result["steps"] else "no step was left to run"))
    return 0


def _evaluate(model, cfg, ann, device, cache=None):
    """Metrics of `model` on `ann`, frames from `cache` (a FrameCache; opened from cfg.cache if None)."""
    from cma_model.cache import FrameCache
    from cma_train.backbone import image_size, tokenizer_for
    from cma_train.evaluate import evaluate
    from cma_train.train import video_frames
    if cache is None and cfg.cache:
        cache = FrameCache(cfg.cache)
    return evaluate(model, tokenizer_for(cfg), ann, video_frames(cfg, cache, image_size(model)), cfg.pooling,
                    cfg.temperature, cfg.max_words, workers=cfg.workers, device=device, progress=cfg.progress,
                    precision=cfg.precision)


def cmd_eval(args):
    """`cma eval`: text-video retrieval metrics of the backbone with --adapters (zero-shot without)."""
    import torch
    from cma_model import adapter_modules, load_adapter_state_dict
    from cma_model.cache import FrameCache
    from cma_model.datasets import load_annotations
    from cma_train.checkpoint import read_adapters, results_record
    from cma_train.evaluate import format_results, save_results
    from cma_train.backbone import build_model
    from cma_train.distributed import EveryRankOrNone, init_distributed, rank_device
    from cma_train.train import check_video_sources
    cfg = config_from_args(args)
    rank, world = init_distributed(cfg.device)   # under torchrun every rank encodes its share
    with EveryRankOrNone(world):   # where the set-up fails on any rank, every rank stops at once
        state = read_adapters(args.adapters, cfg, _given_settings(args)) if args.adapters else None
        cfg.validate()
        device = rank_device(cfg.device, rank)
        ann = load_annotations(cfg.dataset, cfg.root, args.eval_on, cfg.video_dir)   # before the model: fails fast
        cache = FrameCache(cfg.cache) if cfg.cache else None   # its index is read once, here
        check_video_sources(cache, ann, f"split {args.eval_on!r}", say=rank == 0)
        path = _results_path(args, cfg)
        if rank == 0:
            what = f"adapters {args.adapters} (r={cfg.reduction_dim}, d_s={cfg.shared_dim})" if args.adapters \
                else "the backbone alone (zero-shot)"
            arch = "the --model-config model" if cfg.model_config else cfg.model
            print(f"evaluating {what} on {arch} ({cfg.pretrained}): {len(ann.captions)} captions, "
                  f"{len(ann.video_ids)} videos of {cfg.dataset} {args.eval_on}; {cfg.pooling} pooling (temperature "
                  f"{cfg.temperature:g}), {cfg.max_frames} frames at {cfg.sample_fps:g} fps, {cfg.max_words} words")
        torch.manual_seed(cfg.seed)   # a random backbone (--pretrained none) is the one `cma train` built
        model, _, _ = build_model(cfg, device)
        if state is not None:
            load_adapter_state_dict(model, state)
        else:   # zero-shot: every up-projection zeroed, so each adapter adds nothing to its sublayer
            with torch.no_grad():
                for m in adapter_modules(model):
                    for p in (m.w_up_unique, m.b_up_unique, m.shared.weight, m.shared.bias):
                        p.zero_()
    try:
        res = {**_evaluate(model, cfg, ann, device, cache), **results_record(cfg, args.eval_on, args.adapters)}
    except torch.OutOfMemoryError as e:   # evaluate() halves its videos per pass down to one first
        raise ValueError(f"out of GPU memory while evaluating ({str(e).splitlines()[0]}), with videos already "
                         f"encoded in smaller passes; lower --max-frames, or use a GPU with more memory") from None
    if rank != 0:
        return 0
    print(format_results(res, f"{cfg.dataset} {args.eval_on}"))
    save_results(res, path)
    print(f"wrote {path}")
    return 0


def _results_path(args, cfg):
    """Where `cma eval` writes its JSON: --results (a folder gets results_<split>.json inside), else
    beside --adapters, else in --out. Checked before anything is evaluated, so no evaluation is lost
    to a path that cannot be written."""
    name = f"results_{args.eval_on}.json"
    if args.results:
        path = os.path.join(args.results, name) if os.path.isdir(args.results) else args.results
    else:
        path = os.path.join(os.path.dirname(os.path.abspath(args.adapters)) if args.adapters else cfg.out, name)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:   # a file where a folder should be, permissions
        raise ValueError(f"cannot write the results to {path}: cannot make the folder {folder} "
                         f"({e.strerror})") from None
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"cannot write the results to {path}: no write permission")
    return path


def cmd_prepare(args):
    """`cma prepare`: decode and resize the videos of the splits into a frame cache."""
    from cma_model.cache import cache_bytes, prepare_cache
    from cma_model.datasets import load_annotations
    videos = {}   # id -> path, over every split asked for (one cache can serve training and evaluation)
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    if not splits:
        raise ValueError(f"--split {args.split!r}: name a split, or several joined by commas (train,test)")
    for split in splits:
        ann = load_annotations(args.dataset, args.root, split, args.video_dir)
        videos.update((v, p) for v, p in zip(ann.video_ids, ann.video_paths) if v not in videos)
    max_frames = paper_recipe(args.dataset)["max_frames"] if args.max_frames is None else args.max_frames
    size_gib = cache_bytes(len(videos), max_frames, args.size) / 2**30
    print(f"prepare: {len(videos)} videos into {args.out}, {size_gib:,.1f} GiB when done ({max_frames} frames of "
          f"{args.size} px per video)")
    skipped = prepare_cache(list(videos), list(videos.values()), args.out, max_frames, args.size,
                            args.sample_fps, args.workers, args.shard_size, args.timeout)
    print(f"cache {args.out}: {len(videos) - len(skipped)} videos ready, {len(skipped)} skipped ({max_frames} frames "
          f"of {args.size} px per video, sampled at {args.sample_fps:g} fps)")
    for vid, reason in list(skipped.items())[:20]:
        print(f"  {vid}: {reason}")
    return 0


def cmd_bench(args, rest):
    """`cma bench`: the adapter benchmark, or the one a flag picks (--e2e, --quick-gelu, --preprocess,
    --host, --targets), given the remaining arguments."""
    if args.e2e:
        from cma_benchmarks import bench_train_step
        bench_train_step.main(rest, prog="cma bench --e2e")
    elif args.quick_gelu:
        from cma_benchmarks import bench_quick_gelu
        bench_quick_gelu.main(rest, prog="cma bench --quick-gelu")
    elif args.preprocess:
        from cma_benchmarks import bench_preprocess
        bench_preprocess.main(rest, prog="cma bench --preprocess")
    elif args.host:
        from cma_benchmarks import bench_host
        bench_host.main(rest, prog="cma bench --host")
    elif args.targets:
        from cma_benchmarks import targets
        return targets.main(rest, prog="cma bench --targets", results="runs/bench")
    else:
        from cma_benchmarks import bench_adapter
        bench_adapter.main(rest, prog="cma bench")
    return 0


def cmd_demo(args):
    """`cma demo`: the self-contained demo (cma_train.demo)."""
    from cma_train.demo import run_demo
    return run_demo(args.out, workers=args.workers, quick=args.quick)


def _version():
    """cma's installed version, with the torch, triton and open_clip it runs on."""
    from importlib.metadata import PackageNotFoundError, version
    versions = []
    for package in ("cma", "torch", "triton", "open_clip_torch"):
        try:
            versions.append(version(package))
        except PackageNotFoundError:
            versions.append("not installed")
    return "{} (torch {}, triton {}, open_clip {})".format(*versions)


def build_parser():
    """The `cma` argument parser: one subcommand per cmd_* function."""
    parser = argparse.ArgumentParser(prog="cma",
                                     description="Cross-Modal Adapters for text-video retrieval on open_clip.")
    parser.add_argument("--version", action="version", version=f"cma {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train adapters on a text-video dataset")
    _add_config_flags(p)
    p = sub.add_parser("eval", help="evaluate retrieval (t2v and v2t R@1/5/10, MdR, MnR)")
    _add_config_flags(p)
    p.add_argument("--adapters",
                   help="adapters.pt or a training checkpoint, evaluated on its run's architecture with its run's "
                        "pooling, temperature, words, frames and fps unless flags say otherwise (default: none, "
                        "the backbone alone: zero-shot)")
    p.add_argument("--eval-on", default="test", help="split to evaluate (default: test)")
    p.add_argument("--results", help="file or folder for the JSON results (default: next to --adapters, or in --out)")
    p = sub.add_parser("prepare", help="decode and resize a dataset once into a frame cache (resumable)")
    p.add_argument("--dataset", required=True, help=HELP["dataset"])
    p.add_argument("--root", required=True, help=HELP["root"])
    p.add_argument("--split", default="train",
                   help="split to cache, or several joined by commas: train,test (default: train)")
    p.add_argument("--video-dir", help=HELP["video_dir"])
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--max-frames", type=int,
                   help=f"frames per video (default: as `cma train`, {_recipe_text('max_frames')})")
    p.add_argument("--size", type=int, default=224, help="frame side after resize and crop (default: 224)")
    p.add_argument("--sample-fps", type=float, default=1.0, help=HELP["sample_fps"] + " (default: 1.0)")
    p.add_argument("--workers", type=int, default=max(1, available_cpus() - 1),
                   help="decoding processes (default: one fewer than the CPUs this process may use: %(default)s)")
    p.add_argument("--shard-size", type=int, default=64, help="videos per shard file (default: 64)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a video counts as hung (default: 300)")
    p = sub.add_parser("bench", add_help=False, allow_abbrev=False,   # --quick is the benchmarks' own flag
                       help="benchmarks: the adapter op (default), --e2e training step, --preprocess frames, "
                            "--quick-gelu the fused activation, --host the CPU time per adapter call, "
                            "--targets the targets against results; "
                            "`cma bench [--e2e|--preprocess|--quick-gelu|--host|--targets] "
                            "--help` lists the chosen benchmark's options")
    p.add_argument("--e2e", action="store_true", help="whole training step: full fine-tune vs adapters (needs CUDA)")
    p.add_argument("--preprocess", action="store_true", help="frame preprocessing and video loading on the CPU")
    p.add_argument("--quick-gelu", action="store_true", help="the fused quick_gelu kernel vs eager (needs CUDA)")
    p.add_argument("--host", action="store_true", help="the CPU's time per fused adapter call (what bounds a step "
                   "of short kernels)")
    p.add_argument("--targets", action="store_true", help="measure nothing: the speed and memory targets against "
                   "the newest results in --results (default runs/bench, where the benchmarks write)")
    p = sub.add_parser("demo", help="the embedded demo: synthetic videos, zero-shot vs adapter-tuned R@1")
    p.add_argument("--out", default="runs/demo",
                   help="folder for the generated videos and the run (default: runs/demo)")
    p.add_argument("--workers", type=int, default=2, help="data-loading processes (default: 2)")
    p.add_argument("--quick", action="store_true", help="fewer steps (a smoke test; the comparison may not hold)")
    return parser


def main(argv=None):
    """The `cma` command on argv (sys.argv[1:] by default); returns its exit code."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    with output_may_close():   # `cma train | tee log`, and tee stopped: the run goes on
        code = _run(args, rest)
    if code == 0:
        _close_process_group()
    return code


def _run(args, rest):
    """The command's exit code; one line on stderr, no traceback, for the errors a user can act on."""
    try:
        if args.command == "bench":
            return cmd_bench(args, rest)
        return {"train": cmd_train, "eval": cmd_eval, "prepare": cmd_prepare, "demo": cmd_demo}[args.command](args)
    # user errors (settings, files, a full disk, an --lr that diverges): one clear line, no traceback
    except (ValueError, OSError, FloatingPointError) as e:
        # a non-finite loss is the global batch's: under torchrun every rank stops at that step, rank 0 says it
        if not isinstance(e, FloatingPointError) or int(os.environ.get("RANK", 0)) == 0:
            print(f"cma {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from cma_train.distributed import FailedElsewhere, nccl_shared_memory_error   # torch is loaded by now
        if isinstance(e, FailedElsewhere):   # torchrun: the rank that failed says why
            return 2
        from cma_model.data import loader_error   # a data-loading worker that died, noticed during a step
        said = loader_error(e) or nccl_shared_memory_error(e)   # torchrun in a container
        if said is None:
            raise
        print(f"cma {args.command}: error: {said}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:   # SIGINT / SIGTERM / SIGHUP in training: checkpointed after a step
        if int(os.environ.get("RANK", 0)) == 0:
            hint = "continue with the same command and --resume" if args.command == "train" else "run it again"
            print(f"cma {args.command}: {stopped}\n{hint}", file=sys.stderr)
        _close_process_group()   # every rank stopped after the same step: they leave the group together
        return 128 + stopped.signum
    except KeyboardInterrupt:   # a second Ctrl-C in training, or one in eval / prepare / demo
        print(f"\ncma {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _close_process_group():
    """torchrun runs: leave the process group the trainer opened (torch warns at exit otherwise).
    Only after a command that finished, or that a signal stopped cleanly (every rank then stops after
    the same step): destroying an NCCL group while other ranks still wait in a collective for this one
    (its loader hung, its disk is full) can block for good, so a rank that fails alone exits without."""
    dist = sys.modules.get("torch.distributed")   # not imported: no group to leave (and no torch to load)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
