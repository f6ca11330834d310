"""The guides: their tutobook format, and each one run end to end in fast mode.

Every guide runs in a subprocess with `KERAS_MOE_GUIDE_FAST=1` on the backend
of the test session. The guides that work on every backend run on all
three; expert parallelism needs JAX (on the others it must stop cleanly with
a message).
"""

import importlib.util
import os
import re
import subprocess
import sys

import keras
import pytest

from tests.plotting_test import assert_valid_png

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUIDES_DIR = os.path.join(REPOSITORY, "guides")


def _load_render():
    spec = importlib.util.spec_from_file_location(
        "guides_render", os.path.join(GUIDES_DIR, "render.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render()

HEADER = ("Title", "Author", "Date created", "Last modified", "Description")


def guide_file(name):
    return os.path.join(GUIDES_DIR, f"{name}.py")


def run_guide(name, tmp_path, expect_backend_line=True):
    """Runs a guide in fast mode; returns its stdout. Figures go to tmp_path."""
    backend = keras.backend.backend()
    env = dict(
        os.environ,
        KERAS_BACKEND=backend,
        KERAS_MOE_GUIDE_FAST="1",
        KERAS_MOE_GUIDE_OUTPUT_DIR=str(tmp_path),
        PYTHONPATH=os.pathsep.join(
            filter(None, [REPOSITORY, os.environ.get("PYTHONPATH")])
        ),
    )
    # The expert parallelism guide asks for 8 virtual devices itself.
    env.pop("JAX_NUM_CPU_DEVICES", None)
    result = subprocess.run(
        [sys.executable, guide_file(name)],
        env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if expect_backend_line:
        assert f"backend: {backend}" in result.stdout
    return result.stdout


def number(pattern, text):
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the output:\n{text[-3000:]}"
    return float(match.group(1))


@pytest.mark.parametrize("name", render.GUIDES)
def test_tutobook_format(name):
    with open(guide_file(name)) as f:
        source = f.read()
    header, cells = render.parse(source)
    assert set(HEADER) <= set(header), header
    assert header["Author"] == "keras-moe authors"
    assert re.fullmatch(r"\d{4}/\d{2}/\d{2}", header["Last modified"])
    kinds = [kind for kind, _ in cells]
    assert kinds[0] == "markdown" and "code" in kinds
    # Headings in the prose, an introduction first.
    prose = [text for kind, text in cells if kind == "markdown"]
    assert prose[0].startswith("## Introduction")
    assert sum(text.count("\n## ") + text.startswith("## ") for text in prose) >= 4
    # The backend is set from the environment before Keras is imported.
    code = "\n".join(text for kind, text in cells if kind == "code")
    backend_line = code.index('os.environ.setdefault("KERAS_BACKEND"')
    assert backend_line < code.index("import keras")
    assert "KERAS_MOE_GUIDE_FAST" in code and "KERAS_MOE_GUIDE_OUTPUT_DIR" in code
    assert "validation_data=" in code


def test_parse_splits_prose_and_code():
    source = (
        '"""\nTitle: T\nAuthor: A\n"""\n\n"""\n## Intro\n\nText.\n"""\n\n'
        'x = 1\n\n"""\nMore.\n"""\n\nprint(x)\n'
    )
    header, cells = render.parse(source)
    assert header == {"Title": "T", "Author": "A"}
    assert cells == [
        ("markdown", "## Intro\n\nText."), ("code", "x = 1"),
        ("markdown", "More."), ("code", "print(x)"),
    ]
    with pytest.raises(ValueError, match="never closed"):
        render.parse('"""\nTitle: T\n"""\n"""\nopen prose\n')
    with pytest.raises(ValueError, match="header"):
        render.parse("x = 1\n")


@pytest.mark.smoke
def test_render_writes_prose_code_outputs_and_figures(tmp_path):
    guide = tmp_path / "toy_guide.py"
    guide.write_text(
        '"""\nTitle: A toy guide\nAuthor: keras-moe authors\n'
        'Date created: 2026/12/01\nLast modified: 2026/12/01\n'
        'Description: Renders.\n"""\n\n"""\n## Introduction\n\nSome prose.\n"""\n\n'
        "import os\nfrom matplotlib.figure import Figure\n"
        'out = os.environ["KERAS_MOE_GUIDE_OUTPUT_DIR"]\n'
        'print("value:", 6 * 7)\n\n'
        '"""\n## A figure\n"""\n\n'
        "figure = Figure()\nfigure.subplots().plot([0, 1], [1, 0])\n"
        'figure.savefig(os.path.join(out, "line.png"), dpi=100)\n'
    )
    output_dir = tmp_path / "rendered"
    subprocess.run(
        [sys.executable, os.path.join(GUIDES_DIR, "render.py"), str(guide),
         "--output-dir", str(output_dir)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    markdown = (output_dir / "toy_guide.md").read_text()
    assert markdown.startswith("# A toy guide\n")
    assert "**Author:** keras-moe authors" in markdown
    assert "## Introduction\n\nSome prose." in markdown
    assert '```python\nimport os' in markdown
    assert "```\nvalue: 42\n```" in markdown
    assert "![line.png](toy_guide/line.png)" in markdown
    assert markdown.index("## A figure") < markdown.index("![line.png]")
    assert_valid_png(output_dir / "toy_guide" / "line.png")


@pytest.mark.smoke
def test_getting_started(tmp_path):
    stdout = run_guide("getting_started", tmp_path)
    assert_valid_png(tmp_path / "expert_load.png")
    assert (tmp_path / "moe_classifier.keras").exists()
    assert 0.0 <= number(r"test accuracy: (\d\.\d+)", stdout) <= 1.0
    # RoutingMonitor's statistics in the fit logs and from the layer.
    for key in ("moe_balance_loss", "moe_z_loss", "moe_dropped_fraction",
                "moe_load_imbalance"):
        assert key in stdout
    assert number(r"moe_0: averaged over the last (\d+) training steps", stdout) > 0
    assert "predictions equal to the original's: True" in stdout


@pytest.mark.smoke
def test_routing_and_load_balancing(tmp_path):
    stdout = run_guide("routing_and_load_balancing", tmp_path)
    for figure in ("expert_load_comparison.png", "routing_by_kind.png"):
        assert_valid_png(tmp_path / figure)
    # Dropped assignments of one batch at five capacity factors: fewer with
    # more capacity, at least what does not fit in 8 experts' slots, none
    # when dropless.
    assignments = int(number(r"one batch: (\d+) assignments", stdout))
    rows = re.findall(
        r"capacity factor +(\S+): capacity +(\d+) per expert; untrained router: "
        r"dropped +(\d+) .*trained router: dropped +(\d+)", stdout
    )
    assert [row[0] for row in rows] == ["0.5", "1.0", "1.25", "2.0", "None"]
    for column in (2, 3):
        dropped = [int(row[column]) for row in rows]
        assert dropped == sorted(dropped, reverse=True), dropped
        assert dropped[-1] == 0
        for row, count in zip(rows, dropped):
            assert count >= assignments - 8 * int(row[1])
    # Top-1: a dropped assignment is a token without an expert; top-2: a
    # token loses its expert only if both its assignments are dropped.
    shares = {
        top_k: (float(a), float(t))
        for top_k, a, t in re.findall(
            r"top_(\d): validation loss \S+, (\S+)% of assignments dropped, "
            r"(\S+)% of tokens with no expert", stdout
        )
    }
    assert shares["1"][0] == shares["1"][1]
    assert shares["2"][1] <= shares["2"][0]
    # The table: without balancing the load is the most uneven.
    imbalance = {
        label: float(value)
        for label, value in re.findall(
            r"^(no balancing|load-balancing loss|load-balancing \+ z-loss|bias "
            r"balancing) +\S+ +(\S+)", stdout, re.MULTILINE
        )
    }
    assert len(imbalance) == 4, stdout[-2000:]
    for label, value in imbalance.items():
        assert 1.0 <= value <= 8.0
        if label != "no balancing":
            assert imbalance["no balancing"] > value, imbalance
    assert "learned expert bias" in stdout


@pytest.mark.smoke
def test_vit_moe(tmp_path):
    stdout = run_guide("vit_moe", tmp_path)
    for figure in ("examples.png", "expert_load.png", "routing_by_class.png",
                   "expert_per_patch.png"):
        assert_valid_png(tmp_path / figure)
    assert 0.0 <= number(r"test accuracy: (\d\.\d+)", stdout) <= 1.0
    distances = re.findall(r"by class (\d\.\d+), by style (\d\.\d+)", stdout)
    assert len(distances) == 2  # two MoE blocks
    assert all(0.0 <= float(d) <= 1.0 for pair in distances for d in pair)


@pytest.mark.smoke
def test_expert_parallelism(tmp_path):
    if keras.backend.backend() != "jax":
        # Expert parallelism needs JAX: the guide says so and exits cleanly.
        stdout = run_guide("expert_parallelism", tmp_path, expect_backend_line=False)
        assert "only the JAX backend implements" in stdout
        assert f"KERAS_BACKEND={keras.backend.backend()}" in stdout
        return
    stdout = run_guide("expert_parallelism", tmp_path)
    assert_valid_png(tmp_path / "expert_placement.png")
    assert "8 devices" in stdout and "mesh: {'batch': 2, 'expert': 4}" in stdout
    assert "same predictions on the mesh as on one device: True" in stdout
    assert re.search(
        r"experts/intermediate_kernel +shape \(8, 64, 64\), spec "
        r"P\('expert', None, None\), per device \(2, 64, 64\)", stdout
    )
    assert re.search(r"router/kernel +shape \(64, 8\), spec P\(None, None\)", stdout)
    # Each pair of experts on one device of each row of the 2x4 mesh.
    placement = re.findall(r"experts (\d)-(\d) on (cpu:\d), (cpu:\d)", stdout)
    experts = [(int(first), int(last)) for first, last, _, _ in placement]
    assert experts == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert len({device for *_, d0, d1 in placement for device in (d0, d1)}) == 8
    # One MoE layer in fast mode: to the experts and back, nothing gathered.
    assert number(r"all-to-all operations in the forward pass: (\d+)", stdout) == 2
    assert number(r"all-gather operations in the forward pass: (\d+)", stdout) == 0
    assert 0.0 <= number(r"on the mesh: validation accuracy (\d\.\d+)", stdout) <= 1.0
    assert "outside the scope: experts on 1 device(s)" in stdout


@pytest.mark.smoke
def test_fine_tuning_and_upcycling(tmp_path):
    stdout = run_guide("fine_tuning_and_upcycling", tmp_path)
    assert_valid_png(tmp_path / "upcycled_expert_load.png")
    assert "outputs equal before training: True" in stdout
    assert number(r"largest difference (\S+)\)", stdout) < 1e-4
    assert "embedding unchanged by the MoE-only fine-tuning: True" in stdout
    # The experts moved apart during fine-tuning.
    assert number(r"block_0_moe: experts (\d+\.\d+)%", stdout) > 0
    rows = re.findall(
        r"^(dense|upcycled), .*?(\d\.\d{4}) +(\d\.\d{4})$", stdout, re.MULTILINE
    )
    assert len(rows) == 4, stdout[-2000:]
