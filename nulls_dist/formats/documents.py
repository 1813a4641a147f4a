"""Reading back the JSON documents the formats write or a user hands over (checkpoint meta, dataset manifest,
manifest index, forget sets, certificates, probe files): a file that is missing, unreadable or not JSON raises
ValueError -- or the format's own subclass of it -- naming the file (and the line, for JSON Lines).
Standard library only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json(path: str | os.PathLike, what: str = "JSON file", error: type[ValueError] = ValueError) -> Any:
    """The parsed document; `error` naming the file when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from None


def read_json_object(path: str | os.PathLike, what: str = "JSON file",
                     error: type[ValueError] = ValueError) -> dict[str, Any]:
    """`read_json` for a document that must be a JSON object."""
    doc = read_json(path, what, error)
    if not isinstance(doc, dict):
        raise error(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


def read_jsonl(path: str | os.PathLike, what: str = "JSON Lines file") -> list[Any]:
    """One parsed value per non-blank line; ValueError naming `path:line` for a line that is not JSON."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    out = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from None
    return out
