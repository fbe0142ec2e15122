"""The one reader of kohya-style TOML argument files (``--config_file``, ``configs/*.toml`` recipes).

sd-scripts (``train_util.read_config_from_file``) flattens the file: section names do not matter, every key
becomes an argument. Here the same, with two rules kohya leaves silent: nested sections flatten too, and a
key set twice (in two sections) is an error instead of the later one winning. Errors name the file and, for
bad TOML, the line and column.

It lives in ``library/hina`` (the drop-in package) so that both the recipes (``presets``) and the standalone
trainer's command line (``library/hina_train/args.py``) read files by the same rules.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


class ConfigFileError(ValueError):
    """A TOML argument file that cannot be read; the message names the file (and line:col when known)."""


def flatten(data: dict, where: str = "") -> dict[str, Any]:
    """``{key: value}`` from every table of ``data``; a key set in two tables raises ConfigFileError."""
    flat: dict[str, Any] = {}
    origin: dict[str, str] = {}

    def walk(table: dict, path: str) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value, f"{path}[{key}]")
                continue
            if key in flat:
                raise ConfigFileError(f"{where}key {key!r} is set twice ({origin[key] or 'top level'} and "
                                      f"{path or 'top level'}); sections are flattened, as in sd-scripts")
            flat[key] = value
            origin[key] = path

    walk(data, "")
    return flat


def read_flat(path: str | Path) -> dict[str, Any]:
    """Read ``path`` and flatten it (``flatten``); ConfigFileError when missing, not UTF-8 or not TOML."""
    import toml

    path = Path(path)
    if not path.is_file():
        raise ConfigFileError(f"{str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigFileError(f"{str(path)!r} is not UTF-8 text") from None
    except OSError as e:
        raise ConfigFileError(f"{str(path)!r} cannot be read: {e.strerror}") from None
    try:
        data = toml.loads(text)
    except toml.TomlDecodeError as e:
        raise ConfigFileError(f"{str(path)!r}:{e.lineno}:{e.colno}: invalid TOML: {e.msg}") from None
    except (IndexError, ValueError, TypeError) as e:  # the toml package trips over some bad input
        where = locate_error(text)
        raise ConfigFileError(f"{str(path)!r}:{where + ':' if where else ''} invalid TOML ({type(e).__name__} in "
                              "the parser)") from None
    return flatten(data, where=f"{str(path)!r}: ")


def locate_error(text: str) -> str:
    """``"line:col"`` of a TOML error as the stdlib parser (Python >= 3.11) reports it, or ``""``."""
    try:
        import tomllib
    except ImportError:
        return ""
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        found = re.search(r"line (\d+), column (\d+)", str(error))
        if found:
            return f"{found.group(1)}:{found.group(2)}"
        if "end of document" in str(error):
            lines = text.splitlines() or [""]
            return f"{len(lines)}:{len(lines[-1]) + 1}"
    return ""
