"""Build-time helpers of the documentation site (not part of the site; ``tests/test_docs.py`` imports it).

* :func:`public_names`: the one rule that says which names of a module are public, shared by
  the site (what the API reference renders) and the tests (what must be documented).
* :class:`DocstringsForMarkdown`: a griffe extension. The library's docstrings are written for
  ``help()`` and doctest (reST roles, ``>>>`` examples, ``::`` literal blocks); it turns those
  into Markdown, and gives a package without ``__all__`` its imports as exports, so that
  ``::: detloss.matching`` renders every name the package offers.
* ``on_page_markdown``: the mkdocs hook that expands ``<!-- detloss-index -->`` into the table
  of every top-level ``detloss`` name with a link to where it is documented.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import types
from pathlib import Path
from typing import Any

try:
    import griffe
except ImportError:  # tests/test_docs.py reads this file without the docs extra
    griffe = None

DOCS = Path(__file__).resolve().parent

# The modules whose public names the API reference documents (issue #26), and the pages that
# render them. Every detloss.compat module is added by compat_modules().
REFERENCED = ("detloss", "detloss.functional", "detloss.matching", "detloss.sampling", "detloss.boxes",
              "detloss.priors", "detloss.coders")


def compat_modules() -> list[str]:
    """Every ``detloss.compat`` module (each file of the package), as dotted names."""
    compat = importlib.import_module("detloss.compat")
    names = sorted(m.name for m in pkgutil.iter_modules(compat.__path__) if not m.name.startswith("_"))
    return [f"detloss.compat.{name}" for name in names]


def referenced_modules() -> list[str]:
    return [*REFERENCED, *compat_modules()]


def public_names(module: types.ModuleType) -> list[str]:
    """The public names of ``module``, in the order the reference renders them.

    ``__all__`` where the module declares it. Otherwise, names starting with ``_`` and
    submodules are never public, and: a package (``__init__``) offers everything it imports;
    a plain module the classes and functions it defines and the names it assigns at top level.
    """
    if hasattr(module, "__all__"):
        return list(module.__all__)
    names = [n for n, obj in vars(module).items() if not n.startswith("_") and not isinstance(obj, types.ModuleType)]
    if hasattr(module, "__path__"):
        return names
    source = inspect.getsource(module)
    return [
        n for n in names
        if getattr(getattr(module, n), "__module__", None) == module.__name__
        or re.search(rf"^{re.escape(n)}\s*[:=]", source, re.M)
    ]


def needs_docstring(obj: object) -> bool:
    """Classes and functions carry a docstring; constants are rendered with their value."""
    return inspect.isclass(obj) or inspect.isroutine(obj)


def directives(text: str) -> list[tuple[str, str]]:
    """``(identifier, options block)`` of each ``::: identifier`` directive of a Markdown page."""
    found = []
    for match in re.finditer(r"^::: *([\w.]+)[ \t]*\n((?:[ \t]+\S.*\n?)*)", text, re.M):
        found.append((match.group(1), match.group(2)))
    return found


# --- docstrings: reST -> Markdown ---------------------------------------------------------

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|obj|exc|const):`~?([^`]+)`")
_PROMPT = re.compile(r"^(\s*)(>>>|\.\.\.)( |$)")


def _doctest_fences(text: str) -> str:
    """Wrap each run of ``>>>`` lines (and the output lines after them) in a ``pycon`` fence."""
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">>>") and not (out and out[-1].lstrip().startswith("```")):
            indent = line[: len(line) - len(line.lstrip())]
            block = []
            while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
                block.append(lines[i][len(indent):])
                i += 1
            if out and out[-1].strip():
                out.append("")
            out.extend([f"{indent}```pycon", *(indent + b for b in block), f"{indent}```"])
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def _resolve(name: str, context: str) -> object:
    """The object a role names: a dotted path, or a name relative to module ``context``."""
    for base in ([name] if name.startswith("detloss") else [f"{context}.{name}", name]):
        parts = base.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                break
            return obj
    return None


def markdown_docstring(text: str, context: str = "", anchors: "dict[int, str] | None" = None) -> str:
    """The library's docstring conventions as Markdown (idempotent).

    A role (``:func:`x```) becomes code; with ``anchors`` (``id(object) -> identifier`` of what
    the reference renders) a cross-reference to it where the object is rendered somewhere.
    """
    if "```pycon" in text:
        return text

    def role(match: "re.Match") -> str:
        name = match.group(1)
        obj = _resolve(name, context) if anchors else None
        if obj is not None and (needs_docstring(obj) or inspect.ismodule(obj)):  # ids of constants may be shared
            target = anchors.get(id(obj))
            if target:
                return f"[``{name}``][{target}]"
        return f"``{name}``"

    text = _ROLE.sub(role, text)
    text = re.sub(r" ::$", "", text, flags=re.M)        # "text. ::" + indented block
    text = re.sub(r"(\S)::$", r"\1:", text, flags=re.M)  # "text::" + indented block
    return _doctest_fences(text)


_Extension = griffe.Extension if griffe is not None else object


class DocstringsForMarkdown(_Extension):
    """See the module docstring."""

    def on_package(self, *, pkg: Any, **kwargs: Any) -> None:
        if pkg.name != "detloss":
            return
        anchors = {key: home.split("#")[1] for key, home in reference_homes().items()}
        self._walk(pkg, set(), anchors)

    def _walk(self, obj: Any, seen: set, anchors: dict) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value, obj.module.path, anchors)
        if obj.is_module and obj.is_init_module and not obj.exports:
            runtime = importlib.import_module(obj.path)
            obj.exports = public_names(runtime)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen, anchors)


# --- the top-level index --------------------------------------------------------------------

INDEX_MARKER = "<!-- detloss-index -->"


def reference_homes() -> dict[int, str]:
    """``id(object) -> anchor path`` of every object the reference pages render."""
    homes: dict[int, str] = {}
    for page in sorted((DOCS / "reference").glob("*.md")):
        for identifier, _ in directives(page.read_text()):
            try:
                module = importlib.import_module(identifier)
            except ImportError:
                owner, _, name = identifier.rpartition(".")
                obj = getattr(importlib.import_module(owner), name)
                homes.setdefault(id(obj), f"{page.stem}.md#{identifier}")
                continue
            for name in public_names(module):
                obj = getattr(module, name)
                homes.setdefault(id(obj), f"{page.stem}.md#{identifier}.{name}")
    return homes


def index_table() -> str:
    """The index of every top-level name; a name no reference page renders is rendered here."""
    import detloss

    homes = reference_homes()
    rows = ["| name | what it is | documented at |", "|---|---|---|"]
    here = []
    for name in sorted(public_names(detloss), key=str.lower):
        obj = getattr(detloss, name)
        summary = (inspect.getdoc(obj) or "").strip().split("\n")[0] if needs_docstring(obj) else ""
        summary = markdown_docstring(summary).replace("|", "\\|")
        home = homes.get(id(obj))
        if home is None:
            here.append(name)
            home = f"index.md#detloss.{name}"
        page, anchor = home.split("#")
        rows.append(f"| `detloss.{name}` | {summary} | [`{anchor}`]({page}#{anchor}) |")
    if here:
        rows += ["", "## Other top-level names", ""]
        rows += [f"::: detloss.{name}\n    options:\n      heading_level: 3\n" for name in here]
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if INDEX_MARKER in markdown:
        markdown = markdown.replace(INDEX_MARKER, index_table())
    return markdown
