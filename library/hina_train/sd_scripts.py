"""Delegation to a kohya sd-scripts checkout: its own ``NetworkTrainer`` with the Hina registry hooked in.

Used when ``--sd_scripts PATH`` is given, or when ``train_network_hina.py`` runs from a checkout's root (a
folder with ``train_network.py`` and ``library/train_util.py``). The checkout's ``library`` package replaces
ours in ``sys.modules``; if the checkout has no ``library/hina`` (not copied in yet), ours is made visible
as ``library.hina`` by extending the package path. Then ``library.hina.kohya.install()`` hooks the registry
into sd-scripts' optimizer selection, and ``train_network`` (``sdxl_train_network`` with ``--sdxl``) parses
the remaining arguments with its own parser and trains.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

OUR_LIBRARY = Path(__file__).resolve().parent.parent


class CheckoutError(ValueError):
    """The sd-scripts path is not a usable checkout."""


def is_checkout(path: Path) -> bool:
    return (path / "train_network.py").is_file() and (path / "library" / "train_util.py").is_file()


def find_checkout(argv: list[str]) -> Path | None:
    """The checkout named by ``--sd_scripts``, or the current folder when it is one; else None."""
    for i, arg in enumerate(argv):
        value = None
        if arg == "--sd_scripts":
            if i + 1 >= len(argv):
                raise SystemExit("error: --sd_scripts needs the path of an sd-scripts checkout")
            value = argv[i + 1]
        elif arg.startswith("--sd_scripts="):
            value = arg.split("=", 1)[1]
        if value is not None:
            path = Path(value).expanduser().resolve()
            if not is_checkout(path):
                raise SystemExit(f"error: --sd_scripts {value!r} is not an sd-scripts checkout "
                                 "(expected train_network.py and library/train_util.py in it)")
            return path
    cwd = Path.cwd()
    return cwd if is_checkout(cwd) else None


def strip_flag(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--sd_scripts":
            skip = True
            continue
        if arg.startswith("--sd_scripts="):
            continue
        out.append(arg)
    return out


def _use_checkout_library(checkout: Path) -> None:
    for name in [n for n in sys.modules if n == "library" or n.startswith("library.")]:
        del sys.modules[name]
    # our repo root would shadow the checkout's packages (our networks/ is a regular package, theirs is not)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != OUR_LIBRARY.parent]
    sys.path.insert(0, str(checkout))
    library = importlib.import_module("library")
    if not (checkout / "library" / "hina").is_dir():
        library.__path__.append(str(OUR_LIBRARY))  # library.hina from this project
    if not (checkout / "networks" / "lokr.py").is_file():
        spec = importlib.util.spec_from_file_location("networks.lokr", OUR_LIBRARY.parent / "networks" / "lokr.py")
        module = importlib.util.module_from_spec(spec)
        package = importlib.import_module("networks")
        sys.modules["networks.lokr"] = module
        spec.loader.exec_module(module)
        package.lokr = module


def run(checkout: Path, argv: list[str]) -> int:
    sdxl = "--sdxl" in argv
    argv = [a for a in argv if a != "--sdxl"]
    _use_checkout_library(checkout)
    train_util = importlib.import_module("library.train_util")  # import errors surface here, not inside install()
    hooked = importlib.import_module("library.hina.kohya").install(train_util=train_util)
    if not hooked["get_optimizer"]:
        raise CheckoutError(f"could not hook library.train_util.get_optimizer in {checkout}")
    module = importlib.import_module("sdxl_train_network" if sdxl else "train_network")
    parser = module.setup_parser()
    # sd-scripts re-reads sys.argv (read_config_from_file parses it again over the config's values), so
    # sys.argv must hold what its own script would have got: without --sd_scripts and --sdxl.
    sys.argv = [str(checkout / f"{module.__name__}.py"), *argv]
    args = parser.parse_args(argv)
    if hasattr(train_util, "verify_command_line_training_args"):
        train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    trainer = module.SdxlNetworkTrainer() if sdxl else module.NetworkTrainer()
    print(f"delegating to sd-scripts at {checkout} ({module.__name__}.{type(trainer).__name__})")
    trainer.train(args)
    return 0
