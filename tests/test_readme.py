"""The README's Python quick start runs as written, its `cma` commands parse, and its test command
is the one CI runs."""
import os
import re
import shlex

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
