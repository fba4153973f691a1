"""benchmarks/targets.py: the issues' targets read from result files (synthetic ones here, with
values on both sides of each bound; the real files come from a GPU run)."""
import random

import pytest

from cma_benchmarks import targets
from cma_benchmarks.common import write_results
from cma_train.cli import main as cli_main

DEVICE = "NVIDIA Test GPU"


def _info(date, commit="abc1234"):
    return {"device": DEVICE, "date": date, "commit": commit, "torch": "x", "complete": True}


def _adapter_rows(rng, fast):
    """bf16 and fp32 rows at the benchmark's shapes; fused inside every bound when fast."""
    rows = []
    for dtype in ("bfloat16", "float32"):
        for N, D in [(19200, 768), (153600, 768), (19200, 512)]:
            floor_fwd = N * D * 6 / 4.0e12 * 1e3
            fused_fwd = floor_fwd / (0.9 if fast else 0.5)
            rows.append({"N": N, "D": D, "dtype": dtype, "fused_fwd_ms": fused_fwd * rng.uniform(0.9, 1.0),
                         "fused_fwdbwd_ms": (2 if fast else 4) * fused_fwd, "eager_fwd_ms": 5 * fused_fwd,
                         "eager_fwdbwd_ms": 10 * fused_fwd, "compile_fwd_ms": 4 * fused_fwd,
                         "compile_fwdbwd_ms": 12 * fused_fwd if fast else 1.5 * fused_fwd,
                         "floor_fwd_ms": floor_fwd, "fused_fwd_pct_of_copy_bw": 100 * floor_fwd / fused_fwd})
    return rows


def _step_rows(rng, fused_ratio):
    rows = []
    for arch in ("ViT-B-32", "ViT-B-16"):
        full = rng.uniform(50, 150)
        for variant, ratio in (("full", 1.0), ("floor", 0.77), ("fused_adapters", fused_ratio)):
            rows.append({"arch": arch, "variant": variant, "step_ms": full * ratio, "peak_GiB": 9.0 * ratio,
                         "step_vs_full": ratio, "step_vs_floor": ratio / 0.77, "mem_vs_full": ratio,
                         "encode_vs_plain": 1.0 + (fused_ratio - 0.6)})
    return rows


def _table(out):
    """{target: "yes" or "NO"} from targets.py's printed table."""
    return {line[7:].rsplit(None, 3)[0].strip(): line.split()[-1] for line in out.splitlines() if line.startswith("#")}


@pytest.mark.parametrize("fast", [True, False])
def test_targets_table_reads_the_newest_results(tmp_path, capsys, fast):
    rng = random.Random(7)
    slug = "nvidia-test-gpu"
    write_results(tmp_path, f"adapter_{slug}_2026-01-01", _info("2026-01-01"), _adapter_rows(rng, not fast))  # older
    write_results(tmp_path, f"adapter_{slug}_2026-02-01", _info("2026-02-01"), _adapter_rows(rng, fast))
    write_results(tmp_path, f"adapter_smoke_{slug}_2026-03-01", _info("2026-03-01"), _adapter_rows(rng, not fast))
    write_results(tmp_path, f"train_step_{slug}_2026-02-01", _info("2026-02-01"), _step_rows(rng, 0.5 if fast else 0.9))
    write_results(tmp_path, f"train_step_words32_{slug}_2026-02-01", _info("2026-02-01"), _step_rows(rng, 0.1))
    write_results(tmp_path, f"train_step_fp16_{slug}_2026-02-01", _info("2026-02-01"), _step_rows(rng, 0.1))
    compiled = [r for r in _step_rows(rng, 0.45) if r["arch"] == "ViT-B-32" and r["variant"] != "floor"]
    compiled.append(dict(compiled[-1], variant="fused_compile-default"))   # as gpu_check's compiled run
    write_results(tmp_path, f"train_step_compile-default_{slug}_2026-02-01", _info("2026-02-01"), compiled)

    assert targets.main(["--results", str(tmp_path), "--device", DEVICE]) == 0
    out = capsys.readouterr().out
    assert "adapter_nvidia-test-gpu_2026-02-01.json" in out and "smoke" not in out and "words32" not in out
    assert "fp16" not in out   # the targets are bf16's
    capsys.readouterr()
    targets.main(["--results", str(tmp_path), "--device", DEVICE])
    table = _table(capsys.readouterr().out)
    expected = "yes" if fast else "NO"
    for what in ("fused fwd ms, bf16 153600x768", "fused fwdbwd ms, bf16 19200x768",
                 "fused fwd % of copy bandwidth, bf16 153600x768",
                 "shapes where fused is slower than eager or compile",
                 "ViT-B-32 fused_adapters step_vs_full", "ViT-B-16 fused_adapters mem_vs_full",
                 "ViT-B-32 fused_adapters step_vs_floor", "ViT-B-32 fused_adapters encode_vs_plain"):
        assert table[what] == expected, (what, table)
    assert table["ViT-B-32 fused_compile-default step_vs_full"] == "yes"   # only the compiled run has it
    assert "ViT-B-32 full step_vs_full" not in table
    assert cli_main(["bench", "--targets", "--results", str(tmp_path), "--device", DEVICE]) == 0   # the same table
    assert _table(capsys.readouterr().out) == table


def test_shapes_a_time_budget_skipped_keep_never_slower_unmet(tmp_path, capsys):
    """All measured shapes fast, but two left out by bench_adapter --budget-s: "never slower than
    eager or compile at any benchmarked shape" is not shown, so it is not met; the rest are."""
    rows = _adapter_rows(random.Random(3), fast=True)
    info = dict(_info("2026-02-01"), complete=False, skipped=["float32 153600x768", "float32 19200x512"])
    write_results(tmp_path, "adapter_nvidia-test-gpu_2026-02-01", info, rows[:4])
    assert targets.main(["--results", str(tmp_path), "--device", DEVICE]) == 0
    out = capsys.readouterr().out
    assert "(cut short)" in out and "not measured (time budget): float32 153600x768, float32 19200x512" in out
    table = _table(out)
    assert table["shapes where fused is slower than eager or compile (2 not measured)"] == "NO"
    assert table["fused fwd ms, bf16 153600x768"] == "yes"


def test_the_op_targets_are_judged_on_the_gpu_time_alone_too(tmp_path, capsys):
    """A fwd+bwd bound missed as called (the host's launch time) but met replayed as a CUDA graph:
    both rows, each judged on its own time; rows without the replayed time get no such row."""
    rows = _adapter_rows(random.Random(5), fast=False)
    slow = next(r for r in rows if (r["dtype"], r["N"], r["D"]) == ("bfloat16", 19200, 768))
    slow["fused_fwdbwd_gpu_ms"] = 0.1 * random.uniform(0.5, 0.99)   # bound 0.10 ms
    slow["fused_fwd_gpu_ms"] = slow["fused_fwd_ms"]                  # as called, the bound missed
    write_results(tmp_path, "adapter_nvidia-test-gpu_2026-02-01", _info("2026-02-01"), rows)
    assert targets.main(["--results", str(tmp_path), "--device", DEVICE]) == 0
    table = _table(capsys.readouterr().out)
    assert table["fused fwdbwd ms, bf16 19200x768"] == "NO"
    assert table["fused fwdbwd ms, bf16 19200x768, GPU alone"] == "yes"
    assert table["fused fwd ms, bf16 19200x768, GPU alone"] == table["fused fwd ms, bf16 19200x768"] == "NO"
    assert not any("153600x768, GPU alone" in what for what in table)


def test_targets_without_results_or_device(tmp_path, capsys, monkeypatch):
    assert targets.main(["--results", str(tmp_path), "--device", DEVICE]) == 1
    assert "no results for NVIDIA Test GPU" in capsys.readouterr().out
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit):
        targets.main(["--results", str(tmp_path)])
    assert "--device" in capsys.readouterr().err
