"""`hap profile` end to end through the console entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hierarchical_ap.cli import main


def test_profile_json_has_the_documented_keys(capsys):
    assert main(["profile", "--model", "gpt-tiny", "--batch", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("params", "train_flops", "forward_flops", "layers", "capture_time_s"):
        assert key in report
    assert report["train_flops"] == report["forward_flops"] + report["backward_flops"]
    assert report["params"] > 0
    assert [layer["name"] for layer in report["layers"]][-1] == "head"
    assert all(
        {"name", "params", "forward_flops", "saved_activation_bytes"} <= set(layer)
        for layer in report["layers"]
    )


def test_profile_bf16_halves_activation_bytes(capsys):
    main(["profile", "--model", "llama-tiny", "--batch", "2", "--json"])
    fp32 = json.loads(capsys.readouterr().out)
    main(["profile", "--model", "llama-tiny", "--batch", "2", "--dtype", "bf16", "--json"])
    bf16 = json.loads(capsys.readouterr().out)
    assert bf16["train_flops"] == fp32["train_flops"]
    assert bf16["param_bytes"] * 2 == fp32["param_bytes"]
    # the loss upcasts the logits to fp32, so the saving is less than half on a tiny model
    assert bf16["saved_activation_bytes"] < 0.75 * fp32["saved_activation_bytes"]


def test_profile_table_output():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hierarchical_ap.cli",
            "profile",
            "--model",
            "gpt-tiny",
            "--batch",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "training FLOPs / step" in result.stdout
    assert "blocks.0 … blocks.1" in result.stdout


@pytest.mark.parametrize(
    "argv,message",
    [
        (["profile", "--model", "gpt-nope", "--batch", "1"], "unknown"),
        (
            ["profile", "--model", "gpt:layers=2,hidden=65,heads=4,vocab=10,seq=8", "--batch", "1"],
            "hidden",
        ),
    ],
)
def test_profile_bad_model_spec_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("hap: error:")
    assert message in err


SIMULATE = [
    "simulate",
    "--model",
    "gpt:layers=2,hidden=512,heads=8,vocab=1024,seq=64",
    "--cluster",
    "2x4xA100-80GB",
    "--global-batch",
    "16",
    "--tp",
    "1",
    "--pp",
    "1",
    "--dp",
    "8",
    "--micro-batch-size",
    "2",
    "--json",
]


def test_simulate_zero3_shards_large_parameters_over_the_data_parallel_axis(capsys):
    """With ``--zero 3`` every weight of at least 10^5 elements is stored sharded on mesh axis 0
    (DeepSpeed's persistence threshold keeps the smaller ones whole); without it the ILP, with
    memory to spare, replicates them."""
    assert main([*SIMULATE, "--zero", "3"]) == 0
    zero3 = json.loads(capsys.readouterr().out)
    assert main(SIMULATE) == 0
    free = json.loads(capsys.readouterr().out)
    (stage,) = zero3["stages"]
    big = {"blocks.0.mlp.up_proj.weight", "blocks.0.attn.qkv_proj.weight"}
    assert big <= stage["param_placements"].keys()
    for name in big:
        assert stage["param_placements"][name][0].startswith("S(")
        assert free["stages"][0]["param_placements"][name][0] == "R"
    assert stage["param_placements"]["blocks.0.attn_norm.weight"][0] == "R"
    assert "ZeRO-3 over the data-parallel axis" in zero3["notes"]
    assert zero3["peak_memory_bytes_per_device"] < free["peak_memory_bytes_per_device"]


def test_simulate_zero3_list_collectives_cost_more_and_need_zero3(capsys):
    """``--zero-list-collectives`` adds DeepSpeed 2021's per-rank gather work to ZeRO-3's
    collectives (never less time: every sharding costs at least what it did); without ``--zero 3`` it is an error naming the fix. (Micro-batches of
    8 fp32 sequences, so that the ILP gathers the weights rather than splitting them over axis
    0.)"""
    data_parallel = list(SIMULATE)
    data_parallel[data_parallel.index("--global-batch") + 1] = "64"
    data_parallel[data_parallel.index("--micro-batch-size") + 1] = "8"
    data_parallel += ["--precision", "fp32"]
    assert main([*data_parallel, "--zero", "3"]) == 0
    tensor = json.loads(capsys.readouterr().out)
    assert main([*data_parallel, "--zero", "3", "--zero-list-collectives"]) == 0
    lists = json.loads(capsys.readouterr().out)
    assert lists["predicted_step_time_s"] > tensor["predicted_step_time_s"]
    assert "gathers as DeepSpeed's 2021 list-based collectives" in lists["notes"]
    assert main([*SIMULATE, "--zero-list-collectives"]) == 2
    assert "add --zero 3" in capsys.readouterr().err


def test_simulate_rejects_zero_with_a_plan_file(tmp_path, capsys):
    assert main(["simulate", str(tmp_path / "plan.json"), "--zero", "3"]) == 2
    assert "--zero applies to a manual configuration" in capsys.readouterr().err
