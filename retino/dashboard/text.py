"""User-given strings (run names, tags, paths, file names) shown as text in the dashboard's markdown.

Streamlit renders markdown in ``st.markdown``, ``st.caption``, ``st.write``, alerts, toasts and
widget labels: a run named ``![x](http://host/x.png)`` would make every browser that shows it fetch
that address, and ``[x](javascript:...)`` would be a link. A backslash before each character that can
open a markdown construct (CommonMark allows it before any ASCII punctuation) makes the name read
exactly as typed; punctuation that cannot ("-" inside a word, parentheses without brackets) is left
alone so that names like ``seed-1 (lab)`` stay as they are in the page's source.
"""
from __future__ import annotations

import re

# emphasis, code, links and images, HTML and autolinks, headings, tables, strikethrough, Streamlit's
# ":colour[...]" / ":material/icon:" directives and "$" LaTeX, entities
_ANYWHERE = re.compile(r"([\\`*_\[\]{}<>!#|~$:&])")
# list items, block quotes and thematic breaks open only at the start of a block
_AT_START = re.compile(r"^(\d{1,9})([.)])|^([-+=])")


def md_text(value) -> str:
    """``value`` as markdown that renders as exactly its text, on one line."""
    text = " ".join(str(value).split())  # a newline would start a new block (a heading, a list)
    text = _ANYWHERE.sub(r"\\\1", text)
    return _AT_START.sub(lambda m: f"{m[1]}\\{m[2]}" if m[1] else f"\\{m[3]}", text)
