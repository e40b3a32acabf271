"""CSV/TSV tables of examples (text CSVs, image CSVs): rows checked the same way for both.

The delimiter follows the extension (.tsv: tab, else comma); the header must name the wanted
columns; blank lines are skipped; a row with another number of fields than the header is a
UserError at file:line, with a hint when the file looks like the other delimiter.
"""

import csv
from collections.abc import Iterator

from tf_finetune.errors import UserError


def rows(path: str, wanted: list[str], flags: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: stripped cell}) for each non-blank row after the header.

    Args:
      wanted: the columns the header must name (a UserError names the missing ones).
      flags: the flags that set those columns, for the message (e.g. "--file_column/--label_column").
    """
    tsv = path.lower().endswith(".tsv")
    delimiter, other = ("\t", ",") if tsv else (",", "\t")
    hint = (
        "it looks comma-separated: name the file .csv"
        if tsv
        else "it looks tab-separated: name the file .tsv"
    )
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise UserError(f"{path}: empty file; the first line must name the columns.")
        header = [h.strip() for h in header]
        missing = [c for c in wanted if c not in header]
        if missing:
            why = hint if len(header) == 1 and other in header[0] else f"columns are {header}"
            raise UserError(
                f"{path}:1: no column {', '.join(missing)} in the header ({why}); set {flags}."
            )
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if len(row) != len(header):
                why = (
                    hint
                    if len(row) == 1 and other in row[0]
                    else f"quote fields that contain {delimiter!r}"
                )
                raise UserError(
                    f"{path}:{reader.line_num}: {len(row)} field(s) where "
                    f"the header has {len(header)} ({why})."
                )
            yield reader.line_num, {c: row[header.index(c)].strip() for c in wanted}
