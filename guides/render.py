"""Renders the tutobook guides to Markdown, with their outputs and figures.

Runs a guide cell by cell (each `\"\"\"` prose block is a Markdown cell, the
code between prose blocks a code cell), captures what every code cell prints
and the PNG figures it writes, and writes `<output dir>/<guide>.md` with the
prose, the code, the printed output under each code cell, and the figures
(saved next to it in `<output dir>/<guide>/`).

    python guides/render.py getting_started              # one guide
    python guides/render.py --all                        # every guide
    KERAS_BACKEND=torch python guides/render.py vit_moe  # on another backend
    KERAS_MOE_GUIDE_FAST=1 python guides/render.py --all --output-dir /tmp/r

Each guide runs in a fresh Python process, since the Keras backend (and, for
the expert parallelism guide, the number of JAX devices) is fixed when Keras
is first imported. The guide's `KERAS_MOE_GUIDE_OUTPUT_DIR` is set to the
figure folder, so its figures land where the Markdown links to them.

The rendered guides in `guides/rendered/` are committed, rendered with the
default sizes on JAX; re-render them after changing a guide.
"""

import argparse
import contextlib
import datetime
import io
import os
import re
import subprocess
import sys
import time

GUIDES_DIR = os.path.dirname(os.path.abspath(__file__))
REPOSITORY = os.path.dirname(GUIDES_DIR)
DEFAULT_OUTPUT_DIR = os.path.join(GUIDES_DIR, "rendered")
HEADER_FIELDS = ("Title", "Author", "Date created", "Last modified", "Description")
# The guides, in reading order.
GUIDES = (
    "getting_started",
    "routing_and_load_balancing",
    "vit_moe",
    "expert_parallelism",
    "fine_tuning_and_upcycling",
)


def parse(source):
    """Splits a tutobook source into its header and cells.

    The file opens with a `\"\"\"` docstring of `Field: value` lines (see
    `HEADER_FIELDS`). After it, a line that is exactly `\"\"\"` opens or
    closes a prose block; everything outside prose blocks is code.

    Returns:
        `(header, cells)`: a dict of the header fields, and a list of
        `("markdown" | "code", text)` in file order, without empty cells.

    Raises:
        ValueError: no header docstring, a header line without a colon, or a
            prose block that is never closed.
    """
    lines = source.splitlines()
    if not lines or lines[0].strip() != '"""':
        raise ValueError('A guide must start with a `"""` header docstring.')
    try:
        header_end = lines.index('"""', 1)
    except ValueError:
        raise ValueError("The header docstring is never closed.") from None
    header = {}
    for line in lines[1:header_end]:
        if not line.strip():
            continue
        key, separator, value = line.partition(":")
        if not separator:
            raise ValueError(f"Header line without `Field: value`: {line!r}")
        header[key.strip()] = value.strip()
    cells, block, in_prose = [], [], False

    def flush(kind):
        text = "\n".join(block).strip("\n")
        if text.strip():
            cells.append((kind, text))
        block.clear()

    for line in lines[header_end + 1 :]:
        if line.rstrip() == '"""':
            flush("markdown" if in_prose else "code")
            in_prose = not in_prose
        else:
            block.append(line)
    if in_prose:
        raise ValueError('A prose block is never closed with `"""`.')
    flush("code")
    return header, cells


class _Tee(io.TextIOBase):
    """Writes to a buffer and to the real stream, so progress stays visible."""

    def __init__(self, stream):
        self.buffer = io.StringIO()
        self.stream = stream

    def write(self, text):
        self.buffer.write(text)
        self.stream.write(text)
        return len(text)

    def flush(self):
        self.stream.flush()


def _pngs(directory):
    """{path: modification time} of the PNG files under `directory`."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            if name.lower().endswith(".png"):
                path = os.path.join(root, name)
                found[path] = os.stat(path).st_mtime_ns
    return found


def _fence(text, language=""):
    """A fenced Markdown block, its fence longer than any backtick run inside."""
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def render(guide_path, output_dir):
    """Runs the guide at `guide_path` in this process; returns the .md path.

    Call it in a fresh process (see `main`): the guide imports Keras.
    """
    name = os.path.splitext(os.path.basename(guide_path))[0]
    with open(guide_path) as f:
        header, cells = parse(f.read())
    figure_dir = os.path.join(output_dir, name)
    os.makedirs(figure_dir, exist_ok=True)
    os.environ["KERAS_MOE_GUIDE_OUTPUT_DIR"] = figure_dir
    namespace = {"__name__": "__main__", "__file__": os.path.abspath(guide_path)}
    parts = []
    start = time.perf_counter()
    finished = True
    for kind, text in cells:
        if kind == "markdown":
            parts.append(text)
            continue
        parts.append(_fence(text, "python"))
        before = _pngs(figure_dir)
        tee = _Tee(sys.stdout)
        try:
            with contextlib.redirect_stdout(tee):
                exec(compile(text, guide_path, "exec"), namespace)
        except SystemExit as stop:
            # A guide may stop early (e.g. on a backend it does not support).
            if stop.code not in (None, 0):
                raise
            finished = False
        # Paths the guide prints, relative to the repository: the rendered
        # page should not show where it happened to be rendered.
        output = tee.buffer.getvalue().rstrip().replace(
            figure_dir, os.path.relpath(figure_dir, REPOSITORY)
        )
        if output:
            parts.append(_fence(output))
        after = _pngs(figure_dir)
        for path in sorted(p for p in after if before.get(p) != after[p]):
            relative = os.path.relpath(path, output_dir).replace(os.sep, "/")
            parts.append(f"![{os.path.basename(path)}]({relative})")
        if not finished:
            parts.append("*(The guide stopped here.)*")
            break
    seconds = time.perf_counter() - start
    backend = os.environ.get("KERAS_BACKEND", "jax")
    fast = os.environ.get("KERAS_MOE_GUIDE_FAST", "0") not in ("", "0")
    lines = [f"# {header.get('Title', name)}", ""]
    for field in HEADER_FIELDS[1:]:
        if field in header:
            lines.append(f"**{field}:** {header[field]}<br>")
    lines += [
        f"**Source:** [`guides/{name}.py`](../{name}.py)<br>",
        f"**Rendered:** {datetime.date.today().isoformat()}, backend "
        f"`{backend}`{', fast mode' if fast else ''}, {seconds:.0f} s on "
        f"{os.cpu_count()} CPU cores",
        "",
    ]
    markdown_path = os.path.join(output_dir, f"{name}.md")
    with open(markdown_path, "w") as f:
        f.write("\n".join(lines) + "\n" + "\n\n".join(parts) + "\n")
    return markdown_path


def guide_path(name):
    """The path of a guide given as a name (`vit_moe`) or a file path."""
    if os.path.exists(name):
        return name
    path = os.path.join(GUIDES_DIR, f"{name}.py")
    if not os.path.exists(path):
        raise SystemExit(f"No guide {name!r}; the guides are {', '.join(GUIDES)}.")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("guides", nargs="*", help="guide names or paths")
    parser.add_argument("--all", action="store_true", help="render every guide")
    parser.add_argument(
        "--output-dir", default=DEFAULT_OUTPUT_DIR,
        help="where the Markdown and figures go (default %(default)s)",
    )
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = list(GUIDES) if args.all else args.guides
    if not names:
        parser.error("name a guide, or pass --all")
    output_dir = os.path.abspath(args.output_dir)
    os.makedirs(output_dir, exist_ok=True)
    if args.in_process:
        (name,) = names
        # Import this checkout's keras_moe when run from a source tree.
        sys.path.insert(0, REPOSITORY)
        print(f"wrote {render(guide_path(name), output_dir)}", file=sys.stderr)
        return
    for name in names:
        path = guide_path(name)
        subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--in-process",
             "--output-dir", output_dir, path],
            check=True,
        )


if __name__ == "__main__":
    main()
