"""The layer benchmark runs end to end at tiny sizes on the session's backend.

Only that it runs, measures every layer it is asked for and writes what
`benchmarks/README.md` is built from: no timing is asserted here (speed is
measured by running `python -m benchmarks.moe_layer` itself).
"""

import importlib
import json
import os
import statistics
import sys

import pytest

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_benchmark(name):
    """`benchmarks.<name>` (run from the repository root, not installed)."""
    sys.path.insert(0, REPOSITORY)
    try:
        return importlib.import_module(f"benchmarks.{name}")
    finally:
        sys.path.remove(REPOSITORY)


def test_moe_layer_benchmark_measures_every_layer(tmp_path, capsys):
    path = tmp_path / "result.json"
    import_benchmark("moe_layer").main(
        [
            "--experts", "2", "4",
            "--tokens", "32",
            "--d-model", "8",
            "--expert-hidden", "8",
            "--repetitions", "2",
            "--warmup", "1",
            "--keras-hub-max-experts", "2",
            "--json", str(path),
        ]
    )
    table = capsys.readouterr().out
    with open(path) as f:
        written = json.load(f)
    measured = [(r["layer"], r["num_experts"]) for r in written["results"]]
    # KerasHub's block only up to --keras-hub-max-experts.
    assert measured == [
        ("dense", 2), ("capacity", 2), ("dropless", 2), ("keras_hub", 2),
        ("dense", 4), ("capacity", 4), ("dropless", 4),
    ]
    for result in written["results"]:
        assert len(result["train_ms_all"]) == 2
        assert result["train_ms"] == pytest.approx(
            statistics.median(result["train_ms_all"])
        )
        assert result["train_ms"] > 0 and result["infer_tokens_per_s"] > 0
    assert "load average" in written["header"]
    # One table row per measurement, each with its ratio to the dense layer.
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == len(measured)
    capacity_at_4 = rows[5].split("|")
    dense, capacity = written["results"][4], written["results"][5]
    assert capacity_at_4[1].strip() == "capacity"
    # Layers are timed round-robin: the ratio is the median of the ratios of
    # calls made in the same round.
    per_round = [c / d for c, d in zip(capacity["train_ms_all"], dense["train_ms_all"])]
    assert float(capacity_at_4[4]) == pytest.approx(statistics.median(per_round), abs=0.006)
    # The growth column compares medians with the same layer at 2 experts.
    assert float(capacity_at_4[5]) == pytest.approx(
        capacity["train_ms"] / written["results"][1]["train_ms"], abs=0.006
    )


@pytest.mark.skipif(
    __import__("keras").backend.backend() != "jax", reason="benchmarks.bounds is JAX only"
)
def test_bounds_benchmark_prints_a_row_per_expert_count(capsys):
    import_benchmark("bounds").main(
        ["--experts", "2", "4", "--tokens", "16", "--d-model", "4",
         "--expert-hidden", "4", "--repetitions", "1"]
    )
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["2", "4"]
    # capacity = ceil(1.25 * 16 tokens * top-2 / E)
    assert [row.split("|")[2].strip() for row in rows[1:]] == ["20", "10"]
    assert all(float(row.split("|")[5]) > 0 for row in rows[1:])
