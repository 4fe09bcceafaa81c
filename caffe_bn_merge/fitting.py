"""Fitting names into table columns without breaking them mid-word (no rich, no printing)."""

import re

_NAME_PIECE = re.compile(r"[^/_.:-]*[/_.:-]*")  # a name's pieces, each ending in its separators


def fold_name(name: str, width: int) -> str:
    """`name` on lines of at most `width` characters, broken only after a separator (/ _ . : -)
    when it can be; a piece longer than `width` alone is cut."""
    lines = [""]
    for piece in filter(None, _NAME_PIECE.findall(name)):
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
        while len(lines[-1]) > width:
            lines[-1:] = [lines[-1][:width], lines[-1][width:]]
    return "\n".join(lines)
