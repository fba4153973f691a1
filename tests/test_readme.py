"""The README's Python quick start runs as written, and its test command is the one CI runs."""
import os
import re

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
