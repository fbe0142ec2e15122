"""``train_network_hina.py`` standalone: parse, set up (all checks), train; errors become one clear line."""

from __future__ import annotations

import logging
import sys

from .args import ArgumentError, config_path, parse_args, write_config

EXIT_BAD_INPUT = 2


def given_flags(argv: list[str]) -> set[str]:
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}


def run(argv: list[str]) -> dict | None:
    """Parse and train; raises the set-up errors (ArgumentError, DatasetError, ...) for callers and tests."""
    args = parse_args(argv)
    if args.sd_scripts:
        raise ArgumentError("--sd_scripts must be given on the command line, not in a config file")
    if args.output_config:
        if not args.config_file:
            raise ArgumentError("--output_config needs --config_file FILE (the file to write)")
        path = config_path(args.config_file)
        write_config(args, path)
        print(f"wrote the arguments to {path}")
        return None
    from .loop import train
    from .trainer import prepare

    plan = prepare(args, given_flags(argv))
    if args.debug_dataset:  # kohya: show the data as training would see it, and do not train
        from .dataset import debug_lines

        print("\n".join(debug_lines(plan.spec.items, plan.epochs, args.seed)))
        return None
    return train(plan)


def bad_input_errors() -> tuple[type, ...]:
    from .dataset import DatasetError
    from .model_loading import ModelError
    from .saving import SaveError

    return ArgumentError, DatasetError, ModelError, SaveError


# import-time notices from optional accelerated kernels (no triton/CUDA on a CPU machine) that say nothing
# about this run; real errors from these libraries still show.
QUIET_LOGGERS = ("bitsandbytes", "torchao", "torch.utils._pytree")


def exit_on_sigterm():
    """SIGTERM (a job scheduler's stop, ``kill``) exits through Python's normal unwinding, so a save in progress
    removes its temp file instead of leaving it behind (the default action ends the process on the spot).
    Returns the previous handler (None when it could not be set)."""
    import signal

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread (embedded use): keep the default
        return None


class ProgressBarHandler(logging.Handler):
    """Log records printed with ``tqdm.write``, above the progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    previous = exit_on_sigterm()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # the optimizers' notices (library.hina logs at INFO, as kohya sd-scripts shows them): e.g. that the first
    # steps compile
    notices, handler = logging.getLogger("library.hina"), ProgressBarHandler()
    notices.addHandler(handler)
    level = notices.level
    notices.setLevel(logging.INFO)
    try:
        run(argv)
    except bad_input_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        notices.removeHandler(handler)
        notices.setLevel(level)
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)
    return 0
