"""The documentation site (``mkdocs.yml``, ``docs/``): complete reference, runnable pages.

No mkdocs at test time: the reference's coverage is read from the ``::: identifier``
directives of ``docs/reference/*.md`` and the options in ``mkdocs.yml``, with the rule of
public names the site itself uses (``docs/hooks.py``); ``mkdocs build --strict`` in
``.ci/run`` checks that every directive resolves.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MKDOCS_YML = ROOT / "mkdocs.yml"


def _load_hooks():
    spec = importlib.util.spec_from_file_location("detloss_docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


hooks = _load_hooks()


# ----------------------------------------------------------------------------- the checks
def undocumented(module: types.ModuleType) -> list[str]:
    """Public classes and functions of ``module`` without a docstring of their own."""
    missing = []
    for name in hooks.public_names(module):
        obj = getattr(module, name)
        if hooks.needs_docstring(obj) and not (obj.__doc__ or "").strip():
            missing.append(name)
    return missing


# options that would hide public names of a rendered module
FILTERING_OPTIONS = re.compile(r"^\s*(members|filters|inherited_members|show_if_no_docstring)\s*:", re.M)


def unrendered(modules: list[str], pages: dict[str, str]) -> list[str]:
    """The modules of ``modules`` that no ``::: module`` directive of ``pages`` renders whole.

    A directive renders a module whole when it names it, or names its package with
    ``show_submodules: true``, and sets no option that filters members.
    """
    rendered = set()
    for text in pages.values():
        for identifier, options in hooks.directives(text):
            if FILTERING_OPTIONS.search(options):
                continue
            rendered.add(identifier)
            if re.search(r"show_submodules:\s*true", options):
                rendered.update(m for m in modules if m.startswith(identifier + "."))
    return [m for m in modules if m not in rendered]


def reference_pages() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((DOCS / "reference").glob("*.md"))}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python[^\n]*\n(.*?)^```", text, re.S | re.M)


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("module_name", hooks.referenced_modules())
def test_every_public_name_has_a_docstring(module_name):
    module = importlib.import_module(module_name)
    assert hooks.public_names(module), f"{module_name} has no public names"
    assert undocumented(module) == [], f"{module_name}: public names without a docstring"


def test_each_compat_module_declares_all():
    for name in hooks.compat_modules():
        module = importlib.import_module(name)
        assert hasattr(module, "__all__"), f"{name} declares no __all__"
        assert all(hasattr(module, n) for n in module.__all__), f"{name}.__all__ names a missing object"


def test_every_referenced_module_is_rendered_whole():
    """Each module but the top level (rendered at each name's home, see the next test) has a page."""
    modules = [m for m in hooks.referenced_modules() if m != "detloss"]
    assert unrendered(modules, reference_pages()) == []


def test_every_top_level_name_is_in_the_reference():
    import detloss

    homes = hooks.reference_homes()
    index = hooks.index_table()
    for name in hooks.public_names(detloss):
        obj = getattr(detloss, name)
        assert id(obj) in homes or f"::: detloss.{name}\n" in index, f"detloss.{name} is not in the reference"
        assert f"| `detloss.{name}` |" in index
    assert hooks.INDEX_MARKER in (DOCS / "reference" / "index.md").read_text()


def test_site_options_do_not_hide_public_names():
    config = MKDOCS_YML.read_text()
    for option in ("members", "filters", "inherited_members"):
        assert not re.search(rf"^\s*{option}\s*:", config, re.M), f"mkdocs.yml sets {option}"
    assert re.search(r"^\s*show_if_no_docstring:\s*true", config, re.M)
    assert re.search(r"^\s*strict:\s*true", config, re.M)
    assert re.search(r"^\s*font:\s*false", config, re.M), "the site must not load fonts from a CDN"


def test_the_checks_can_fail():
    """The coverage checks above report a missing docstring and an unrendered module."""
    module = types.ModuleType("detloss_fake")
    module.__all__ = ["documented", "bare"]

    def documented():
        """Has one."""

    def bare():
        pass

    module.documented, module.bare = documented, bare
    assert undocumented(module) == ["bare"]
    pages = {"a.md": "# A\n\n::: detloss.boxes\n\n::: detloss.priors\n    options:\n      members: [ssd_priors]\n"}
    assert unrendered(["detloss.boxes", "detloss.priors", "detloss.coders"], pages) == ["detloss.priors", "detloss.coders"]
    assert unrendered(["detloss.compat.detr"], {"c.md": "::: detloss.compat\n    options:\n      show_submodules: true\n"}) == []


def test_nav_lists_every_page():
    config = MKDOCS_YML.read_text()
    listed = set(re.findall(r"([\w\-/]+\.md)\s*$", config, re.M))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "assets" not in p.parts}
    assert pages == listed


PAGES = sorted(p for p in DOCS.rglob("*.md") if "reference" not in p.parts and "assets" not in p.parts)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_python_examples_run(page, tmp_path, monkeypatch):
    """Each page's ``python`` blocks run, in order, in one namespace (like tests/test_readme.py)."""
    blocks = python_blocks(page.read_text())
    rel = page.relative_to(DOCS)
    if rel.parts[0] in ("families", "migrate") and rel.name != "index.md":
        assert blocks, f"{rel} has no runnable example"
    if not blocks:
        return
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    exec(compile("\n".join(blocks), str(page), "exec"), namespace)  # noqa: S102


def test_docstrings_become_markdown():
    """reST roles become code (or a cross-reference where the target is rendered), doctests a fence."""
    import detloss

    text = "See :func:`detloss.match_priors` and :class:`~Missing`. ::\n\n    code\n\n>>> 1 + 1\n2\n"
    md = hooks.markdown_docstring(text)
    assert "``detloss.match_priors``" in md and "``Missing``" in md and ":func:" not in md
    assert "```pycon\n>>> 1 + 1\n2\n```" in md and " ::" not in md
    linked = hooks.markdown_docstring(text, "detloss", {id(detloss.match_priors): "detloss.matching.match_priors"})
    assert "[``detloss.match_priors``][detloss.matching.match_priors]" in linked
    assert hooks.markdown_docstring(md) == md


README = ROOT / "README.md"


def test_readme_performance_table_is_the_script_output():
    """The README's short table is benchmarks/figures.py's summary.md, never typed in."""
    summary = (DOCS / "assets" / "performance" / "summary.md").read_text().strip()
    assert summary in README.read_text()


def test_readme_links_resolve_and_test_command_is_ci_s():
    text = README.read_text()
    for link in re.findall(r"\]\(([^)#\s]+)", text):
        if not link.startswith(("http:", "https:")):
            assert (ROOT / link).exists(), f"README links to a missing {link}"
    ci = (ROOT / ".ci" / "run").read_text()
    command = 'pip install -e ".[dev]" && python -m pytest -n 2'
    assert f"\n{command}\n" in text and f"    {command}\n" in ci
