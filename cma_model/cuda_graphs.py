"""CUDA graphs for the towers' training calls, in eager mode (no torch.compile).

A ViT-B/32 training step with fused adapters launches over a thousand kernels. On an H200 the GPU
ran kernels 57% of the step and waited for the host the rest (benchmarks/results/train_step_*
nvidia-h200_2026-11-30: 62.6 ms per step, 35.5 of them busy). A CUDA graph replays a recorded
sequence of kernels for the cost of one launch. graph_towers() makes each tower's training call
(gradients on, tower in training mode) replay two graphs recorded by
torch.cuda.make_graphed_callables: its forward, and its backward with the adapters' weight
gradients; a call without gradients in training mode (the pass of --micro-batch that embeds the
whole batch) replays a forward graph of its own. The fused Triton kernels are recorded as they
are; nothing is compiled.

Graphs are recorded only inside `recording(model)`, from calls of the shapes the training step will
make: a recording breaks if another thread uses CUDA meanwhile (a DataLoader's pin-memory thread),
so `cma train` records before its loader starts (cma_train.step.record_cuda_graphs). Afterwards a
training call of shapes, dtypes or autocast state not recorded runs the tower's own forward, said
once; so do calls in eval mode (evaluation, inference), and calls without gradients not recorded
(not said).

What a replay assumes, and how it is kept:
- the inputs are copied into the recorded input buffers, the outputs are the recorded output
  buffers: the next replay of that shape overwrites them (a training step uses them before that;
  a call without gradients gets copies);
- a forward is followed by its backward before the tower's next call (of any shape, with or
  without gradients: they share memory): that call would overwrite the activations the backward
  reads. RuntimeError instead;
- the tower's parameters stay in the same memory (optimizers update them in place): checked at
  every call, RuntimeError otherwise (record again: release_graphs, recording). Parameters or
  blocks replaced by new ones are not seen: record again after changing the model;
- the cast copies of frozen parameters (frozen_block.cast_frozen) stay: the graphs hold them;
- a tower's graphs share one memory pool, recorded in the order they are replayed (those without
  gradients, then each forward and its backward): the activations of one shape reuse the memory
  of another's;
- gradients arrive in the recorded gradient buffers: autograd keeps the first one as .grad, so
  zero them with set_to_none=True each step (cma_train.step copies them out under --micro-batch).
"""
import contextlib
import sys
import weakref

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map_only

from cma_model import frozen_block

_TENSOR = object()   # a tensor's slot in a recorded call's argument template


def text_transformer(model):
    """The text tower's transformer of an open_clip CLIP or CustomTextCLIP model."""
    return model.transformer if hasattr(model, "transformer") else model.text.transformer


def graph_towers(model):
    """Make the vision tower and the text transformer of an open_clip model replay CUDA graphs in
    training calls, once recorded (`recording`). Parameter names do not change: adapter
    checkpoints still fit. Not together with torch.compile (its "reduce-overhead" mode records
    graphs of its own). The graphs replay the model as it was recorded: after changing it (the
    adapters' backend, blocks, parameters replaced), release_graphs and record again. Returns the
    model."""
    for tower in (model.visual, text_transformer(model)):
        if getattr(tower, "_compiled_call_impl", None) is not None:
            raise ValueError("graph_towers: the towers are compiled (torch.compile's reduce-overhead mode records "
                             "CUDA graphs itself); use one or the other")
        if not isinstance(tower.__dict__.get("forward"), GraphedForward):
            tower.forward = GraphedForward(tower)
    return model


def graphed(tower) -> "GraphedForward | None":
    """The GraphedForward that graph_towers put on this tower, or None."""
    forward = tower.__dict__.get("forward")
    return forward if isinstance(forward, GraphedForward) else None


def _graphed_towers(model):
    towers = [graphed(model.visual), graphed(text_transformer(model))]
    if None in towers:
        raise ValueError("the model's towers are not graphed: call graph_towers(model) first")
    return towers


@contextlib.contextmanager
def recording(model):
    """Within it, a training call of the graphed towers (graph_towers) whose shapes were not
    recorded yet records its graphs (a few eager calls first, then the recording: a second or so
    per tower on a GPU). No other thread may use CUDA meanwhile. The eager calls give their memory
    back (torch.cuda.empty_cache) before the recording takes its own: about a step's activations,
    which the graphs keep."""
    towers = _graphed_towers(model)
    for tower in towers:
        tower.recording = True
    try:
        yield
    finally:
        for tower in towers:
            tower.recording = False
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def release_graphs(model):
    """Drop every graph the towers recorded, and the memory they hold: the towers run eager until
    graphs are recorded again. Returns how many (forward + backward pairs) were dropped: 0 for a
    model whose towers are not graphed."""
    dropped = 0
    for tower in filter(None, (graphed(model.visual), graphed(text_transformer(model)))):
        dropped += len(tower.graphs)
        tower.graphs.clear()
        tower.pool = None
    return dropped


def replays_fixed_shapes(tower) -> bool:
    """Whether `tower` wants one input shape per call: it is compiled, or this call (training mode,
    with or without gradients) replays or records CUDA graphs. cma_model.retrieval.encode_frames
    then feeds it every frame slot, padded ones included."""
    if getattr(tower, "_compiled_call_impl", None) is not None:
        return True
    forward = graphed(tower)
    if forward is None or not tower.training:
        return False
    grad = torch.is_grad_enabled()
    return forward.recording or any(key[0] == ("grad", grad) for key in forward.graphs)


class GraphedForward:
    """tower.forward under graph_towers: calls in training mode replay the graphs recorded for their
    signature (gradients on or off; tensor shapes, dtypes, devices, requires_grad; the other
    arguments; the autocast state); other calls run type(tower).forward."""

    def __init__(self, tower):
        self.tower = tower
        self.graphs = {}          # signature -> _Recorded
        self.pool = None          # the memory pool every graph of this tower records into
        self.recording = False
        self.unrecorded = set()   # signatures said to run eager
        self.pending = _nothing_pending   # weakly, the _Backward of the last replayed forward

    def __call__(self, *args, **kwargs):
        tower = self.tower
        if not tower.training:
            return type(tower).forward(tower, *args, **kwargs)
        grad = torch.is_grad_enabled()
        key, template, tensors = _signature(args, kwargs)
        recorded = self.graphs.get(key) if key is not None else None
        if recorded is None and key is not None and self.recording:
            recorded = self.graphs[key] = (_Recorded if grad else _RecordedForward)(tower, template, tensors, self)
        if recorded is None:
            if grad:   # a training step of a kind not recorded (without gradients: another use, not said)
                self._say_unrecorded(tower, key, tensors)
            return type(tower).forward(tower, *args, **kwargs)
        pending = self.pending()
        if pending is not None and not pending.ran:   # any shape, with or without gradients: they share the pool
            call = ("twice with gradients before the first call's" if grad
                    else "without gradients before the last call's")
            raise RuntimeError(f"CUDA graphs: {type(tower).__name__} was called {call} backward; the replay would "
                               f"overwrite the activations that backward reads (run backward in between, or call it "
                               f"without graphs)")
        out = recorded(tower, tensors)
        node = next((t.grad_fn for t in _tensors(out) if t.grad_fn is not None), None) if grad else None
        if node is not None:
            pending = _Backward()
            node.register_hook(pending)
            self.pending = weakref.ref(pending)
        return out

    def _say_unrecorded(self, tower, key, tensors):
        if self.graphs and key not in self.unrecorded:
            self.unrecorded.add(key)
            shapes = ", ".join(f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in tensors)
            print(f"note: CUDA graphs: {type(tower).__name__} got a training call ({shapes}) of a kind not recorded; "
                  f"it runs without graphs (recorded: {len(self.graphs)})", file=sys.stderr)


def _signature(args, kwargs):
    """(key, template, tensors) of a call: the key to look its graphs up by (None where an argument
    cannot be hashed), the arguments with _TENSOR for each tensor, and the tensors in order."""
    key, template, tensors = [("grad", torch.is_grad_enabled())], [], []   # first: replays_fixed_shapes reads it
    for name, value in [(None, a) for a in args] + sorted(kwargs.items()):
        if isinstance(value, torch.Tensor):
            key.append((name, tuple(value.shape), value.dtype, value.device, value.requires_grad))
            template.append((name, _TENSOR))
            tensors.append(value)
        else:
            key.append((name, value))
            template.append((name, value))
    key.append(("autocast", torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))
    try:
        hash(tuple(key))
    except TypeError:
        return None, template, tensors
    return tuple(key), template, tensors


class _Call(nn.Module):
    """The tower's own forward on positional tensors (what make_graphed_callables records), the
    other arguments filled in from the template. Its parameters are the tower's."""

    def __init__(self, tower, template):
        super().__init__()
        self.tower, self.template = tower, template

    def forward(self, *tensors):
        tensors, args, kwargs = iter(tensors), [], {}
        for name, value in self.template:
            value = next(tensors) if value is _TENSOR else value
            if name is None:
                args.append(value)
            else:
                kwargs[name] = value
        return type(self.tower).forward(self.tower, *args, **kwargs)


class _Recorded:
    """One signature's forward and backward graphs, and what they read that nothing else holds."""

    def __init__(self, tower, template, tensors, graphed_forward):
        samples = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)   # the input buffers
        self.call = _record(_Call(tower, template), samples, graphed_forward)
        self.hold(tower)

    def __call__(self, tower, tensors):
        self.check(tower)
        return self.call(*tensors)

    def hold(self, tower):
        """After the recording: the parameters' addresses it read, and the frozen casts it read."""
        self.params = list(tower.parameters())
        self.addresses = [p.data_ptr() for p in self.params]
        self.kept_casts = frozen_block.kept_casts(self.params)   # their memory must stay theirs

    def check(self, tower):
        if [p.data_ptr() for p in self.params] != self.addresses:   # 30 us for ViT-B/32's 296 (list(parameters()): 360)
            raise RuntimeError(f"CUDA graphs: a parameter of {type(tower).__name__} moved to other memory after its "
                               f"graphs were recorded; record them again (cma_model.cuda_graphs.release_graphs, "
                               f"then recording)")


class _RecordedForward(_Recorded):
    """One signature's forward graph for calls without gradients (the no-gradient pass of
    --micro-batch): the inputs are copied into its input buffers, and the caller gets copies of its
    output buffers (a pass over several chunks keeps every chunk's outputs)."""

    def __init__(self, tower, template, tensors, graphed_forward):
        self.inputs = tuple(t.detach().clone() for t in tensors)
        self.replay, self.outputs = _record_forward(_Call(tower, template), self.inputs, graphed_forward)
        self.hold(tower)

    def __call__(self, tower, tensors):
        self.check(tower)
        for buffer, t in zip(self.inputs, tensors):
            buffer.copy_(t)
        self.replay()
        return tree_map_only(torch.Tensor, torch.clone, self.outputs)


class _Backward:
    """A hook on a replayed forward's autograd node: it lives as long as the node does (until the
    backward ran, or the outputs were dropped), and knows whether the node's backward ran."""
    ran = False

    def __call__(self, grad_inputs, grad_outputs):
        self.ran = True


WARM_UP_CALLS = 3   # eager forward + backward calls before a recording (make_graphed_callables' default)


def _record(call, samples, graphed_forward):
    """torch.cuda.make_graphed_callables(call, samples) into the tower's memory pool. Returns the
    graphed call."""
    with _recording_setup(samples, graphed_forward) as pool:
        _warm_up(call, samples)
        return torch.cuda.make_graphed_callables(call, samples, num_warmup_iters=0, allow_unused_input=True, pool=pool)


def _record_forward(call, inputs, graphed_forward):
    """A CUDA graph of call(*inputs) without gradients, into the tower's memory pool: (replay, the
    outputs it writes)."""
    with _recording_setup(inputs, graphed_forward) as pool, torch.no_grad():
        _warm_up(call, inputs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = call(*inputs)
    return graph.replay, outputs


@contextlib.contextmanager
def _recording_setup(tensors, graphed_forward):
    """Within it: the tensors' GPU current, and the call's autocast without its cast cache (it would
    keep casts made outside the recording: make_graphed_callables refuses it). Yields the tower's
    memory pool, made at its first recording."""
    device = next((t.device for t in tensors if t.is_cuda), None)
    if device is None:
        raise ValueError("CUDA graphs record calls on CUDA tensors; this call has none")
    if graphed_forward.pool is None:
        graphed_forward.pool = torch.cuda.graph_pool_handle()
    cast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                          cache_enabled=False)
    with torch.cuda.device(device), cast:
        yield graphed_forward.pool


def _warm_up(call, samples):
    """make_graphed_callables' warm-up (eager calls on a side stream: lazy initialisation, Triton's
    compiling, before anything is recorded), done here so that its memory goes back to the GPU
    before the recording takes its own: within make_graphed_callables the warm-up's activations
    stay cached while the recording allocates a second set from its pool."""
    inputs = [t for t in (*samples, *call.parameters()) if t.requires_grad]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARM_UP_CALLS):
            outputs = [t for t in _tensors(call(*samples)) if t.requires_grad]
            if outputs:
                torch.autograd.grad(outputs, inputs, [torch.empty_like(t) for t in outputs], allow_unused=True)
            del outputs
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _nothing_pending():
    return None


def _tensors(out):
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
