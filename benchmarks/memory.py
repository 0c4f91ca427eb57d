"""Peak memory of one step per variant, without the timings: ``python benchmarks/memory.py
[--workload mlp|resnet18] [--threads N] [--repeats N] [--out FILE]``.

Each variant is measured in ``--repeats`` fresh processes (``metafair_opt.benchmark.
measure_memory``): the medians of peak live tensor bytes and of peak RSS above what the process
held before the step, both as ratios to the plain step's medians, and the RSS peaks' range.
Prints a Markdown table with the command, machine and date; ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

from metafair_opt.benchmark import (
    MEMORY_REPEATS,
    VARIANTS,
    machine_description,
    measure_memory,
    memory_caption,
    significant,
)
from metafair_opt.cli import _positive_int
from metafair_opt.reporting import markdown_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", default="resnet18", choices=["mlp", "resnet18"])
    parser.add_argument("--threads", type=_positive_int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=_positive_int, default=MEMORY_REPEATS,
                        help="fresh processes per variant (the medians are reported)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # the children's count, which the header reports
    memory = measure_memory(args.workload, VARIANTS, args.threads, repeats=args.repeats,
                            progress=lambda text: print(text, file=sys.stderr))
    frame = pd.DataFrame([{"variant": variant, **memory[variant]} for variant in VARIANTS])
    plain = frame.set_index("variant").loc["plain"]
    frame["live / plain"] = (frame["peak_live_mb"] / plain["peak_live_mb"]).round(2)
    frame["rss / plain"] = (frame["peak_rss_mb"] / plain["peak_rss_mb"]).round(2)
    for column in ("peak_live_mb", "peak_rss_mb", "peak_rss_mb_min", "peak_rss_mb_max"):
        frame[column] = frame[column].map(significant)
    command = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"Command: `{command.strip()}`\n\nMachine: {machine_description()}\n\n"
            f"Workload: {args.workload}; {memory_caption(args.repeats)}\n\n"
            f"{markdown_table(frame)}\n")
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
