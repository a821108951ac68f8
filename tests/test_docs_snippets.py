"""Every Python snippet in README.md and docs/*.md compiles, and the complete ones run.

A snippet is a fenced block whose info string is `python`. An HTML comment on the
line right before the fence says how it is checked:

- no comment: a complete example. It runs as a module of its own; when it holds
  top-level `test_` functions it is a test file instead, run by pytest in a
  subprocess.
- `<!-- continues -->`: runs in the namespace the page's previous snippets left,
  so a page can build one example up in steps.
- `<!-- file: NAME.py -->`: a module that later snippets of the page import (the
  page's test snippets too); it runs when it is written.
- `<!-- fragment -->`: a piece of a larger program; it is only compiled (top-level
  `await` allowed).
- `<!-- no-run -->`: a complete program that starts a server or needs one (Redis,
  a database); it is only compiled.
- `<!-- signature -->`: a call signature such as `Event(data=None, *, id=None)`;
  it must parse as the parameter list of a function.

Blocks fenced as `pycon` (an interactive session) run as doctests, in the page's
namespace with `<!-- continues -->`; a `<!-- fragment -->` session is not run.
"""

from __future__ import annotations

import ast
import doctest
import inspect
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.processes import clean_env

import sseviews
import sseviews.testing

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)
_MARKER = re.compile(r"<!--\s*(?P<kind>[a-z-]+)(?::\s*(?P<arg>\S+))?\s*-->\s*\Z")
_KINDS = frozenset({"continues", "file", "fragment", "no-run", "signature"})
_TEST_FUNCTION = re.compile(r"^(async )?def test_", re.M)
# What the docs' complete examples read from the environment, as a reader sets it.
ENVIRONMENT = {"STREAM_SECRET": "a-documentation-secret-of-at-least-32-bytes"}


@dataclass
class Snippet:
    page: Path
    line: int
    lang: str
    code: str
    kind: str | None
    arg: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def snippets(page: Path) -> list[Snippet]:
    text = page.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        lang = match["lang"]
        if lang not in ("python", "pycon"):
            continue
        previous = text[: match.start()].rstrip().splitlines()[-1:] or [""]
        marker = _MARKER.search(previous[0])
        found.append(
            Snippet(
                page=page,
                line=text.count("\n", 0, match.start()) + 2,  # the code's first line
                lang=lang,
                code=match["code"],
                kind=marker["kind"] if marker else None,
                arg=marker["arg"] if marker else None,
            )
        )
    return found


def _compile(snippet: Snippet, *, top_level_await: bool = False) -> types.CodeType:
    # Leading blank lines put the code's line numbers where they are in the page.
    source = "\n" * (snippet.line - 1) + snippet.code
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT if top_level_await else 0
    return compile(source, str(snippet.page.relative_to(REPO)), "exec", flags=flags)


def _check_signature(snippet: Snippet) -> None:
    for line in snippet.code.strip().splitlines():
        if line.startswith(("def ", "async def ")):  # a method's signature
            ast.parse(f"{line}: ...")
            continue
        name, paren, rest = line.partition("(")
        assert paren and name.isidentifier(), f"{snippet.where}: not a signature: {line}"
        ast.parse(f"def {name}({rest}: ...")


def _run_module(snippet: Snippet, namespace: dict[str, Any], name: str) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(namespace)
    module.__name__ = name  # not "__main__": `if __name__ == "__main__":` blocks stay off
    sys.modules[name] = module  # dataclasses and pydantic look their module up
    try:
        exec(_compile(snippet), module.__dict__)
    finally:
        del sys.modules[name]
    namespace.update(module.__dict__)


def _shared_files() -> dict[str, str]:
    """The `file:` snippets of every page: a page's tests may import another page's."""
    files: dict[str, str] = {}
    for page in PAGES:
        for snippet in snippets(page):
            if snippet.kind == "file" and snippet.arg is not None:
                files.setdefault(snippet.arg, snippet.code)
    return files


def _run_tests(files: dict[str, str], folder: Path, where: list[str]) -> None:
    for name, code in files.items():
        (folder / name).write_text(code, encoding="utf-8")
    for name, code in _shared_files().items():
        if not (folder / name).exists():  # the page's own file of that name comes first
            (folder / name).write_text(code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", "."],
        cwd=folder,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"the test snippets at {', '.join(where)} failed:\n{output}"
    assert " passed" in result.stdout, output
    assert "skipped" not in result.stdout, output


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(REPO).as_posix())
def test_docs_snippets_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compile every snippet of the page; run the complete ones, in order."""
    monkeypatch.chdir(tmp_path)  # a snippet that writes a file writes it here
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.syspath_prepend(str(tmp_path))  # where `file:` snippets are imported from
    written: list[str] = []
    namespace: dict[str, Any] = {}
    tests: dict[str, str] = {}
    test_lines: list[str] = []
    try:
        for snippet in snippets(page):
            if snippet.lang == "pycon":
                if snippet.kind == "fragment":
                    continue
                globs = dict(namespace) if snippet.kind == "continues" else {}
                parser = doctest.DocTestParser()
                test = parser.get_doctest(snippet.code, globs, snippet.where, None, snippet.line)
                runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
                report: list[str] = []
                runner.run(test, out=report.append)
                assert runner.failures == 0, f"{snippet.where}:\n{''.join(report)}"
                continue
            if snippet.kind == "signature":
                _check_signature(snippet)
                continue
            if snippet.kind in ("fragment", "no-run"):
                _compile(snippet, top_level_await=snippet.kind == "fragment")
                continue
            _compile(snippet)
            if snippet.kind == "file":
                assert snippet.arg is not None and snippet.arg.endswith(".py"), snippet.where
                (tmp_path / snippet.arg).write_text(snippet.code, encoding="utf-8")
                module_name = snippet.arg.removesuffix(".py")
                written.append(module_name)
                namespace = {}
                _run_module(snippet, namespace, "docs_snippet_file")
            elif _TEST_FUNCTION.search(snippet.code):
                tests[f"test_snippet_{snippet.line}.py"] = snippet.code
                test_lines.append(snippet.where)
            elif snippet.kind == "continues":
                assert namespace, f"{snippet.where}: continues, but nothing ran before it"
                _run_module(snippet, namespace, "docs_snippet")
            else:
                namespace = {}
                _run_module(snippet, namespace, "docs_snippet")
    finally:
        for name in written:
            sys.modules.pop(name, None)
    if tests:
        _run_tests(tests, tmp_path, test_lines)


def test_docs_snippet_markers_are_known() -> None:
    """A misspelt marker would silently turn a fragment into a complete example."""
    for page in PAGES:
        for snippet in snippets(page):
            text = page.read_text(encoding="utf-8").splitlines()
            previous = text[snippet.line - 3].strip() if snippet.line >= 3 else ""
            if previous.startswith("<!--"):
                assert snippet.kind in _KINDS, f"{snippet.where}: unknown marker {previous!r}"


def test_docs_snippets_every_page_with_code_has_a_complete_example() -> None:
    found = [snippet for page in PAGES for snippet in snippets(page)]
    assert len(found) > 50
    for page in PAGES:
        python = [snippet for snippet in snippets(page) if snippet.lang == "python"]
        runnable = [snippet for snippet in python if snippet.kind in (None, "continues", "file")]
        if python:
            assert runnable, f"{page.relative_to(REPO)}: no snippet runs, every one is marked"


def _documented_parameters(line: str) -> tuple[str, list[tuple[str, str, object]]]:
    """The name and `(name, kind, default)` parameters of a `signature` snippet's line."""
    if line.startswith(("def ", "async def ")):
        function = ast.parse(f"{line}: ...").body[0]
    else:
        name, _, rest = line.partition("(")
        function = ast.parse(f"def {name}({rest}: ...").body[0]
    assert isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
    arguments = function.args
    positional = arguments.posonlyargs + arguments.args
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(arguments.defaults))
    defaults += arguments.defaults
    found = [
        (argument.arg, "positional", default)
        for argument, default in zip(positional, defaults, strict=True)
    ]
    found += [
        (argument.arg, "keyword", default)
        for argument, default in zip(arguments.kwonlyargs, arguments.kw_defaults, strict=True)
    ]
    empty = inspect.Parameter.empty
    return function.name, [
        (name, kind, empty if default is None else ast.literal_eval(default))
        for name, kind, default in found
    ]


def _actual_parameters(target: Any) -> list[tuple[str, str, object]]:
    keyword = inspect.Parameter.KEYWORD_ONLY
    return [
        (name, "keyword" if parameter.kind is keyword else "positional", parameter.default)
        for name, parameter in inspect.signature(target).parameters.items()
    ]


def test_docs_signatures_match_the_code() -> None:
    """A `signature` snippet of a public class or a view hook lists the code's parameters."""
    checked = 0
    for page in PAGES:
        for snippet in snippets(page):
            if snippet.kind != "signature":
                continue
            for line in snippet.code.strip().splitlines():
                name, documented = _documented_parameters(line)
                if line.startswith(("def ", "async def ")):
                    target = getattr(sseviews.EventStreamView, name, None)
                    documented = documented[1:]  # self: the signature of the bound method
                    target = None if target is None else target.__get__(object())
                else:
                    target = getattr(sseviews, name, None) or getattr(sseviews.testing, name, None)
                if target is None:
                    continue
                actual = _actual_parameters(target)
                assert documented == actual, f"{snippet.where}: {line}\n  the code: {actual}"
                checked += 1
    assert checked >= 5


def test_docs_fragments_say_so_in_their_first_line() -> None:
    """Readers never see the `<!-- fragment -->` marker: the snippet itself must say it."""
    for page in PAGES:
        for snippet in snippets(page):
            if snippet.kind == "fragment":
                first = snippet.code.splitlines()[0]
                assert first.startswith("# Fragment: "), (
                    f"{snippet.where}: a fragment must start with a visible "
                    f"'# Fragment: ...' line saying what it needs, not {first!r}"
                )


_INSTALL = re.compile(r"pip install[^\n`]*")


def test_docs_install_sseviews_from_a_checkout() -> None:
    """sseviews is not on a package index yet: `pip install "sseviews[x]"` would fail."""
    readmes = [REPO / "example_project" / "README.md"]
    templates = sorted((REPO / "sseviews" / "templates" / "project").rglob("*.jinja"))
    for page in [*PAGES, *readmes, *templates]:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for command in _INSTALL.findall(line):
                if "sseviews[" in command or re.search(r"install\s+['\"]?sseviews\b", command):
                    assert " -e " in command, (
                        f"{page.relative_to(REPO)}:{number}: {command!r} installs sseviews "
                        "from a package index; install it from the checkout (-e)"
                    )


_ENVIRON = re.compile(r"""os\.environ\[["'](?P<name>\w+)["']\]""")


def test_docs_environment_variables_a_snippet_needs_are_set_on_its_page() -> None:
    """A complete example that reads `os.environ["X"]` fails as pasted unless told to set X."""
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for snippet in snippets(page):
            if snippet.kind not in (None, "continues", "file"):
                continue
            for match in _ENVIRON.finditer(snippet.code):
                name = match["name"]
                assert f"export {name}=" in text, (
                    f"{snippet.where}: reads ${name}; the page must show how to set it "
                    f"(a console line `export {name}=...`)"
                )
