"""The GPU check's scripts, on the CPU: ``benchmarks/gpu_cost_model.py`` prices its cases as
derived by hand and runs end to end; ``benchmarks/offline_wheelhouse.py`` trims a wheel and
its RECORD alike."""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from hierarchical_ap.cluster import DeviceSpec
from hierarchical_ap.cost_model import GPU_MATMUL_EFFICIENCY, GPU_MEMORY_EFFICIENCY

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


gpu_cost_model = _script("gpu_cost_model")
offline_wheelhouse = _script("offline_wheelhouse")


def test_a_gemm_is_priced_at_its_flops_over_the_derated_peak():
    m, k, n = 8192, 8192, 8192
    h200 = DeviceSpec.preset("H200")
    forward, step = gpu_cost_model.predicted_seconds(
        gpu_cost_model.gemm_case(m, k, n), h200, torch.bfloat16
    )
    compute = 2 * m * k * n / (h200.peak_flops_bf16 * GPU_MATMUL_EFFICIENCY)
    memory = 2 * (m * k + k * n + m * n) / (h200.hbm_bandwidth * GPU_MEMORY_EFFICIENCY)
    assert compute > memory  # compute-bound: the roofline's max is the FLOPs term
    assert forward == pytest.approx(compute, rel=1e-6)
    # the backward is the weight's gradient alone: one more GEMM of the same size
    assert step == pytest.approx(2 * compute, rel=1e-6)


def test_attention_prices_its_attention_node_alone():
    b, h, s, d = 4, 32, 2048, 128
    h200 = DeviceSpec.preset("H200")
    forward, step = gpu_cost_model.predicted_seconds(
        gpu_cost_model.attention_case(b, h, s, d), h200, torch.bfloat16
    )
    # QKᵀ and PV: 2·(2·b·h·s²·d) FLOPs forward, twice that backward (the profiler's count
    # takes no causal discount)
    flops = 4 * b * h * s * s * d
    peak = h200.peak_flops_bf16 * GPU_MATMUL_EFFICIENCY
    assert forward == pytest.approx(flops / peak, rel=1e-6)
    assert step == pytest.approx(3 * flops / peak, rel=1e-6)


def test_the_cpu_smoke_run_writes_a_row_per_case(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--quick", "--dtype", "fp32", "--reps", "3", "--warmup", "1"]
    assert gpu_cost_model.main([*argv, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"] for r in rows] == [c.name for c in gpu_cost_model.cases(quick=True)]
    for row in rows:
        assert row["measured_forward_ms"] > 0 and row["measured_step_ms"] > 0
        assert 0 < row["predicted_forward_ms"] < row["predicted_step_ms"]
        assert row["ratio"] == pytest.approx(row["measured_step_ms"] / row["predicted_step_ms"])
    assert "measured / predicted" in capsys.readouterr().out


def test_a_gpu_run_without_cuda_is_refused_naming_the_fix(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit):
        gpu_cost_model.main(["--device", "cuda"])
    assert "--device cpu" in capsys.readouterr().err


def test_trimming_drops_the_folders_and_their_record_lines(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    members = {
        "pkg/__init__.py": "x = 1\n",
        "pkg/jars/big.jar": "j" * 1000,
        "pkg/keep/data.txt": "kept\n",
    }
    record = "".join(f"{name},sha256=0,1\n" for name in members) + "pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
        archive.writestr("pkg-1.0.dist-info/RECORD", record)
    saved = offline_wheelhouse.trim(wheel, ("pkg/jars/",))
    assert saved > 0
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        kept_record = archive.read("pkg-1.0.dist-info/RECORD").decode()
        assert archive.read("pkg/keep/data.txt") == b"kept\n"
    assert names == {"pkg/__init__.py", "pkg/keep/data.txt", "pkg-1.0.dist-info/RECORD"}
    assert "pkg/jars" not in kept_record and "pkg/keep/data.txt" in kept_record
    assert offline_wheelhouse.trim(wheel, ()) == 0


def test_a_package_not_installed_here_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="not installed here.*make install"):
        offline_wheelhouse.download("no-such-package-hap", "3.12", tmp_path)
    assert not list(tmp_path.iterdir())  # nothing downloaded
