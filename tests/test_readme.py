"""The README's Python quick start runs as written, its `cma` commands parse, and its test command
is the one CI runs."""
import os
import re
import shlex

from conftest import requires_decord

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    code = re.search(r"## Quick start\s+```python\n(.*?)```", _readme(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README quick start", "exec"), {})
    assert capsys.readouterr().out.split()[0] == "519168"
    assert os.path.getsize(tmp_path / "adapters.pt") < 2.2e6


@requires_decord
def test_search_example_runs_as_written_and_scores_as_open_clip_does(tmp_path, monkeypatch, capsys):
    """The second Python block (search with the quick start's adapters.pt) against open_clip's own
    encode_image / encode_text (full 77-token context) and the softmax pooling written out, fp32."""
    import torch

    from conftest import write_video
    blocks = re.findall(r"```python\n(.*?)```", _readme(), re.S)
    monkeypatch.chdir(tmp_path)
    write_video(tmp_path / "clip.mp4", num_frames=45, fps=10)   # 4.5 s: 5 frames at 1 frame/s, 7 slots padded
    scope = {}
    for code in blocks[:2]:
        exec(compile(code, "README", "exec"), scope)
    printed = capsys.readouterr().out.splitlines()[-1]
    model, frames, mask, tokens = scope["model"], scope["frames"][0], scope["mask"][0], scope["tokens"]
    assert mask.sum() == 5
    with torch.no_grad():
        frame_emb = model.encode_image(frames[mask])                                 # [5, E]
        text_emb = model.encode_text(torch.nn.functional.pad(tokens, (0, 77 - tokens.shape[1])))   # [2, E]
        weights = (text_emb @ frame_emb.T / 5.0).softmax(-1)                          # temperature 5
        expected = torch.nn.functional.cosine_similarity(text_emb, weights @ frame_emb, dim=-1)
    assert printed == str(scope["scores"][:, 0].tolist())
    torch.testing.assert_close(scope["scores"][:, 0], expected, rtol=1e-4, atol=1e-5)


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"^(pip install .*)$", _readme(), re.M)
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert commands[1] in f.read().splitlines()


def test_readme_cma_commands_parse():
    """Every `cma ...` line of the README's shell blocks names flags the command has."""
    from cma_train.cli import build_parser
    blocks = re.findall(r"```bash\n(.*?)```", _readme(), re.S)
    lines = [line.split("#")[0] for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("cma ")]
    assert [argv[0] for argv in commands] == ["prepare", "train", "eval"]
    for argv in commands:
        args, rest = build_parser().parse_known_args(argv)
        assert rest == [], (argv, rest)
