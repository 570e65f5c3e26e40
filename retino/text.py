"""User-given strings (run names, tags, paths, file names) shown as text in the dashboard's markdown.

Streamlit renders markdown in ``st.markdown``, ``st.caption``, ``st.write``, alerts, toasts and
widget labels: a run named ``![x](http://host/x.png)`` would make every browser that shows it fetch
that address, and ``[x](javascript:...)`` would be a link. Escaping every ASCII punctuation mark
with a backslash (CommonMark allows it for all of them) makes the name read exactly as typed.
"""
from __future__ import annotations

import re

# CommonMark's escapable characters: every ASCII punctuation mark (spec 0.31, "Backslash escapes");
# ":" and "$" also start Streamlit's colour/icon directives and LaTeX.
_PUNCTUATION = re.compile(r"""([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])""")


def md_text(value) -> str:
    """``value`` as markdown that renders as exactly its text, on one line."""
    text = " ".join(str(value).split())  # a newline would start a new block (a heading, a list)
    return _PUNCTUATION.sub(r"\\\1", text)
