"""docs/KOHYA_PARITY.md stays in sync with the parser: every kohya train_network.py option is known to it, and
each row's status is what args.py does with the option today (regenerate the page with
``benchmarks/kohya_parity.py`` after moving an option)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import kohya_parity  # noqa: E402

from library.hina_train.args import ArgumentError, parse_args  # noqa: E402

ROWS, COMMIT = kohya_parity.options_from_page(kohya_parity.PAGE)
STATUS = {m.group(1): m.group(3) for line in kohya_parity.PAGE.read_text().splitlines()
          if (m := kohya_parity.ROW.match(line))}


def test_page_lists_kohyas_whole_parser_from_a_recorded_commit():
    assert len(ROWS) == 193 and len(set(o for o, _ in ROWS)) == 193
    assert re.fullmatch(r"[0-9a-f]{40}", COMMIT)


def test_no_option_is_unknown():
    assert [o for o, s in STATUS.items() if s == "unknown"] == []


@pytest.mark.parametrize("option", sorted(STATUS))
def test_row_matches_the_parser(option):
    status, _ = kohya_parity.classify(option)
    assert STATUS[option] == status, (f"--{option}: the page says {STATUS[option]}, args.py makes it {status}; "
                                      "run benchmarks/kohya_parity.py")


def test_summary_line_counts_the_rows():
    text = kohya_parity.PAGE.read_text()
    counts = {s: list(STATUS.values()).count(s) for s in ("implemented", "inert", "refused", "unknown")}
    assert f"{counts['implemented']} implemented, {counts['inert']} inert" in text
    assert f"{counts['refused']} refused" in text


@pytest.mark.parametrize("option", sorted(o for o, s in STATUS.items() if s == "refused"))
def test_refused_options_fail_with_the_kohya_message(option):
    with pytest.raises(ArgumentError, match=f"--{option} is a kohya sd-scripts option"):
        parse_args([f"--{option}"])


@pytest.mark.parametrize("option", sorted(o for o, s in STATUS.items() if s == "inert"))
def test_inert_options_print_a_notice(option, capsys):
    parse_args([f"--{option}"])
    assert f"--{option} has no effect here" in capsys.readouterr().out
