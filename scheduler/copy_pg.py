"""Bulk insert of job rows through PostgreSQL's COPY (text format)."""
from __future__ import annotations

import json
from datetime import datetime

JSON_COLUMNS = {"messages", "sampling"}
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_field(value, is_json: bool, dumps=json.dumps) -> str:
    """One field in COPY's text format."""
    if value is None:
        return "\\N"
    if is_json:
        value = dumps(value)
    elif isinstance(value, bool):
        return "t" if value else "f"
    elif isinstance(value, datetime):
        return value.isoformat(" ")
    elif not isinstance(value, str):
        return str(value)
    return value.translate(_ESCAPES)


def copy_jobs(conn, rows: list[dict]) -> None:
    """Bulk insert through PostgreSQL's COPY (text format), in the caller's transaction.

    Columns that are NULL in every row are left out (they default to NULL); columns with one
    value in every row (status, timestamps of one submit...) are formatted once.
    """
    first = rows[0]
    varying, constant = [], []
    for c in first:
        v0 = first[c]
        if c == "id":  # unique: never constant (and a line must not start with a tab)
            varying.append(c)
            continue
        same = all(r[c] is v0 for r in rows) or (
            not isinstance(v0, (dict, list)) and all(r[c] == v0 for r in rows))
        if same and v0 is None:
            continue
        (constant if same else varying).append(c)
    suffix = "".join("\t" + _copy_field(first[c], c in JSON_COLUMNS) for c in constant)
    memo: dict[int, str] = {}  # specs often share one sampling dict: encode it once

    def field(value, j: bool) -> str:
        if j and value is not None:
            key = id(value)
            if key not in memo:
                memo[key] = _copy_field(value, True)
            return memo[key]
        return _copy_field(value, False)

    is_json = [c in JSON_COLUMNS for c in varying]
    cols = ", ".join(varying + constant)
    raw = conn.connection.driver_connection
    with raw.cursor() as cur, cur.copy(f"COPY jobs ({cols}) FROM STDIN") as copy:
        for start in range(0, len(rows), 2000):
            copy.write("".join(
                "\t".join([field(r[c], j) for c, j in zip(varying, is_json)]) + suffix + "\n"
                for r in rows[start:start + 2000]))
