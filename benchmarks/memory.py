"""Peak memory of one step per variant, without the timings: ``python benchmarks/memory.py
[--workload mlp|resnet18] [--threads N] [--out FILE]``.

Each variant runs in a fresh process (``metafair_opt.benchmark.step_peak_memory_mb``): peak live
tensor bytes and peak RSS above what the process held before the step, and both as ratios to the
plain step's. Prints a Markdown table with the command, machine and date; ``--out`` also writes it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

from metafair_opt.benchmark import (
    VARIANTS,
    machine_description,
    significant,
    step_peak_memory_mb,
)
from metafair_opt.cli import _positive_int
from metafair_opt.reporting import markdown_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workload", default="resnet18", choices=["mlp", "resnet18"])
    parser.add_argument("--threads", type=_positive_int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # the children's count, which the header reports
    rows = []
    for variant in VARIANTS:
        memory = step_peak_memory_mb(args.workload, variant, args.threads)
        rows.append({"variant": variant, **memory})
        print(f"{variant}: {memory}", file=sys.stderr)
    frame = pd.DataFrame(rows)
    plain = frame.set_index("variant").loc["plain"]
    frame["live / plain"] = (frame["peak_live_mb"] / plain["peak_live_mb"]).round(2)
    frame["rss / plain"] = (frame["peak_rss_mb"] / plain["peak_rss_mb"]).round(2)
    for column in ("peak_live_mb", "peak_rss_mb"):
        frame[column] = frame[column].map(significant)
    command = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"Command: `{command.strip()}`\n\nMachine: {machine_description()}\n\n"
            f"Workload: {args.workload}; memory in MB of 2**20 bytes (MiB)\n\n"
            f"{markdown_table(frame)}\n")
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
