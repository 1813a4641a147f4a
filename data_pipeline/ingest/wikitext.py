"""Wikitext -> plain text with mwparserfromhell.

Kept: prose, link texts, headings (as their own lines), list items. Dropped: templates (infoboxes,
citations, navboxes), <ref> and other invisible tags, tables, comments, file/image/category links,
interlanguage links and behaviour switches (__TOC__ ...).
"""
from __future__ import annotations

import re

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

