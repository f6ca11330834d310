"""Times the generation of the synthetic datasets of `keras_moe.datasets`.

Run from the repository root:

    python -m benchmarks.datasets_generation --repetitions 5

Prints the median wall time of each loader over the repetitions (each call
generates a train and a test split), in a Markdown table.
"""

import argparse
import statistics
import time

from keras_moe import datasets


def _median_seconds(function, repetitions):
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--num-train", type=int, default=10000)
    parser.add_argument("--num-test", type=int, default=2000)
    args = parser.parse_args()
    cases = {
        "load_text_classification (length 128)": (
            lambda: datasets.load_text_classification(
                num_train=args.num_train, num_test=args.num_test
            )
        ),
        "load_language_modeling (length 128)": (
            lambda: datasets.load_language_modeling(
                num_train=args.num_train, num_test=args.num_test
            )
        ),
        "load_image_classification (32x32)": (
            lambda: datasets.load_image_classification(
                num_train=args.num_train, num_test=args.num_test
            )
        ),
    }
    print(
        f"num_train={args.num_train} num_test={args.num_test} "
        f"repetitions={args.repetitions}\n"
    )
    print("| loader | median s | min s | max s |")
    print("|---|---|---|---|")
    for name, function in cases.items():
        median, fastest, slowest = _median_seconds(function, args.repetitions)
        print(f"| {name} | {median:.2f} | {fastest:.2f} | {slowest:.2f} |")


if __name__ == "__main__":
    main()
