"""The ``metafair-opt`` command: the papers' tabular experiments end to end.

    metafair-opt run                     # a short COMPAS comparison (a few minutes on 2 cores)
    metafair-opt run --dataset adult --methods baseline,faalgrad --config 1,2 \\
        --inner-steps 1,10 --seeds 5 --epochs 20 --out results/adult
    metafair-opt sweep --dataset adult --ratios 80:20,70:30,60:40,50:50
    metafair-opt datasets
    metafair-opt vision --dataset colored-digits --method forml --seeds 0,1,2

A bad argument or a missing data set ends with exit status 2 and one line saying what is wrong;
``bench`` ends with exit status 1 and one line where two implementations of a step disagree, and
with Python's traceback (exit status 1) where the suite itself fails.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

__all__ = ["main"]


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from error


def _variant_list(text: str) -> list[str]:
    from metafair_opt.benchmark import VARIANTS

    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {unknown or text!r}; choose from {', '.join(VARIANTS)}")
    return names


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        message = f"expected comma-separated numbers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from error


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from error
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metafair-opt",
        description="Run the FaAlGrad and FORML papers' tabular experiments on bundled data.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="compare methods on one data set (mean ± std over seeds)")
    run.add_argument("--dataset", default="compas",
                     help="adult, compas, crime, german or crime-forml (default: compas)")
    run.add_argument("--methods", type=_names,
                     default=["baseline", "faalgrad", "threshold", "majority"],
                     help="comma-separated: baseline, faalgrad, forml, threshold, "
                          "threshold_optimizer, exponentiated_gradient, majority")
    run.add_argument("--config", type=_ints, default=[1, 2], help="FaAlGrad configs (1,2)")
    run.add_argument("--inner-steps", type=_ints, default=[1], help="FaAlGrad inner steps (1,10)")
    run.add_argument("--no-controls", action="store_true",
                     help="skip the inner_steps=0 control rows")
    run.add_argument("--split-ratio", type=_names, default=[],
                     help="X_q:X_s proportions (section 5.5), e.g. 80:20,70:30; replaces --config")
    run.add_argument("--swap", action="store_true", help="swap the groups (section 5.6)")
    run.add_argument("--inner-lr", type=float, default=None,
                     help="FaAlGrad inner learning rate (default: the paper's per data set)")
    run.add_argument("--weight-lr", type=float, default=0.01, help="FORML weight learning rate")
    run.add_argument("--weight-optimizer", choices=["adam", "sgd"], default="adam")
    run.add_argument("--meta-loss", default="mean_loss_discrepancy",
                     choices=["mean_loss_discrepancy", "max_loss_discrepancy", "cross_entropy"])
    run.add_argument("--forml-val", choices=["all", "negatives"], default="all",
                     help="validation rows for FORML's meta-loss (negatives: FPR-gap proxy)")
    run.add_argument("--metrics", type=_names, default=["accuracy", "dp_diff", "eo_diff"],
                     help="summary columns, from: accuracy, dp_diff, eo_diff, dp_ratio, "
                          "eo_ratio, tpr_disparity, fpr_disparity, max_fpr, max_fnr")
    run.add_argument("--selection", choices=["best", "last"], default="best",
                     help="model selection: best validation accuracy, or the last step")
    run.add_argument("--seeds", type=int, default=3)
    run.add_argument("--epochs", type=int, default=10)
    run.add_argument("--steps", type=int, default=None,
                     help="train for this many steps instead of --epochs")
    run.add_argument("--lr", type=float, default=None, help="outer learning rate override")
    run.add_argument("--batch-size", type=int, default=None)
    run.add_argument("--hidden", type=_ints, default=None,
                     help="hidden widths, e.g. 64 or 64,64 (empty for linear: --hidden '')")
    run.add_argument("--data-dir", default=None, help="read the CSVs from here instead")
    run.add_argument("--out", default="results", help="output folder (default: results)")
    run.add_argument("--threads", type=_positive_int, default=1,
                     help="torch CPU threads (default 1: fastest for these small models)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")

    sweep = sub.add_parser("sweep", help="accuracy vs DP difference over split ratios (Fig. 2)")
    sweep.add_argument("--dataset", default="adult")
    sweep.add_argument("--ratios", type=_names, default=["80:20", "70:30", "60:40", "50:50"])
    sweep.add_argument("--inner-lrs", type=_floats, default=None,
                       help="inner learning rates to sweep (default: the paper's)")
    sweep.add_argument("--inner-steps", type=int, default=1)
    sweep.add_argument("--seeds", type=int, default=3)
    sweep.add_argument("--epochs", type=int, default=10)
    sweep.add_argument("--data-dir", default=None)
    sweep.add_argument("--out", default="results")
    sweep.add_argument("--threads", type=_positive_int, default=1,
                     help="torch CPU threads (default 1: fastest for these small models)")
    sweep.add_argument("--quiet", action="store_true")

    summary = sub.add_parser("summarize", help="one Markdown table from results.csv files")
    summary.add_argument("results", nargs="+", help="results.csv files written by 'run'")
    summary.add_argument("--metrics", type=_names, default=["accuracy", "dp_diff", "eo_diff"])

    vision = sub.add_parser("vision", help="ResNet-18 on CIFAR, CelebA or colored digits")
    vision.add_argument("--dataset", default="colored-digits",
                        choices=["cifar10", "cifar100", "celeba", "colored-digits"])
    vision.add_argument("--root", default=None, help="folder with the CIFAR or CelebA files")
    vision.add_argument("--method", default="baseline", choices=["baseline", "forml", "faalgrad"])
    vision.add_argument("--epochs", type=int, default=None, help="default: the paper's")
    vision.add_argument("--batch-size", type=int, default=None)
    vision.add_argument("--lr", type=float, default=None)
    vision.add_argument("--weight-lr", type=float, default=0.01)
    vision.add_argument("--recompute-forward", action="store_true",
                        help="forml: run the training forward again for the final gradient "
                             "instead of keeping its graph (less peak memory, one more forward)")
    vision.add_argument("--recompute-support", action="store_true",
                        help="faalgrad: run the support pass again for a Hessian-vector product "
                             "instead of keeping its second-order graph through the query pass "
                             "(less peak memory, one more support forward and backward)")
    vision.add_argument("--inner-lr", type=float, default=0.01)
    vision.add_argument("--inner-steps", type=int, default=1)
    vision.add_argument("--seeds", type=_ints, default=[0], help="e.g. 0,1,2")
    vision.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    vision.add_argument("--amp", action="store_true",
                        help="mixed precision: float16 with loss scaling on CUDA, bfloat16 on "
                             "the CPU (see --amp-dtype)")
    vision.add_argument("--amp-dtype", choices=["auto", "bfloat16", "float16"], default="auto",
                        help="autocast dtype with --amp (float16 always uses a GradScaler)")
    vision.add_argument("--channels-last", action="store_true")
    vision.add_argument("--workers", type=int, default=0)
    vision.add_argument("--max-steps-per-epoch", type=int, default=None)
    vision.add_argument("--image-size", type=int, default=None,
                        help="image side for colored-digits (default 32) and celeba (128)")
    vision.add_argument("--checkpoint", default=None, help="folder for last.pt (every epoch)")
    vision.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    vision.add_argument("--out", default="results/vision")
    vision.add_argument("--quiet", action="store_true")

    bench = sub.add_parser("bench", help="per-step overhead against a plain step and peers")
    bench.add_argument("--workload", default="mlp", choices=["mlp", "resnet18", "all"])
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--quick", action="store_true", help="fewer repeats")
    bench.add_argument("--format", default="table", choices=["table", "json", "csv"])
    bench.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    bench.add_argument("--variants", type=_variant_list, default=None,
                       help="comma-separated variants to measure (default: all; the plain "
                            "step is always measured)")
    bench.add_argument("--pairwise", action="store_true",
                       help="also time each variant against the plain step alone (the two "
                            "in shuffled rounds): ratio_to_plain_pairwise, without the other "
                            "variants' traces in the caches")
    bench.add_argument("--out", type=Path, default=None,
                       help="also write results.csv and results.md (with the command, machine, "
                            "date and the agreement checks) to this folder")

    datasets = sub.add_parser("datasets", help="list the data sets with group sizes and base rates")
    datasets.add_argument("--data-dir", default=None)
    return parser


def _run(args: argparse.Namespace, command: str) -> None:
    from metafair_opt.integrations.tabular.experiment import (
        ComparisonConfig,
        run_comparison,
        write_results,
    )

    settings = {}
    if args.lr is not None:
        settings["outer_lr"] = args.lr
    if args.batch_size is not None:
        settings["batch_size"] = args.batch_size
    if args.hidden is not None:
        settings["hidden"] = tuple(args.hidden)
    config = ComparisonConfig(
        dataset=args.dataset, methods=args.methods, configs=args.config,
        inner_steps=args.inner_steps, controls=not args.no_controls,
        split_ratios=args.split_ratio, swap=args.swap, seeds=args.seeds,
        epochs=None if args.steps else args.epochs, steps=args.steps, data_dir=args.data_dir,
        inner_lr=args.inner_lr, weight_lr=args.weight_lr,
        weight_optimizer=args.weight_optimizer, meta_loss=args.meta_loss,
        forml_val_rows=args.forml_val, report=args.metrics, selection=args.selection,
        settings=settings,
    )
    from metafair_opt.distributed import init_from_environment

    # Under torchrun every rank trains (in lockstep, through DDP); rank 0 alone reports.
    rank, world = init_from_environment("cpu")
    results = run_comparison(config, quiet=args.quiet or rank > 0)
    if rank > 0:
        return
    if world > 1:
        command = _as_launched(command, world)
    summary = write_results(results, config, Path(args.out), command)
    print(f"\n{args.dataset}: test metrics, mean ± std over {args.seeds} seed(s)")
    with pd.option_context("display.max_colwidth", 60, "display.width", 200):
        print(summary.to_string(index=False))
    print(f"\nwrote {Path(args.out) / 'results.csv'}, results.md and config.json")


def _sweep(args: argparse.Namespace, command: str) -> None:
    from metafair_opt.distributed import init_from_environment
    from metafair_opt.integrations.tabular.experiment import plot_tradeoff, run_sweep, summarize
    from metafair_opt.reporting import markdown_table

    rank, world = init_from_environment("cpu")  # under torchrun: rank 0 alone writes
    results, curve = run_sweep(args.dataset, args.ratios, args.inner_lrs or [None],
                               args.inner_steps, args.seeds, args.epochs, args.data_dir,
                               quiet=args.quiet or rank > 0)
    if rank > 0:
        return
    if world > 1:
        command = _as_launched(command, world)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skipped = results.attrs.get("skipped_ratios", [])
    summary = summarize(results)
    results.to_csv(out / "sweep.csv", index=False)
    curve.to_csv(out / "threshold_curve.csv", index=False)
    note = (f"\n\nSkipped (the protected group is too small): {', '.join(skipped)}"
            if skipped else "")
    (out / "sweep.md").write_text(f"Command: `{command}`\n\n{markdown_table(summary)}{note}\n")
    plot_tradeoff(results, curve, out / "tradeoff.png",
                  f"{args.dataset}: accuracy vs DP difference")
    print(summary.to_string(index=False))
    if skipped:
        print(f"skipped ratios (protected group too small): {', '.join(skipped)}")
    print(f"\nwrote {out / 'tradeoff.png'}, sweep.csv, sweep.md, threshold_curve.csv")


def _summarize(args: argparse.Namespace) -> None:
    from metafair_opt.integrations.tabular.experiment import summarize
    from metafair_opt.metrics import BINARY_METRICS
    from metafair_opt.reporting import markdown_table

    unknown = [m for m in args.metrics if m not in BINARY_METRICS]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; choose from {list(BINARY_METRICS)}.")
    frames = []
    for path in args.results:
        if not Path(path).is_file():
            raise FileNotFoundError(f"No results file at {path}; 'metafair-opt run' writes one.")
        frames.append(pd.read_csv(path))
    print(markdown_table(summarize(pd.concat(frames, ignore_index=True), args.metrics)))


def _vision(args: argparse.Namespace, command: str) -> None:
    from metafair_opt.distributed import rank_and_world
    from metafair_opt.integrations.vision.training import VisionConfig, train_vision
    from metafair_opt.reporting import markdown_table

    rows = []
    for seed in args.seeds:
        checkpoint = args.checkpoint
        if checkpoint is not None and len(args.seeds) > 1:
            checkpoint = str(Path(checkpoint) / f"seed{seed}")
        config = VisionConfig(
            dataset=args.dataset, method=args.method, root=args.root, epochs=args.epochs,
            batch_size=args.batch_size, lr=args.lr, weight_lr=args.weight_lr,
            recompute_forward=args.recompute_forward,
            recompute_support=args.recompute_support, inner_lr=args.inner_lr,
            inner_steps=args.inner_steps, device=args.device,
            amp=args.amp, amp_dtype=args.amp_dtype, channels_last=args.channels_last,
            workers=args.workers, seed=seed,
            max_steps_per_epoch=args.max_steps_per_epoch, checkpoint=checkpoint,
            resume=args.resume,
            extra={} if args.image_size is None else {"image_size": args.image_size},
        )
        metrics, _ = train_vision(config, quiet=args.quiet)
        rows.append({"dataset": args.dataset, "method": args.method, "seed": seed, **metrics})
    rank, world = rank_and_world()  # under torchrun every rank trains; rank 0 alone reports
    if rank > 0:
        return
    if world > 1:
        command = _as_launched(command, world)
    frame = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(f"Command: `{command}`\n\n{markdown_table(frame)}\n")
    print(frame.to_string(index=False))
    print(f"\nwrote {out / 'results.csv'} and results.md")


def _bench(args: argparse.Namespace, command: str) -> int:
    import importlib.util
    import json

    from metafair_opt.benchmark import (
        AGREEMENT_TOLERANCE,
        WORKLOADS,
        ImplementationsDisagree,
        machine_description,
        memory_caption,
        memory_repeats,
        run_suite,
    )
    from metafair_opt.reporting import markdown_table

    if importlib.util.find_spec("higher") is None:
        raise ModuleNotFoundError(
            "bench times the steps written with the higher library as peers, and higher is not "
            "installed: pip install -e \".[dev]\" (or pip install higher==0.2.1).")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA device.")
    workloads = WORKLOADS if args.workload == "all" else (args.workload,)
    try:
        records = run_suite(workloads, args.device, quick=args.quick,
                            progress=lambda text: print(text, file=sys.stderr),
                            pairwise=args.pairwise, variants=args.variants)
    except ImplementationsDisagree as error:
        print(f"metafair-opt: error: {error}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, ModuleNotFoundError, KeyError) as error:
        # Not a bad argument (main's one-line exit status 2 would say so): a failure inside
        # the suite, shown with its traceback.
        raise RuntimeError(f"The benchmark suite failed: {error!r}") from error
    timings = [r for r in records if "variant" in r]
    checks = [r for r in records if "check" in r]
    if args.format == "json":
        print(json.dumps(timings, indent=2))
    elif args.format == "csv":
        print(pd.DataFrame(timings).to_csv(index=False), end="")
    else:
        print(markdown_table(pd.DataFrame(timings)))
    for check in checks:
        print(f"{check['workload']}: {check['check']}: relative difference "
              f"{check['relative_difference']:.3g}", file=sys.stderr)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(timings).to_csv(args.out / "results.csv", index=False)
        agreement = pd.DataFrame(checks).rename(columns={"check": "implementations",
                                                         "relative_difference": "difference"})
        (args.out / "results.md").write_text(
            f"Command: `{command}`\n\nMachine: {machine_description(args.device)}\n\n"
            f"Medians in milliseconds; {memory_caption(memory_repeats(args.quick))}.\n\n"
            f"{markdown_table(pd.DataFrame(timings))}\n\n"
            "Agreement before timing (`metafair_opt.benchmark.check_agreement`: two steps "
            "each, both from the same start, at larger rates than the timed runs'): max |ours "
            "- theirs| / max |ours| over the model gradients (per parameter) and the "
            "parameters' change, or for \"(weight update)\" the weight table's change, the "
            f"larger of the two steps'; a run stops above {AGREEMENT_TOLERANCE:g}:\n\n"
            f"{markdown_table(agreement)}\n")
        print(f"wrote {args.out / 'results.csv'} and results.md", file=sys.stderr)
    return 0


def _datasets(args: argparse.Namespace) -> None:
    from metafair_opt.datasets import DATASETS, load_tabular

    for name, spec in DATASETS.items():
        ds = load_tabular(name, data_dir=args.data_dir)
        print(f"{name}: {spec.title} - {len(ds)} rows, {ds.X.shape[1]} inputs, "
              f"y = 1: {ds.outcome}")
        print(ds.describe().to_string())
        print()


def _as_launched(command: str, world: int) -> str:
    """The command line as torchrun ran it, for the results' provenance."""
    return f"torchrun --nproc_per_node {world} -m metafair_opt.cli {command.split(' ', 1)[1]}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metafair-opt`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    command = "metafair-opt " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    import torch

    # Called as a function (tests, notebooks), the command must not leave its thread count
    # behind in the caller's process.
    threads_before = torch.get_num_threads()
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    status = 0
    try:
        if getattr(args, "out", None) is not None:
            _check_output_folder(Path(args.out))
        if args.command == "run":
            _run(args, command)
        elif args.command == "sweep":
            _sweep(args, command)
        elif args.command == "summarize":
            _summarize(args)
        elif args.command == "vision":
            _vision(args, command)
        elif args.command == "bench":
            status = _bench(args, command)
        else:
            _datasets(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, KeyError) as error:
        message = error.args[0] if error.args else str(error)
        print(f"metafair-opt: error: {message}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads_before)
        _leave_process_group()
    return status


def _check_output_folder(out: Path) -> None:
    """Refuse an ``--out`` folder that cannot be written before any work (so that a bad path
    costs no results); nothing is created until there are results to write. Under torchrun
    only rank 0 writes, and checks."""
    if os.environ.get("RANK", "0") != "0":
        return
    try:
        _check_writable(out)
    except OSError as error:  # e.g. a folder on the way that cannot be searched
        raise ValueError(f"Cannot use the --out folder {out}: {error.strerror}.") from error


def _check_writable(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} is a file; pass a folder to write the results into.")
        if not os.access(out, os.W_OK):
            raise ValueError(f"Cannot write into the --out folder {out}: permission denied.")
        return
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"Cannot create the --out folder {out}: {ancestor} is a file.")
    if not os.access(ancestor, os.W_OK):
        raise ValueError(f"Cannot create the --out folder {out}: no permission to write in "
                         f"{ancestor}.")


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
