"""The `sseviews` command: `new` renders a project whose own tests pass; `run` serves it."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from support.processes import clean_env, free_port, stop_process, wait_until_serving

from sseviews import __version__
from sseviews._cli import CommandError, install_extra, main, render_project, resolve_target

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def sseviews_command(*args: str) -> list[str]:
    """The console script, run by this interpreter (so it works without PATH set up)."""
    code = "import sys; from sseviews._cli import main; sys.exit(main())"
    return [sys.executable, "-c", code, *args]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    assert main(["new", "my_chat", "--directory", str(tmp_path)]) == 0
    return tmp_path / "my_chat"


# -- sseviews new ----------------------------------------------------------------------


def test_new_creates_the_project_files(project: Path) -> None:
    files = sorted(
        path.relative_to(project).as_posix() for path in project.rglob("*") if path.is_file()
    )
    assert files == [
        ".gitignore",
        "README.md",
        "my_chat/__init__.py",
        "my_chat/app.py",
        "my_chat/models.py",
        "my_chat/templates/base.html",
        "my_chat/templates/index.html",
        "my_chat/templates/room.html",
        "my_chat/views.py",
        "pyproject.toml",
        "tests/conftest.py",
        "tests/test_app.py",
    ]


def test_new_says_what_to_do_next(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["new", "my_chat", "--directory", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"Created the project 'my_chat' in {tmp_path / 'my_chat'}" in out
    steps = [line.strip() for line in out.splitlines()[2:]]
    assert steps[0] == f"cd {tmp_path / 'my_chat'}"
    # Installing comes first: `sseviews run .` needs the project's dependencies, and
    # `python -m pytest` needs pytest.
    assert steps[1].startswith("python -m pip install -e '.[test]'")
    assert steps[2].startswith("sseviews run .")
    assert steps[3].startswith("python -m pytest")
    # The comments start in one column.
    columns = {line.index("#") for line in out.splitlines()[3:]}
    assert len(columns) == 1, out


def test_new_next_steps_quote_a_folder_with_a_space(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "my projects"
    assert main(["new", "my_chat", "--directory", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"  cd '{folder / 'my_chat'}'\n" in out


def test_new_project_readme_starts_with_its_install_command(project: Path) -> None:
    readme = (project / "README.md").read_text()
    assert "pypi.org" not in readme  # sseviews is not on a package index yet
    commands = [line[2:] for line in readme.splitlines() if line.startswith("$ ")]
    assert commands[:3] == [
        "python -m pip install -e '.[test]'",
        "sseviews run .",
        "python -m pytest",
    ]


def test_new_project_test_extra_has_what_its_tests_import(project: Path) -> None:
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    test_extra = " ".join(pyproject["project"]["optional-dependencies"]["test"])
    assert "pytest" in test_extra
    assert "anyio" in test_extra  # the tests use anyio's pytest plugin
    dependencies = " ".join(pyproject["project"]["dependencies"])
    for needed in ("sseviews[sqlite,cli]", "jinja2", "uvicorn"):
        assert needed in dependencies


def test_new_renders_the_name_and_keeps_page_templates_as_they_are(project: Path) -> None:
    pyproject = (project / "pyproject.toml").read_text()
    assert 'name = "my_chat"' in pyproject
    assert f"sseviews[sqlite,cli]>={__version__}" in pyproject
    assert "from my_chat import create_app" in (project / "tests" / "conftest.py").read_text()
    readme = (project / "README.md").read_text()
    assert readme.startswith("# My Chat\n")
    assert "sseviews run ." in readme
    # Page templates are copied, not rendered: their Jinja2 tags are for the new app.
    room = (project / "my_chat" / "templates" / "room.html").read_text()
    assert '{% extends "base.html" %}' in room
    assert "{{ room | tojson }}" in room
    source = REPO / "sseviews" / "templates" / "project" / "package" / "templates" / "room.html"
    assert room == source.read_text()
    assert not list(project.rglob("*.jinja"))


@pytest.mark.slow
def test_new_project_tests_pass(project: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-W", "error", "-p", "no:cacheprovider"],
        cwd=project,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout
    assert "failed" not in result.stdout
    assert "skipped" not in result.stdout


def test_new_project_passes_ruff(project: Path) -> None:
    pytest.importorskip("ruff", reason="ruff is in the test extra")
    for command in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [sys.executable, "-m", "ruff", *command, "--no-cache", "."],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_new_into_an_existing_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "chat").mkdir()
    assert main(["new", "chat", "--directory", str(tmp_path)]) == 0
    assert (tmp_path / "chat" / "chat" / "app.py").is_file()


def test_new_creates_the_parent_folder(tmp_path: Path) -> None:
    assert main(["new", "chat", "--directory", str(tmp_path / "a" / "b")]) == 0
    assert (tmp_path / "a" / "b" / "chat" / "pyproject.toml").is_file()


def test_new_refuses_a_folder_that_is_not_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "chat"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    assert main(["new", "chat", "--directory", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "sseviews new: error:" in err
    assert "already exists and is not empty" in err
    assert [path.name for path in existing.iterdir()] == ["notes.txt"]
    assert (existing / "notes.txt").read_text() == "mine"


def test_new_refuses_a_file_in_the_way(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "chat").write_text("a file")
    assert main(["new", "chat", "--directory", str(tmp_path)]) == 1
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("My-App", "expected a Python package name"),
        ("my-app", "expected a Python package name"),
        ("1chat", "expected a Python package name"),
        ("_chat", "expected a Python package name"),
        ("x" * 51, "expected a Python package name"),
        ("class", "it is a Python keyword"),
        ("match", "it is a Python keyword"),
        ("json", "would hide the module"),
        ("sseviews", "would hide the module"),
        ("tests", "would hide the module"),
    ],
)
def test_new_refuses_a_bad_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, message: str
) -> None:
    assert main(["new", name, "--directory", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert repr(name) in err
    assert list(tmp_path.iterdir()) == []


def test_new_refuses_a_bad_name_from_the_console(tmp_path: Path) -> None:
    result = subprocess.run(
        sseviews_command("new", "Bad Name"),
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "sseviews new: error: invalid project name 'Bad Name'" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_render_project_needs_no_disk(tmp_path: Path) -> None:
    rendered = render_project("demo")
    assert {path.as_posix() for path in rendered} >= {"demo/app.py", "tests/test_app.py"}
    with pytest.raises(CommandError, match="invalid project name"):
        render_project("De mo")


# -- the command line ------------------------------------------------------------------


def test_console_script_is_declared() -> None:
    (script,) = entry_points(group="console_scripts", name="sseviews")
    assert script.value == "sseviews._cli:main"


def test_version_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as version:
        main(["--version"])
    assert version.value.code == 0
    assert capsys.readouterr().out.strip() == f"sseviews {__version__}"
    with pytest.raises(SystemExit) as usage:
        main([])
    assert usage.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_importing_sseviews_imports_neither_jinja2_nor_uvicorn() -> None:
    code = (
        "import sys, sseviews, sseviews._cli; "
        "print(sorted({'jinja2', 'uvicorn'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- sseviews run: finding the app ---------------------------------------------------------


def test_resolve_target_project_folder(project: Path) -> None:
    assert resolve_target(str(project)) == ("my_chat", "app", project.resolve())


def test_resolve_target_project_folder_renamed(project: Path) -> None:
    renamed = project.rename(project.parent / "renamed")
    assert resolve_target(str(renamed)) == ("my_chat", "app", renamed.resolve())


def test_resolve_target_package_folder_and_attribute(project: Path) -> None:
    package = project / "my_chat"
    assert resolve_target(str(package)) == ("my_chat", "app", project.resolve())
    assert resolve_target(f"{package}:other") == ("my_chat", "other", project.resolve())


def test_resolve_target_module_file(tmp_path: Path) -> None:
    (tmp_path / "server.py").write_text("app = None\n")
    assert resolve_target(str(tmp_path / "server.py")) == ("server", "app", tmp_path.resolve())


def test_resolve_target_module_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_target("pkg.web") == ("pkg.web", "app", tmp_path)
    assert resolve_target("pkg.web:application") == ("pkg.web", "application", tmp_path)


def test_resolve_target_example_project() -> None:
    module, attribute, folder = resolve_target(str(REPO / "example_project"))
    assert (module, attribute, folder) == ("example_project", "app", REPO / "example_project")


@pytest.mark.parametrize(
    ("layout", "target", "message"),
    [
        ({}, "missing/app.py", "does not exist"),
        ({}, "not a module", "neither a path nor a module name"),
        ({"notes.txt": ""}, "notes.txt", "is not a Python module"),
        ({"empty/readme.md": ""}, "empty", "neither a package"),
        (
            {"two/a/__init__.py": "", "two/b/__init__.py": ""},
            "two",
            "holds several packages (a, b)",
        ),
    ],
)
def test_resolve_target_errors(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    layout: dict[str, str],
    target: str,
    message: str,
) -> None:
    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CommandError) as error:
        resolve_target(target)
    assert message in str(error.value)


def test_run_reports_a_missing_module_or_app(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["run", "no_such_module_here"]) == 1
    assert "no module named 'no_such_module_here'" in capsys.readouterr().err
    (tmp_path / "appless_module.py").write_text("application = None\n")
    assert main(["run", "appless_module.py"]) == 1
    err = capsys.readouterr().err
    assert "module 'appless_module' has no attribute 'app'" in err
    sys.modules.pop("appless_module", None)


def test_run_names_a_missing_dependency_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "needs_redis.py").write_text("import redis_is_not_here.client\napp = None\n")
    assert main(["run", "needs_redis.py"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "'needs_redis' imports 'redis_is_not_here', which is not installed" in err
    assert "python -m pip install redis_is_not_here" in err


def test_run_missing_dependency_of_a_project_says_install_the_project(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "shop"
    (project / "shop").mkdir(parents=True)
    (project / "pyproject.toml").write_text('[project]\nname = "shop"\n')
    (project / "shop" / "__init__.py").write_text("import no_such_dependency\n")
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "path", list(sys.path))
    assert main(["run", "."]) == 1
    err = capsys.readouterr().err
    assert "'shop' imports 'no_such_dependency', which is not installed" in err
    assert err.rstrip().endswith("install it with: python -m pip install -e '.'")
    sys.modules.pop("shop", None)


@pytest.mark.parametrize(
    ("module", "extra"),
    [
        ("sqlalchemy", "sqlalchemy"),
        ("aiosqlite", "sqlite"),
        ("asyncpg", "postgres"),
        ("redis", "redis"),
    ],
)
def test_run_missing_extra_is_named_with_its_extra(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    module: str,
    extra: str,
) -> None:
    # These tests run sseviews from its checkout, which is not on a package index:
    # the command installs the extra from the checkout.
    command = f"python -m pip install -e '{REPO}[{extra}]'"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, module, None)  # importing it raises ModuleNotFoundError
    (tmp_path / "server_app.py").write_text(f"import {module}\napp = None\n")
    assert main(["run", "server_app.py"]) == 1
    assert f"install it with: {command}" in capsys.readouterr().err
    sys.modules.pop("server_app", None)


def test_run_missing_dependency_from_the_console_has_no_traceback(tmp_path: Path) -> None:
    (tmp_path / "broken_app.py").write_text("import not_installed_anywhere\napp = None\n")
    result = subprocess.run(
        sseviews_command("run", "broken_app.py"),
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("sseviews run: error: 'broken_app' imports")
    assert len(result.stderr.splitlines()) == 1


def test_install_extra_from_a_checkout_or_an_index(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert install_extra("redis") == f"python -m pip install -e '{REPO}[redis]'"
    # An installed wheel has no pyproject.toml beside the package: the index then.
    monkeypatch.setattr("sseviews._cli.__file__", str(tmp_path / "sseviews" / "_cli.py"))
    assert install_extra("redis") == "python -m pip install 'sseviews[redis]'"
    # Another project's pyproject.toml above the package is not sseviews' checkout.
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\n')
    assert install_extra("cli") == "python -m pip install 'sseviews[cli]'"


# -- sseviews run: serving -----------------------------------------------------------------


def request(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            data = b"" if method == "HEAD" else response.read()
            return response.status, dict(response.headers), data
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@contextmanager
def serving(command: list[str], cwd: Path, log: Path, env: dict[str, str]) -> Iterator[str]:
    """Run a server command until its index page answers; yield its base URL."""
    port = command[command.index("--port") + 1]
    base = f"http://{HOST}:{port}"
    with log.open("wb") as output:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=output)
    try:
        wait_until_serving(process, base + "/", log.read_text)
        yield base
    finally:
        stop_process(process)


@pytest.mark.slow
def test_run_serves_a_new_project(project: Path, tmp_path: Path) -> None:
    command = sseviews_command("run", ".", "--port", str(free_port()))
    with serving(command, project, tmp_path / "server.log", clean_env()) as base:
        status, headers, _ = request("HEAD", base + "/rooms/lobby/events")
        assert status == 200
        assert headers["content-type"].startswith("text/event-stream")
        body = json.dumps({"author": "ada", "text": "served"}).encode()
        status, _, created = request(
            "POST",
            base + "/rooms/lobby/messages",
            body,
            {"content-type": "application/json"},
        )
        assert status == 201, created
        status, _, page = request("GET", base + "/rooms/lobby")
        assert status == 200
        assert b"served" in page
    assert (project / "my_chat.db").is_file()  # the README's default database


@pytest.mark.slow
def test_run_serves_the_example_project(tmp_path: Path) -> None:
    env = clean_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'example.db'}")
    command = sseviews_command("run", "example_project", "--port", str(free_port()))
    with serving(command, REPO, tmp_path / "server.log", env) as base:
        status, _, page = request("GET", base + "/dashboard")
        assert status == 200
        assert b"/dashboard/events" in page
    assert (tmp_path / "example.db").is_file()
