"""Wikitext -> plain text with mwparserfromhell, in this process or in parallel worker processes.

Kept: prose, link texts, headings (as their own lines), list items. Dropped: templates (infoboxes,
citations, navboxes), <ref> and other invisible tags, tables, comments, file/image/category links,
interlanguage links and behaviour switches (__TOC__ ...).

`convert_pages` converts a stream of pages with `num_workers` spawned processes: pages go out in chunks,
at most `2 * num_workers` chunks are in flight (memory stays flat whatever the dump size), and results come
back in input order, so the output is identical to one worker's.
"""
from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from multiprocessing import get_context

import mwparserfromhell
from mwparserfromhell.nodes import Wikilink

# Link namespaces whose target is not prose (English names; `:` before them makes a plain link).
_DROP_LINK_PREFIXES = ("file:", "image:", "media:", "category:")
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(-[a-z]+)?:")
_DROP_TAGS = {"table", "gallery", "references", "ref", "math", "timeline", "imagemap", "score"}
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_BLANK_LINES = re.compile(r"\n{3,}")
_SPACES = re.compile(r"[ \t]+")
_EMPTY_PARENS = re.compile(r" ?\([\s,;]*\)")  # what is left of "(" + {{lang|..}} + ")"


def _drop_link(link: Wikilink) -> bool:
    target = str(link.title).strip().lower()
    if target.startswith(":"):
        return False
    return target.startswith(_DROP_LINK_PREFIXES) or bool(_INTERLANGUAGE.match(target))


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:  # already gone with a removed parent
        pass


def wikitext_to_text(wikitext: str) -> str:
    """Plain article text from wikitext (deterministic; empty when only markup remains)."""
    code = mwparserfromhell.parse(wikitext)
    for link in code.filter_wikilinks():
        if _drop_link(link):
            _remove(code, link)
    for tag in code.filter_tags():
        if str(tag.tag).strip().lower() in _DROP_TAGS:
            _remove(code, tag)
    text = code.strip_code(normalize=True, collapse=True)
    text = _EMPTY_PARENS.sub("", _MAGIC_WORD.sub("", text))
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _convert(wikitext: str) -> tuple[str, bool]:
    """(plain text, failed): a parser failure keeps the raw wikitext rather than losing the article."""
    try:
        return wikitext_to_text(wikitext), False
    except Exception:
        return wikitext, True


def _convert_chunk(wikitexts: list[str]) -> list[tuple[str, bool]]:
    return [_convert(w) for w in wikitexts]


def convert_pages(pages: Iterable[tuple], stats: Counter, num_workers: int = 1,
                  chunk_pages: int = 64) -> Iterator[tuple]:
    """pages: (*fields, wikitext) -> (*fields, text), in input order; parser failures are counted in
    `stats["xml_wikitext_errors"]`. num_workers > 1: chunks of `chunk_pages` pages are converted by that many
    spawned processes, at most 2 * num_workers chunks in flight (only the wikitext travels)."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    pages = iter(pages)
    if num_workers == 1:
        for *fields, wikitext in pages:
            text, failed = _convert(wikitext)
            if failed:
                stats["xml_wikitext_errors"] += 1
            yield (*fields, text)
        return
    # spawn, not fork: the caller may hold pyarrow's thread pools
    with ProcessPoolExecutor(num_workers, mp_context=get_context("spawn")) as pool:
        in_flight: deque = deque()  # (fields of each page, future of their texts)
        while chunk := list(islice(pages, chunk_pages)):
            in_flight.append(([p[:-1] for p in chunk], pool.submit(_convert_chunk, [p[-1] for p in chunk])))
            del chunk
            if len(in_flight) >= 2 * num_workers:
                yield from _finished(in_flight.popleft(), stats)
        while in_flight:
            yield from _finished(in_flight.popleft(), stats)


def _finished(item, stats: Counter) -> Iterator[tuple]:
    fields, future = item
    for page_fields, (text, failed) in zip(fields, future.result()):
        if failed:
            stats["xml_wikitext_errors"] += 1
        yield (*page_fields, text)
