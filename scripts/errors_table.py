"""The README's table of user mistakes, from the cases tests/test_errors.py runs (its MISTAKES).

    python scripts/errors_table.py          # print the markdown table
    python scripts/errors_table.py --write  # put it in README.md, between the errors-table markers

tests/test_errors.py::test_readme_lists_every_mistake checks that README.md holds the current table.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- errors-table start (scripts/errors_table.py) -->", "<!-- errors-table end -->"


def _mistakes() -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from test_errors import MISTAKES  # noqa: PLC0415
    finally:
        sys.path.remove(str(REPO / "tests"))
    return MISTAKES


def _shown(text: str) -> str:
    return text.replace("{tmp}", "DIR").replace("{files}", "DIR").replace("|", "\\|")


def render() -> str:
    """One row per case: the command (its tiny-run settings left out), what its one error line names, the exit code."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from conftest import FAST  # noqa: PLC0415
    finally:
        sys.path.remove(str(REPO / "tests"))
    rows = ["| Mistake | Command | The one `metalearn: error:` line names | Exit |", "|---|---|---|---|"]
    for name, (args, needles, code) in _mistakes().items():
        shown, skipped = [], False
        for a in args:
            if a.startswith("hydra.run.dir="):  # where the test puts the run
                continue
            if (a in FAST and not a.startswith("data=")) or a.startswith("trainer."):  # the tiny run's settings
                skipped = True
                continue
            shown.append(a)
        command = " ".join(["metalearn", *shown[:1], *(["…"] if skipped else []), *shown[1:]])
        names = ", ".join(f"`{_shown(n)}`" for n in needles)
        rows.append(f"| {name} | `{_shown(command)}` | {names} | {code} |")
    return "\n".join(rows) + "\n"


def in_readme(readme: str, table: str) -> str:
    """``readme`` with ``table`` between the markers."""
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}{END}{tail}"


def main(argv: list[str]) -> int:
    table = render()
    if argv == ["--write"]:
        readme = REPO / "README.md"
        readme.write_text(in_readme(readme.read_text(), table))
        return 0
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
