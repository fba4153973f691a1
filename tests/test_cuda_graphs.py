"""cma_model.cuda_graphs: which calls replay recorded graphs, what they are recorded from, and the
errors that keep a replay from reading the wrong memory. On the CPU the recording is a stand-in
that returns the call it was given (run eager), so every test here checks the wrapper's own
logic; tests marked gpu_check record real graphs and compare them with eager training."""
import contextlib
import copy

import pytest
import torch
from conftest import gpu_check, requires_cuda, tiny_train_model
from torch.utils._pytree import tree_leaves

import cma_model.cuda_graphs as cuda_graphs
from cma_model import frozen_block
from cma_model.cuda_graphs import graph_towers, recording, release_graphs
from cma_model.data import VideoFrames
from cma_model.retrieval import RetrievalForward, compile_towers, encode_text
from cma_train.config import TrainConfig
from cma_train.step import record_cuda_graphs, train_step

FRAMES, SIZE, WORDS = 3, 32, 12


def _model(device="cpu", precision="fp32"):
    model, cfg = tiny_train_model(device, pooling="meanP", max_words=WORDS, max_frames=FRAMES, precision=precision)
    return model.train(), cfg


def _batch(n, seed, device="cpu"):
    """n videos as the loader gives them (raw uint8 frames, one padded slot in the first video)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, FRAMES, dtype=torch.bool)
    mask[0, -1] = False
    frames = torch.randint(0, 256, (n, FRAMES, SIZE, SIZE, 3), dtype=torch.uint8, generator=g)
    frames *= mask[..., None, None, None]
    return {"frames": frames.to(device), "mask": mask.to(device),
            "tokens": torch.randint(1, 49000, (n, WORDS), generator=g).to(device)}


class Recordings(list):
    """(tower class, sample tensors) of each recording with gradients; .no_grad: those without."""
    no_grad: list


@pytest.fixture
def stand_in(monkeypatch):
    """The recording without a GPU: make_graphed_callables' place taken by the call itself (run
    once, as its warm-up does); a graph without gradients by a replay that runs the call on its
    input buffers and writes the results into its output buffers, as a CUDA graph does."""
    recorded = Recordings()
    recorded.no_grad = []

    def record(call, samples, graphed_forward):
        recorded.append((type(call.tower).__name__, samples))
        call(*samples)   # make_graphed_callables' warm-up: eager calls on the samples before the recording
        return call

    def record_forward(call, inputs, graphed_forward):
        recorded.no_grad.append((type(call.tower).__name__, inputs))
        outputs = call(*inputs)

        def replay():
            for buffer, result in zip(tree_leaves(outputs), tree_leaves(call(*inputs))):
                buffer.copy_(result)
        return replay, outputs
    monkeypatch.setattr(cuda_graphs, "_record", record)
    monkeypatch.setattr(cuda_graphs, "_record_forward", record_forward)
    return recorded


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_recorded_calls_give_the_towers_own_outputs_and_gradients(stand_in):
    """Recording one shape records each tower once, from copies of the inputs (the graphs' input
    buffers), not the caller's tensors; later training calls of that shape go through the
    recorded call, which rebuilds the tower's arguments (the text transformer's causal attn_mask
    keyword included) and gives exactly the unwrapped model's outputs and adapter gradients on
    fresh batches."""
    plain, _ = _model()
    model = graph_towers(copy.deepcopy(plain))
    frames = VideoFrames(max_frames=FRAMES, size=SIZE, raw=True)
    with recording(model):
        b = _batch(4, seed=1)
        given = frames.to_model_input(b["frames"], "cpu")
        RetrievalForward(model)(given, b["mask"], b["tokens"])
    assert [name for name, _ in stand_in] == ["VisionTransformer", "Transformer"]
    (_, (images,)), (_, (text_x, attn_mask)) = stand_in
    assert images.untyped_storage().data_ptr() != given.untyped_storage().data_ptr()
    torch.testing.assert_close(images, given.flatten(0, 1), rtol=0, atol=0)
    assert images.shape == (4 * FRAMES, 3, SIZE, SIZE)   # every frame slot, padded ones too: one shape per step
    assert text_x.shape[:2] == (4, WORDS) and attn_mask.shape == (WORDS, WORDS)
    replays = []
    for tower in (model.visual, model.transformer):
        recorded = next(iter(tower.forward.graphs.values()))
        call = recorded.call
        recorded.call = lambda *t, call=call: replays.append(1) or call(*t)
    for seed in (2, 3):
        b = _batch(4, seed)
        for m in (plain, model):
            m.zero_grad(set_to_none=True)
            fwd = RetrievalForward(m)
            out = fwd(frames.to_model_input(b["frames"], "cpu"), b["mask"], b["tokens"])
            (out[0].square().sum() + out[1].square().sum()).backward()
            if m is plain:
                want, want_grads = out, _grads(m)
        torch.testing.assert_close(out[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[1], want[1], rtol=1e-5, atol=1e-6)
        got_grads = _grads(model)
        for n in want_grads:
            torch.testing.assert_close(got_grads[n], want_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert len(replays) == 4 and len(stand_in) == 2   # 2 steps x 2 towers, nothing recorded again


def test_calls_of_another_kind_run_eager_and_a_new_shape_is_said_once(stand_in, capsys):
    """Evaluation (eval mode), calls without gradients and training calls of a shape not recorded
    run the tower's own forward; the last is said once per shape, on stderr."""
    model, _ = _model()
    graph_towers(model)
    with recording(model):
        encode_text(model, _batch(4, seed=1)["tokens"])
    recorded = next(iter(model.transformer.forward.graphs.values()))
    replays, call = [], recorded.call
    recorded.call = lambda *t: replays.append(1) or call(*t)
    tokens = _batch(4, seed=2)["tokens"]
    with torch.no_grad():
        encode_text(model, tokens)
    model.eval()
    encode_text(model, tokens)
    model.train()
    assert replays == [] and capsys.readouterr().err == ""
    for _ in range(2):
        encode_text(model, _batch(3, seed=3)["tokens"])
    said = capsys.readouterr().err
    assert said.count("note: CUDA graphs: Transformer got a training call ([3, 12, 48] float32") == 1, said
    encode_text(model, tokens)
    assert replays == [1] and len(stand_in) == 1


def test_a_second_forward_before_backward_is_refused(stand_in):
    """A forward's activations live in the graphs' memory until its backward: replaying the tower
    again in between (the same shape, or another one recorded into the same memory pool) would
    overwrite them, so it raises; forward, backward, forward runs, and so does a forward after
    one whose outputs were dropped (no backward will come)."""
    model, _ = _model()
    graph_towers(model)
    short, long = _batch(2, seed=1)["tokens"], _batch(3, seed=1)["tokens"]
    with recording(model):
        encode_text(model, short).sum().backward()
        encode_text(model, long).sum().backward()
    for other in (short, long):
        first = encode_text(model, short)
        with pytest.raises(RuntimeError, match="called twice with gradients before the first call's backward"):
            encode_text(model, other)
        first.sum().backward()
    encode_text(model, long).sum().backward()
    encode_text(model, short)   # dropped at once
    encode_text(model, long)


def test_a_parameter_moved_after_recording_is_refused_until_recorded_again(stand_in):
    """A graph reads each parameter at its recorded address: one moved to new memory raises;
    release_graphs, then a new recording, runs again."""
    model, _ = _model()
    graph_towers(model)
    tokens = _batch(2, seed=1)["tokens"]
    with recording(model):
        encode_text(model, tokens)
    block = model.transformer.resblocks[0]
    block.adapter_attn.w_down.data = block.adapter_attn.w_down.data.clone()
    with pytest.raises(RuntimeError, match="moved to other memory"):
        encode_text(model, tokens)
    assert release_graphs(model) == 1   # the text transformer's one signature (the visual tower recorded none)
    encode_text(model, tokens)          # eager now, said nothing: no graphs to miss
    with recording(model):
        encode_text(model, tokens)
    encode_text(model, tokens).sum().backward()
    assert len(stand_in) == 2


def test_the_graphs_hold_the_frozen_casts_they_read(stand_in):
    """The lean blocks' norms read bf16 copies of their fp32 weights (frozen_block.cast_frozen)
    where the residual stream is bf16 (the vision tower under CPU autocast); an inference-mode call
    replaces the kept copy, which would free the one the graph reads: the recording holds every
    copy it was made with."""
    model, _ = _model()
    graph_towers(model)
    frames, b = VideoFrames(max_frames=FRAMES, size=SIZE, raw=True), _batch(2, seed=1)
    images = frames.to_model_input(b["frames"], "cpu")
    with recording(model), torch.autocast("cpu", dtype=torch.bfloat16):
        RetrievalForward(model)(images, b["mask"], b["tokens"])
    blocks = model.visual.transformer.resblocks
    norms = [p for block in blocks for ln in (block.ln_1, block.ln_2) for p in ln.parameters()]
    copies = [frozen_block._frozen_casts[p][1] for p in norms]
    assert all(c.dtype == torch.bfloat16 for c in copies)
    held = next(iter(model.visual.forward.graphs.values())).kept_casts
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        RetrievalForward(model)(images, b["mask"], b["tokens"])
    assert all(frozen_block._frozen_casts[p][1] is not c for p, c in zip(norms, copies))   # replaced
    assert all(any(h is c for h in held) for c in copies)


def test_graphs_and_compile_exclude_each_other():
    model, _ = _model()
    graph_towers(model)
    with pytest.raises(ValueError, match="use one or the other"):
        compile_towers(model)
    other, _ = _model()
    compile_towers(other)
    with pytest.raises(ValueError, match="use one or the other"):
        graph_towers(other)
    with pytest.raises(ValueError, match="--cuda-graphs with --compile default: use one or the other"):
        TrainConfig(pretrained="none", compile="default", cuda_graphs=True).validate()
    with pytest.raises(ValueError, match="--cuda-graphs needs a CUDA GPU"):
        TrainConfig(pretrained="none", device="cpu", cuda_graphs=True).validate()


@pytest.mark.parametrize("micro_batch,sizes", [(0, [6]), (4, [4, 2]), (3, [3]), (8, [6])])
def test_the_trainer_records_the_shapes_its_steps_use(stand_in, capsys, micro_batch, sizes):
    """record_cuda_graphs records from blank batches of the run's VideoFrames the shapes train_step
    then calls the towers with (the whole local batch, or its micro-batch chunks): training steps
    on loader-like batches replay them, none runs eager (said on stderr), and the recording left
    no gradient behind."""
    model, cfg = _model()
    cfg.micro_batch = micro_batch
    graph_towers(model)
    frames = VideoFrames(max_frames=FRAMES, size=SIZE, raw=True)
    forward = RetrievalForward(model)
    assert record_cuda_graphs(forward, cfg, torch.device("cpu"), frames, WORDS, local_batch=6) == sizes
    assert len(stand_in) == 2 * len(sizes)
    chunked = 0 < micro_batch < 6   # the no-gradient pass over the chunks: recorded too
    assert [len(inputs[0]) for tower, inputs in stand_in.no_grad if tower == "VisionTransformer"] == \
        ([n * FRAMES for n in sizes] if chunked else [])
    assert all(p.grad is None for p in model.parameters())
    capsys.readouterr()
    for seed in (1, 2):
        model.zero_grad(set_to_none=True)
        train_step(forward, model.logit_scale, _batch(6, seed), cfg, torch.device("cpu"), frames.to_model_input)
    assert "note: CUDA graphs" not in capsys.readouterr().err
    assert len(stand_in) == 2 * len(sizes) and len(stand_in.no_grad) == (2 * len(sizes) if chunked else 0)


def test_the_no_gradient_pass_of_micro_batches_replays_its_own_graphs(stand_in):
    """--micro-batch 2 over 5 videos (chunks 2, 2, 1): the pass that embeds the whole batch without
    gradients replays graphs of its own, fed each chunk's inputs and giving each chunk its own
    outputs (a later replay of the same shape must not change an earlier chunk's), so the loss and
    the adapter gradients are the unwrapped model's; such a call before the backward of a replayed
    call with gradients raises (it would overwrite that call's activations)."""
    plain, cfg = _model()
    cfg.micro_batch = 2
    model = graph_towers(copy.deepcopy(plain))
    frames = VideoFrames(max_frames=FRAMES, size=SIZE, raw=True)
    forward = RetrievalForward(model)
    record_cuda_graphs(forward, cfg, torch.device("cpu"), frames, WORDS, local_batch=5)
    assert len(stand_in.no_grad) == 4   # 2 shapes x 2 towers
    replays = []
    for tower in (model.visual, model.transformer):
        for recorded in tower.forward.graphs.values():
            if isinstance(recorded, cuda_graphs._RecordedForward):
                replay = recorded.replay
                recorded.replay = lambda replay=replay: replays.append(1) or replay()
    for seed in (1, 2):
        batch = _batch(5, seed)
        losses = []
        for m in (plain, model):
            m.zero_grad(set_to_none=True)
            losses.append(train_step(RetrievalForward(m), m.logit_scale, batch, cfg, torch.device("cpu"),
                                     frames.to_model_input))
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
        want, got = _grads(plain), _grads(model)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)
    assert len(replays) == 2 * 3 * 2   # steps x chunks x towers
    with torch.no_grad():   # the tower itself, twice at one recorded shape: the first outputs stay its own
        images = [torch.randn(2 * FRAMES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) for i in (4, 5)]
        outputs = [model.visual(x) for x in images]
        for x, out in zip(images, outputs):
            torch.testing.assert_close(out, plain.visual(x), rtol=1e-5, atol=1e-6)
    assert len(replays) == 2 * 3 * 2 + 2
    b = _batch(2, seed=3)
    first = forward(frames.to_model_input(b["frames"], "cpu"), b["mask"], b["tokens"])
    with torch.no_grad(), pytest.raises(RuntimeError, match="without gradients before the last call's backward"):
        forward(frames.to_model_input(b["frames"], "cpu"), b["mask"], b["tokens"])
    (first[0].sum() + first[1].sum()).backward()
    with torch.no_grad():
        forward(frames.to_model_input(b["frames"], "cpu"), b["mask"], b["tokens"])


def test_a_failed_recording_says_to_train_without_graphs(monkeypatch):
    """An error inside a recording (here the one CUDA gives for a call a capture forbids) stops the
    set-up with the way out; out of memory, with the flags that help."""
    model, cfg = _model()
    graph_towers(model)
    frames, forward = VideoFrames(max_frames=FRAMES, size=SIZE, raw=True), RetrievalForward(model)
    error = RuntimeError("CUDA error: operation not permitted when stream is capturing")
    monkeypatch.setattr(cuda_graphs, "_record", lambda *a: (_ for _ in ()).throw(error))
    with pytest.raises(RuntimeError, match="(?s)for 6 videos per pass failed: CUDA error: operation not permitted"
                       ".*train without --cuda-graphs") as raised:
        record_cuda_graphs(forward, cfg, torch.device("cpu"), frames, WORDS, local_batch=6)
    assert raised.value.__cause__ is error
    monkeypatch.setattr(cuda_graphs, "_record", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("no")))
    with pytest.raises(torch.OutOfMemoryError, match="pass a smaller --micro-batch, or leave out --cuda-graphs"):
        record_cuda_graphs(forward, cfg, torch.device("cpu"), frames, WORDS, local_batch=6)
    assert all(not t.forward.graphs for t in (model.visual, model.transformer))


def _train_steps(model, cfg, device, frames, steps, graphs):
    """Losses of `steps` AdamW steps on fresh batches of 4 videos, and the last step's adapter
    gradients."""
    forward = RetrievalForward(model)
    if graphs:
        graph_towers(model)
        record_cuda_graphs(forward, cfg, device, frames, WORDS, local_batch=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    losses = []
    for seed in range(steps):
        opt.zero_grad(set_to_none=True)
        batch = _batch(4, seed + 10, device)
        losses.append(train_step(forward, model.logit_scale, batch, cfg, device, frames.to_model_input).item())
        grads = _grads(model)
        opt.step()
    return losses, grads


@gpu_check
@requires_cuda
@pytest.mark.parametrize("micro_batch", [0, 3])
def test_cuda_graph_training_follows_eager_training(micro_batch):
    """Real CUDA graphs (fused adapters, bf16 autocast) against the same model eager: 4 AdamW steps
    on fresh batches, whole and in micro-batches of 3 + 1 (two shapes, each recorded with and
    without gradients, sharing one memory pool): the same losses within 2e-2 relative, and the last
    step's adapter gradients within 5e-2 of each one's norm (bf16 noise; the kernels are the same,
    so the two should differ by little more than the attention backward's atomics)."""
    device = torch.device("cuda")
    frames = VideoFrames(max_frames=FRAMES, size=SIZE, raw=True)
    results = []
    for graphs in (False, True):
        model, cfg = _model(device, precision="bf16")
        cfg.micro_batch = micro_batch
        results.append(_train_steps(model, cfg, device, frames, steps=4, graphs=graphs))
        if graphs:
            assert all(len(t.forward.graphs) == (4 if micro_batch else 1)   # 3 + 1, with and without gradients
                       for t in (model.visual, model.transformer))
    (want_losses, want), (got_losses, got) = results
    for a, b in zip(want_losses, got_losses):
        assert abs(a - b) <= 2e-2 * abs(a), (want_losses, got_losses)
    assert got.keys() == want.keys()
    for n in want:
        err = ((got[n] - want[n]).norm() / want[n].norm()).item()
        assert err <= 5e-2, (n, err)


@gpu_check
@requires_cuda
def test_recording_reserves_about_one_calls_memory():
    """The warm-up gives its memory back before the recording takes its own: recording the vision
    tower of ViT-B/32 (fused adapters, bf16 autocast, 48 images) reserves at most 1.4x what one eager
    training call of it reserves. make_graphed_callables' own warm-up keeps its activations cached
    while the recording allocates a second set from the graphs' pool: about 2x."""
    import open_clip

    from cma_model import add_cross_modal_adapters
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = add_cross_modal_adapters(open_clip.create_model("ViT-B-32").to(device)).train()
    graph_towers(model)
    images = torch.randn(48, 3, 224, 224, device=device)

    def reserved_by_one_call(record):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_reserved()
        with recording(model) if record else contextlib.nullcontext(), torch.autocast("cuda", torch.bfloat16):
            model.visual(images).float().square().sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_reserved() - before

    eager = reserved_by_one_call(record=False)
    recorded = reserved_by_one_call(record=True)
    assert len(model.visual.forward.graphs) == 1
    assert eager > 2 ** 28 and recorded <= 1.4 * eager, (eager / 2 ** 20, recorded / 2 ** 20)
