#!/usr/bin/env python
"""Write docs/KOHYA_PARITY.md: every option of sd-scripts' ``train_network.py`` parser and what
``train_network_hina.py`` does with it.

    .venv/bin/python benchmarks/kohya_parity.py --sd-scripts PATH   # an sd-scripts checkout or bare git dir
    .venv/bin/python benchmarks/kohya_parity.py                     # reuse the option list already in the page

kohya's options are read statically (``ast``, nothing of sd-scripts is imported or run): the
``add_argument("--name")`` calls in ``train_network.py``'s ``setup_parser`` and in every ``add_*_arguments``
function it calls (``library/train_util.py``, ``sai_model_spec.py``, ``deepspeed_utils.py``, ``config_util.py``,
``custom_train_functions.py``, ``utils.py``); the page records the sd-scripts commit. Without ``--sd-scripts``
the option list (and commit) in the existing page is reclassified, so the page follows args.py's changes
without a checkout.

Each option is classified from ``library/hina_train/args.py`` (the test ``tests/test_parity.py`` checks the page
against it): ``implemented`` (parsed and used), ``inert`` (accepted with a printed notice saying why it changes
nothing here, ``args.INERT``), ``refused`` (fails with "a kohya sd-scripts option that train_network_hina.py does
not support", ``args.UNSUPPORTED``), ``unknown`` (argparse's generic error; should never appear).
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PAGE = ROOT / "docs" / "KOHYA_PARITY.md"
SOURCES = ("train_network.py", "library/train_util.py", "library/sai_model_spec.py", "library/deepspeed_utils.py",
           "library/config_util.py", "library/custom_train_functions.py", "library/utils.py")
ROW = re.compile(r"^\| `--([a-z0-9_]+)` \| ([a-z_]+) \| ([a-z]+) \|")


def _read(repo: Path, path: str) -> tuple[str, str]:
    """(text, commit) of ``path`` in a checkout or a bare git dir."""
    if (repo / path).is_file():
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
        return (repo / path).read_text(encoding="utf-8"), commit.stdout.strip() or "unknown"
    git = ["git", "--git-dir", str(repo)]
    text = subprocess.run(git + ["show", f"HEAD:{path}"], capture_output=True, text=True, check=True).stdout
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    return text, commit


def _call_name(node: ast.Call) -> str | None:
    return node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)


def _options_of(function: ast.FunctionDef) -> list[str]:
    names = []
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and _call_name(node) == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("--"):
                    names.append(arg.value[2:])
                    break
    return names


def kohya_options(repo: Path) -> tuple[list[tuple[str, str]], str]:
    """[(option, the function that adds it)] in parser order, and the sd-scripts commit."""
    functions: dict[str, ast.FunctionDef] = {}
    commit = "unknown"
    for path in SOURCES:
        text, commit = _read(repo, path)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef):
                key = "setup_parser" if path == "train_network.py" and node.name == "setup_parser" else node.name
                if key == "setup_parser" and path != "train_network.py":
                    continue
                functions.setdefault(key, node)
    setup = functions["setup_parser"]
    options: list[tuple[str, str]] = []
    for node in ast.walk(setup):  # the add_*_arguments helpers, then setup_parser's own options
        if isinstance(node, ast.Call) and (name := _call_name(node)) and name.startswith("add_") \
                and name.endswith("_arguments") and name in functions:
            options += [(o, name) for o in _options_of(functions[name])]
    options += [(o, "setup_parser") for o in _options_of(setup)]
    seen, unique = set(), []
    for option, where in options:
        if option not in seen:
            seen.add(option)
            unique.append((option, where))
    return unique, commit


def options_from_page(page: Path) -> tuple[list[tuple[str, str]], str]:
    text = page.read_text(encoding="utf-8")
    commit = re.search(r"sd-scripts commit `([0-9a-f]+|unknown)`", text)
    rows = [(m.group(1), m.group(2)) for line in text.splitlines() if (m := ROW.match(line))]
    return rows, commit.group(1) if commit else "unknown"


def classify(option: str) -> tuple[str, str]:
    """(status, note) of a kohya option in this trainer's parser."""
    from library.hina_train.args import INERT, UNSUPPORTED, build_parser

    if option in UNSUPPORTED:
        return "refused", "fails at once: kohya option not supported here (run inside sd-scripts with --sd_scripts)"
    if option in INERT:
        return "inert", f"notice: {INERT[option]}"
    actions = {a.dest: a for a in build_parser()._actions}
    if option not in actions:
        return "unknown", "argparse: unrecognized arguments"
    help_text = actions[option].help
    note = "" if help_text in (None, argparse.SUPPRESS) else " ".join(str(help_text).split())
    return "implemented", note.replace("|", "/").replace("%%", "%")


def write_page(options: list[tuple[str, str]], commit: str) -> dict[str, int]:
    rows, counts = [], {"implemented": 0, "inert": 0, "refused": 0, "unknown": 0}
    for option, where in options:
        status, note = classify(option)
        counts[status] += 1
        rows.append(f"| `--{option}` | {where} | {status} | {note} |")
    lines = [
        "# kohya train_network.py options in train_network_hina.py",
        "",
        f"Generated by `benchmarks/kohya_parity.py` from sd-scripts commit `{commit}` (its `train_network.py` "
        "`setup_parser` and the `add_*_arguments` functions it calls, read statically); `tests/test_parity.py` "
        "checks every row against `library/hina_train/args.py`.",
        "",
        f"{len(options)} options: {counts['implemented']} implemented, {counts['inert']} inert (accepted with a "
        f"notice saying why), {counts['refused']} refused (a clear error), {counts['unknown']} unknown.",
        "",
        "- implemented: parsed and used as kohya uses it (the note is our `--help` text);",
        "- inert: accepted, prints why it changes nothing here;",
        "- refused: fails before anything loads with \"--NAME is a kohya sd-scripts option that "
        "train_network_hina.py does not support\" (inside an sd-scripts checkout, `--sd_scripts PATH` runs kohya's "
        "own trainer with the Hina optimizers).",
        "",
        "| option | kohya parser function | status | note |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    from library.hina_train.saving import atomic_write

    atomic_write(PAGE, lambda tmp: Path(tmp).write_text("\n".join(lines), encoding="utf-8"))
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd-scripts", type=Path, default=None,
                        help="sd-scripts checkout or bare git dir (default: reuse the option list in the page)")
    args = parser.parse_args(argv)
    if args.sd_scripts is not None:
        options, commit = kohya_options(args.sd_scripts)
    elif PAGE.is_file():
        options, commit = options_from_page(PAGE)
    else:
        parser.error(f"{PAGE} does not exist yet: give --sd-scripts PATH")
    counts = write_page(options, commit)
    print(f"wrote {PAGE}: {len(options)} options, " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 0 if counts["unknown"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
