"""Names are text: a run named with markdown (an image, a javascript: link) renders as its own text on the
Compare and Train pages, never as an image the browser fetches or a link."""

import markdown_it
import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO
from retino import paths
from retino import runs
from retino.dashboard.text import md_text
from test_screen import fresh_run

NAMES = ["![img](http://host/x.png)", "[x](javascript:alert(1))", "**bold** <b>x</b> `code` :red[x] $x$",
         "# heading\n- item", "a_b*c* \\ end", "- item", "+ item", "1. item", "2) item", "> quote", "---",
         "=== x", "&lt;b&gt;", "<http://host/x>", "| a | b |", "~~gone~~", ":material/home: x"]


@pytest.mark.parametrize("name", NAMES)
def test_md_text_renders_as_the_text_itself(name):
    html = markdown_it.MarkdownIt("commonmark").render(md_text(name))
    assert "<img" not in html and "<a " not in html and "<strong>" not in html and "<h1>" not in html
    inline = markdown_it.MarkdownIt("commonmark").parse(md_text(name))[1]
    assert [t.type for t in inline.children] == ["text"] * len(inline.children)
    assert "".join(t.content for t in inline.children) == " ".join(name.split())


def _elements(at) -> list[str]:
    return [e.value for kind in ("markdown", "caption", "warning", "error", "info", "success")
            for e in getattr(at, kind)]


@pytest.mark.parametrize("page", ["pages/compare.py", "pages/train.py"])
def test_a_run_named_with_markdown_shows_as_text(page, tmp_path):
    run = fresh_run(paths.runs_root() / "20260101-000000-run")
    runs.set_meta(run, name="![img](http://host/x.png) [x](javascript:alert(1))")
    at = AppTest.from_file(str(REPO / "app.py"), default_timeout=60)
    at.run()
    at.switch_page(page).run()
    assert not at.exception, at.exception
    shown = [v for v in _elements(at) if "host" in v]
    assert shown, _elements(at)  # the name is on the page ...
    for value in shown:  # ... and only as escaped text
        html = markdown_it.MarkdownIt("commonmark").render(value)
        assert "<img" not in html and "<a " not in html and "![img](" not in value, value
