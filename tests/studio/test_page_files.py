"""The studio page's files, read as text: every module it loads exists, nothing comes from another host, the
element ids the scripts look up are in the HTML, and the server hands the files out with types a browser runs."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import lcm_live

WEB = Path(lcm_live.__file__).resolve().parent / "web"
# import ... from "x"; import("x"); and a worker's script, new URL("x", import.meta.url)
JS_IMPORT = re.compile(r"""(?:^|\n)\s*import\s[^;]*?from\s+["']([^"']+)["']|import\(\s*["']([^"']+)["']\s*\)"""
                       r"""|new URL\(\s*["']([^"']+)["']\s*,\s*import\.meta\.url""")


class _Refs(HTMLParser):
    """Collects src/href of the document and the ids of its elements."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.ids: set[str] = set()
        self.inputs_in_controls = 0
        self._in_controls = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for name in ("src", "href"):
            if a.get(name):
                self.refs.append((tag, name, a[name]))
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "form" and a.get("id") == "controls":
            self._in_controls = True
        elif self._in_controls and tag in ("input", "select"):
            self.inputs_in_controls += 1

    def handle_endtag(self, tag):
        if tag == "form":
            self._in_controls = False


def _parse_index(page: str = "index.html") -> _Refs:
    parser = _Refs()
    parser.feed((WEB / page).read_text(encoding="utf-8"))
    return parser


# The pages: index.html is served at / (its files under static/), the others (the pop-out window) at /static/.
PAGES = sorted(p.name for p in WEB.glob("*.html"))


def _local_path(ref: str, page: str = "index.html") -> Path:
    """A reference of a page -> the file under web/ (the server maps /static/* to web/*)."""
    assert not ref.startswith(("/", "http:", "https:", "//")), f"{page} must use relative URLs: {ref}"
    if page != "index.html":
        return WEB / ref
    assert ref.startswith("static/"), f"index.html reference outside static/: {ref}"
    return WEB / ref.removeprefix("static/")


def _module_graph() -> set[Path]:
    """Every JS module reachable from the module scripts of the pages."""
    entries = [_local_path(v, page) for page in PAGES for tag, attr, v in _parse_index(page).refs
               if tag == "script" and attr == "src"]
    assert entries, "index.html loads no script"
    seen: set[Path] = set()
    todo = list(entries)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        assert path.is_file(), f"missing JS module: {path.relative_to(WEB)}"
        seen.add(path)
        for m in JS_IMPORT.finditer(path.read_text(encoding="utf-8")):
            spec = m.group(1) or m.group(2) or m.group(3)
            assert spec.startswith("./") or spec.startswith("../"), f"{path.name} imports a bare/remote module {spec!r}"
            todo.append((path.parent / spec).resolve())
    return seen


def test_every_referenced_file_exists():
    assert "index.html" in PAGES
    for page in PAGES:
        local = [v for _, _, v in _parse_index(page).refs if not v.startswith("data:")]
        assert any(v.endswith(".css") for v in local) and any(v.endswith(".js") for v in local), page
        for ref in local:
            assert _local_path(ref, page).is_file(), f"{page} references a missing file: {ref}"


def test_every_js_module_imported_exists_and_none_is_orphaned():
    reachable = _module_graph()
    on_disk = {p.resolve() for p in (WEB / "js").glob("*.js")}
    assert on_disk - reachable == set(), f"JS files no page loads: {sorted(p.name for p in on_disk - reachable)}"


def test_no_external_urls_anywhere_in_the_page():
    pattern = re.compile(r"""(https?:)?//[a-z0-9.-]+\.[a-z]{2,}|@import|url\(\s*["']?(?!data:)[a-z]+:""", re.I)
    for path in sorted(WEB.rglob("*")):
        if path.suffix not in {".html", ".css", ".js"}:
            continue
        text = path.read_text(encoding="utf-8")
        hits = [m.group(0) for m in pattern.finditer(text)]
        assert hits == [], f"{path.relative_to(WEB)} refers to another host: {hits}"


def test_ids_the_scripts_look_up_are_in_the_html():
    ids = _parse_index().ids  # the pop-out window's script looks up no id
    wanted: set[str] = set()
    for path in (WEB / "js").glob("*.js"):
        text = path.read_text(encoding="utf-8")
        wanted |= set(re.findall(r"""\$\(\s*["']([\w-]+)["']\s*\)""", text))
        wanted |= set(re.findall(r"""getElementById\(\s*["']([\w-]+)["']\s*\)""", text))
    assert wanted, "the scripts look up no element by id (the pattern is stale)"
    assert wanted - ids == set(), f"ids used by the scripts but missing from index.html: {sorted(wanted - ids)}"


def test_generation_controls_are_not_hard_coded():
    """Steps, guidance, size... are built from GET /api/schema: the HTML form starts empty of inputs, and no
    script writes a bound of the protocol's schema as a literal."""
    assert _parse_index().inputs_in_controls == 0
    controls = (WEB / "js" / "controls.js").read_text(encoding="utf-8")
    for literal in ("768", "256", "4294967295", "0.05"):
        assert literal not in controls, f"controls.js hard-codes {literal}"


def test_the_server_serves_the_page_with_runnable_types():
    """Module scripts only run with a JavaScript MIME type; the page must come from / and its files from /static."""
    from fastapi.testclient import TestClient

    from lcm_live.config import Settings
    from lcm_live.studio.app import create_app
    from lcm_live.studio.fake_engine import FakeEngine

    app = create_app(Settings(), engine_factory=FakeEngine)
    with TestClient(app, base_url="http://127.0.0.1:7860") as client:  # a loopback Host passes the guard
        page = client.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        for path in sorted(_module_graph()):
            res = client.get(f"/static/{path.relative_to(WEB).as_posix()}")
            assert res.status_code == 200, path
            assert "javascript" in res.headers["content-type"], (path, res.headers["content-type"])
        css = client.get("/static/style.css")
        assert css.status_code == 200 and "text/css" in css.headers["content-type"]
