import numpy as np
import pytest

from keras_moe import plotting

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path):
    image = pytest.importorskip("matplotlib.image")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    pixels = image.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100
    assert pixels.std() > 0  # not a blank canvas


class FakeMonitor:
    """What plot_expert_load reads from a RoutingMonitor."""

    def __init__(self, steps=30, num_experts=4):
        rng = np.random.default_rng(0)
        loads = rng.dirichlet(np.ones(num_experts), size=steps)
        self.step_history = {
            "block_1_moe": {"expert_load": list(loads)},
            "block_3_moe": {"expert_load": list(loads[::-1])},
        }
        self.history = {
            name: {"expert_load": stats["expert_load"][:3]}
            for name, stats in self.step_history.items()
        }


def test_expert_load_figure(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "load.png"
    figure = plotting.plot_expert_load(FakeMonitor(), str(path), title="t")
    assert len([axis for axis in figure.axes if axis.get_visible()]) == 2
    first = figure.axes[0]
    assert first.get_title() == "block_1_moe"
    assert len(first.get_lines()) == 4 + 1  # one per expert + the 1/E line
    assert_valid_png(path)


def test_expert_load_falls_back_to_epochs_and_accepts_dicts(tmp_path):
    pytest.importorskip("matplotlib")
    monitor = FakeMonitor()
    monitor.step_history = {}
    figure = plotting.plot_expert_load(monitor)
    assert figure.axes[0].get_xlabel() == "epoch"
    figure = plotting.plot_expert_load({"moe": {"expert_load": [np.ones(2) / 2] * 5}})
    assert figure.axes[0].get_xlabel() == "training step"
    with pytest.raises(ValueError, match="No expert load"):
        plotting.plot_expert_load({"moe": {}})


def test_routing_map_figure(tmp_path):
    pytest.importorskip("matplotlib")
    fractions = np.array([[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]])
    path = tmp_path / "map.png"
    figure = plotting.plot_routing_map(
        {"block_1 by class": (fractions, ["cat", "dog"]),
         "block_1 by kind": (fractions[::-1], ["x", "y"])},
        str(path),
    )
    axis = figure.axes[0]
    assert [t.get_text() for t in axis.get_yticklabels()] == ["cat", "dog"]
    assert "70" in [t.get_text() for t in axis.texts]
    assert_valid_png(path)
    with pytest.raises(ValueError, match="2 rows of fractions but 1 row names"):
        plotting.plot_routing_map({"p": (fractions, ["cat"])})
    with pytest.raises(ValueError, match="empty"):
        plotting.plot_routing_map({})
