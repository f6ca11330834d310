import pytest

from keras_moe.models import moe_block_indices


@pytest.mark.parametrize(
    "num_layers, moe_layers, expected",
    [
        (4, "every-2", (1, 3)),  # the second block of each pair (GShard, V-MoE)
        (5, "every-2", (1, 3)),
        (6, "every-3", (2, 5)),
        (4, "every-1", (0, 1, 2, 3)),
        (6, "last-2", (4, 5)),  # V-MoE "Last-2"
        (3, "last-3", (0, 1, 2)),
        (4, "first-1", (0,)),
        (3, "all", (0, 1, 2)),
        (3, "ALL", (0, 1, 2)),
        (3, "none", ()),
        (4, [3, 0, -1], (0, 3)),  # sorted, negatives from the end, deduplicated
        (4, (), ()),
    ],
)
def test_placements(num_layers, moe_layers, expected):
    assert moe_block_indices(num_layers, moe_layers) == expected


@pytest.mark.parametrize(
    "moe_layers, message",
    [
        ("every-0", "N must be >= 1"),
        ("last-5", "N=5 is more than the 4 blocks"),
        ("last-x", "N is not an integer"),
        ("sometimes", "unknown placement"),
        ([4], "block 4 does not exist"),
        ([1.0], "1.0 is not an integer"),
        ([True], "True is not an integer"),
        (2, "not a string or a list"),
    ],
)
def test_invalid_placements_name_the_argument(moe_layers, message):
    with pytest.raises(ValueError, match="moe_layers") as error:
        moe_block_indices(4, moe_layers)
    assert message in str(error.value)
    assert f"moe_layers={moe_layers!r}" in str(error.value)
