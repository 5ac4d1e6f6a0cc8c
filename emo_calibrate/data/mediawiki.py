"""MediaWiki XML dumps to plain prose: read pages, then turn wikitext into paragraphs of running text.

The wikitext is parsed with `mwparserfromhell` (a maintained MediaWiki parser) and rendered by a walk over its nodes:
templates, comments, references, tables, math, galleries, file/image and category links, headings and list items
are dropped; links keep their visible text; bold/italic markup keeps its contents; HTML entities are decoded.
A few inline templates that print words or numbers (`convert`, `lang`, `nihongo`, `chem`, `frac`, dashes, ...) are
rendered to their text, and sentences that lost a formula (`<math>`) are dropped rather than kept broken.
Whole sections that are not prose (See also, References, External links, Notes, Further reading, ...) are skipped.
"""

import bz2
import logging
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path


__all__ = ["clean_wikitext", "is_disambiguation", "iter_pages", "read_articles"]

logger = logging.getLogger(__name__)

SKIP_SECTIONS = frozenset(
    {
        "see also",
        "references",
        "external links",
        "external link",
        "notes",
        "further reading",
        "bibliography",
        "sources",
        "citations",
        "footnotes",
        "notes and references",
        "references and notes",
        "works cited",
        "gallery",
    }
)
# Tags whose contents are not running prose.
SKIP_TAGS = frozenset(
    {
        "ref",
        "references",
        "table",
        "gallery",
        "timeline",
        "imagemap",
        "score",
        "syntaxhighlight",
        "source",
        "pre",
        "chem",
        "ce",
        "hiero",
        "code",
        "templatestyles",
        "nowiki",
    }
)
SKIP_LINK_NAMESPACES = frozenset({"file", "image", "category", "media"})
_INTERWIKI = re.compile(r"^:?[a-z][a-z\-]{1,11}:", re.IGNORECASE)  # [[de:Albedo]], [[wikt:word]]
_LIST_MARK = "\x00"  # prefixed to lines that came from list items, which are dropped
_EMPTY_PARENS = re.compile(r"\(\s*(?:[,;:]\s*)*\)")  # "( ; )" left over from a removed pronunciation template
_PAREN_LEAD = re.compile(r"\(\s*(?:[,;:]\s*)+")  # "(;, Aristotélēs" -> "(Aristotélēs"
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
# References and comments are removed before parsing: an odd reference (a stray "|" or "{{" inside) can make the
# parser give up on it and leave it as plain text.
_REFS = re.compile(r"<ref\b[^>]*?/>|<ref\b[^>]*>.*?</ref\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
_LOST = "\x01"  # marks where a formula was removed; the sentence around it is dropped
# Markup the parser could not read: its sentence is dropped.
_DEBRIS = re.compile(r"\[\[|\]\]|\{\{|\}\}|</?ref\b", re.IGNORECASE)
_RANGE_WORDS = frozenset({"-", "–", "to", "and", "or", "by", "x", "×", "+/-", "±"})


def _convert(params: list[str]) -> str:
    """`{{convert|5|km|mi}}` -> "5 km"; `{{convert|5|to|10|km}}` -> "5 to 10 km" (the conversion is left out)."""
    if len(params) >= 4 and params[1] in _RANGE_WORDS:
        return f"{params[0]} {'–' if params[1] == '-' else params[1]} {params[2]} {params[3]}"
    return " ".join(params[:2])


# Inline templates that print text, rendered from their positional parameters; all other templates are dropped.
INLINE_TEMPLATES = {
    "convert": _convert,
    "cvt": _convert,
    "lang": lambda p: p[1] if len(p) > 1 else "",
    "transl": lambda p: p[-1] if p else "",
    "nihongo": lambda p: p[0] if p else "",
    "chem": "".join,
    "frac": lambda p: " ".join(p[:-2] + ["/".join(p[-2:])]) if len(p) >= 2 else "".join(p),
    "as of": lambda p: f"As of {' '.join(p[:3])}" if p else "",
    "ndash": lambda p: "–",
    "mdash": lambda p: "—",
    "snd": lambda p: " – ",
    "'": lambda p: "'",
    "'s": lambda p: "'s",
    **{
        name: lambda p: p[0] if p else ""
        for name in (
            "nowrap",
            "nobr",
            "smaller",
            "small",
            "sc",
            "smallcaps",
            "vanchor",
            "val",
            "angbr",
            "sic",
            "quote",
            "abbr",
        )
    },
}
_DISAMBIGUATION = re.compile(
    r"\{\{\s*(disambig\w*|dab|dmbox|set index|hndis|geodis|surname|given name)\s*[|}]", re.IGNORECASE
)


def _render(wikicode, out: list[str]) -> None:
    from mwparserfromhell.nodes import ExternalLink, HTMLEntity, Tag, Template, Text, Wikilink

    for node in wikicode.nodes:
        if isinstance(node, Text):
            out.append(node.value)
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, Wikilink):
            title = str(node.title).strip()
            namespace = title.lstrip(":").split(":", 1)[0].strip().lower() if ":" in title else ""
            if namespace in SKIP_LINK_NAMESPACES or _INTERWIKI.match(title):
                continue
            _render(node.text if node.text is not None else node.title, out)
        elif isinstance(node, ExternalLink):
            if node.title is not None:  # a bare URL has no visible prose
                _render(node.title, out)
        elif isinstance(node, Template):
            render = INLINE_TEMPLATES.get(str(node.name).strip().lower())
            if render is not None:
                params = [_plain(p.value) for p in node.params if not p.showkey]
                out.append(render(params))
        elif isinstance(node, Tag):
            name = str(node.tag).strip().lower()
            if name == "math":
                out.append(_LOST)
            elif name in SKIP_TAGS:
                continue
            elif name in ("li", "dt", "dd") and node.wiki_markup:  # "*", "#", ";" or ":" at the start of a line
                out.append("\n" + _LIST_MARK)
            elif name == "br":
                out.append(" ")
            elif node.contents is not None:
                _render(node.contents, out)
        # Other templates, comments, template arguments and headings render to nothing.


def _plain(wikicode) -> str:
    out: list[str] = []
    _render(wikicode, out)
    return " ".join("".join(out).split())


def clean_wikitext(wikitext: str) -> str:
    """Plain prose of a wikitext article: one paragraph per line, markup and non-prose sections removed.

    Example:
        >>> clean_wikitext("'''Albedo''' {{IPA|x}} is [[reflection|reflectivity]].<ref>Book</ref>\\n==See also==\\n* [[Snow]]")
        'Albedo is reflectivity.'
    """
    import mwparserfromhell

    code = mwparserfromhell.parse(_REFS.sub("", wikitext))
    out: list[str] = []
    skip_below = None  # heading level of a skipped section; its subsections are skipped too
    for section in code.get_sections(flat=True, include_lead=True):
        headings = section.filter_headings(recursive=False)
        if headings:
            heading = headings[0]
            if skip_below is not None and heading.level > skip_below:
                continue
            skip_below = None
            if heading.title.strip_code().strip().lower() in SKIP_SECTIONS:
                skip_below = heading.level
                continue
        out.append("\n")
        _render(section, out)
    paragraphs = []
    for line in "".join(out).split("\n"):
        line = line.strip()
        # List items (mostly link lists and bibliographies) and table debris are not running prose.
        if not line or line.startswith(_LIST_MARK) or line[0] in "|!{}":
            continue
        if _LOST in line or _DEBRIS.search(line):
            from .segment import split_sentences

            line = " ".join(s for s in split_sentences(line) if not (_LOST in s or _DEBRIS.search(s)))
        line = _PAREN_LEAD.sub("(", _EMPTY_PARENS.sub("", line))
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(line.split()))
        if line:
            paragraphs.append(line)
    return "\n".join(paragraphs)


def is_disambiguation(title: str, wikitext: str) -> bool:
    return title.endswith("(disambiguation)") or bool(_DISAMBIGUATION.search(wikitext))


def iter_pages(path: str | os.PathLike) -> Iterator[dict]:
    """Stream the pages of a MediaWiki XML export (plain or `.bz2`): dicts with title, ns, redirect, text."""
    path = Path(path)
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rb") as f:
        for _, elem in ET.iterparse(f, events=("end",)):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem}
            revision = fields.get("revision")
            text = None
            if revision is not None:
                text = next((c.text for c in revision if c.tag.rsplit("}", 1)[-1] == "text"), None)
            yield {
                "title": fields["title"].text or "",
                "ns": int(fields["ns"].text) if "ns" in fields else 0,
                "redirect": "redirect" in fields,
                "text": text or "",
            }
            elem.clear()


def read_articles(path: str | os.PathLike, min_words: int = 100) -> list[dict[str, str]]:
    """Articles of a MediaWiki dump as `{"title", "text"}` prose, skipping redirects, non-articles and stubs."""
    from tqdm.auto import tqdm

    articles = []
    skipped = {"redirect or other namespace": 0, "disambiguation": 0, "stub": 0}
    for page in tqdm(list(iter_pages(path)), desc="Cleaning wikitext", unit="page", leave=False):
        if page["redirect"] or page["ns"] != 0:
            skipped["redirect or other namespace"] += 1
            continue
        if is_disambiguation(page["title"], page["text"]):
            skipped["disambiguation"] += 1
            continue
        text = clean_wikitext(page["text"])
        if len(text.split()) < min_words:
            skipped["stub"] += 1
            continue
        articles.append({"title": page["title"], "text": text})
    words = sum(len(a["text"].split()) for a in articles)
    logger.info("%s: %d articles, %d words of prose (skipped: %s)", Path(path).name, len(articles), words, skipped)
    return articles
