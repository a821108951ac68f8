"""The `sseviews` command: `sseviews new NAME` and `sseviews run TARGET`.

`new` renders the project template, `sseviews/templates/project/`, with Jinja2.
A file whose name ends in `.jinja` is rendered and loses that suffix; any other
file is copied byte for byte, so the new project's own Jinja2 page templates need
no escaping. A folder named `package` becomes the project's package (its NAME),
and a leading `dot-` in a file name becomes `.`.

`run` serves `<module>:app` with uvicorn, where the module is found from a path
(a `.py` file, a package folder, or a project folder holding one package) or
given by its dotted name.

Jinja2 and uvicorn (the `cli` extra) are imported only by the command that needs
them, so `import sseviews` never does.
"""

from __future__ import annotations

import argparse
import importlib
import keyword
import re
import shlex
import sys
from collections.abc import Iterator, Sequence
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path, PurePosixPath

from . import __version__

__all__ = ["main"]

_NAME = re.compile(r"[a-z][a-z0-9_]{0,49}")
# Names a project's package must not take: it would hide what the project imports.
_RESERVED = frozenset(
    {
        "sseviews",
        "starlette",
        "uvicorn",
        "sqlalchemy",
        "jinja2",
        "anyio",
        "aiosqlite",
        "asyncpg",
        "redis",
        "pytest",
        "tests",
        "templates",
    }
)
_TEMPLATE_SUFFIX = ".jinja"
_PACKAGE_PLACEHOLDER = "package"
_SKIPPED = frozenset({"__pycache__", ".DS_Store"})
# The first command a new project's README and next steps give.
PROJECT_INSTALL = "python -m pip install -e '.[test]'"
# Modules that an sseviews extra installs: a missing one is named with its extra.
_EXTRA_OF_MODULE = {
    "sqlalchemy": "sqlalchemy",
    "aiosqlite": "sqlite",
    "asyncpg": "postgres",
    "redis": "redis",
    "jinja2": "cli",
    "uvicorn": "cli",
}


class CommandError(Exception):
    """Raised when a command cannot do what was asked; main() prints it and exits 1."""


def _checkout() -> Path | None:
    """The sseviews checkout this package runs from (an editable install), else None."""
    root = Path(__file__).resolve().parent.parent
    try:
        pyproject = (root / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    return root if re.search(r'^name = "sseviews"$', pyproject, re.M) else None


def install_extra(extra: str) -> str:
    """The command that installs sseviews' `extra` where this sseviews comes from.

    From a checkout (sseviews is not on a package index yet) that is the checkout
    itself, in editable mode; otherwise the package index.
    """
    checkout = _checkout()
    if checkout is None:
        return f"python -m pip install {shlex.quote(f'sseviews[{extra}]')}"
    return f"python -m pip install -e {shlex.quote(f'{checkout}[{extra}]')}"


def _install_hint() -> str:
    return f"install it with: {install_extra('cli')}"


# -- sseviews new ----------------------------------------------------------------------


def check_name(name: str) -> str:
    """Return `name` if a new project may be called that, else raise `CommandError`."""
    if _NAME.fullmatch(name) is None:
        raise CommandError(
            f"invalid project name {name!r}: expected a Python package name of lowercase "
            "letters, digits and underscores, starting with a letter, at most 50 characters "
            "(for example: my_chat)"
        )
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        raise CommandError(f"invalid project name {name!r}: it is a Python keyword")
    if name in sys.stdlib_module_names or name in _RESERVED:
        raise CommandError(
            f"invalid project name {name!r}: it would hide the module of the same name "
            "that the project imports; choose another name"
        )
    return name


def _template_files(
    root: Traversable, prefix: PurePosixPath
) -> Iterator[tuple[PurePosixPath, Traversable]]:
    for entry in sorted(root.iterdir(), key=lambda item: item.name):
        if entry.name in _SKIPPED or entry.name.endswith(".pyc"):
            continue
        if entry.is_dir():
            yield from _template_files(entry, prefix / entry.name)
        else:
            yield prefix / entry.name, entry


def _target_path(template_path: PurePosixPath, name: str) -> PurePosixPath:
    parts = [name if part == _PACKAGE_PLACEHOLDER else part for part in template_path.parts]
    last = parts[-1]
    if last.endswith(_TEMPLATE_SUFFIX):
        last = last[: -len(_TEMPLATE_SUFFIX)]
    if last.startswith("dot-"):
        last = "." + last[len("dot-") :]
    parts[-1] = last
    return PurePosixPath(*parts)


def render_project(name: str) -> dict[PurePosixPath, bytes]:
    """Render the project template for `name`: relative path -> file content.

    Raises:
        CommandError: Jinja2 is not installed, or the name is invalid.
    """
    check_name(name)
    try:
        import jinja2
    except ImportError:
        raise CommandError(f"sseviews new needs Jinja2; {_install_hint()}") from None
    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )
    context = {
        "name": name,
        "title": name.replace("_", " ").title(),
        "sseviews_version": __version__,
    }
    root = files("sseviews").joinpath("templates", "project")
    rendered: dict[PurePosixPath, bytes] = {}
    for template_path, entry in _template_files(root, PurePosixPath()):
        content = entry.read_bytes()
        if template_path.name.endswith(_TEMPLATE_SUFFIX):
            text = environment.from_string(content.decode("utf-8")).render(context)
            content = text.encode("utf-8")
        rendered[_target_path(template_path, name)] = content
    return rendered


def new_project(name: str, directory: Path) -> Path:
    """Create the project `name` in `directory`; return the project's folder.

    Raises:
        CommandError: The name is invalid, or the folder exists and is not empty.
    """
    target = directory / name
    if target.exists() and not target.is_dir():
        raise CommandError(f"{target} already exists and is not a directory")
    if target.is_dir() and any(target.iterdir()):
        raise CommandError(
            f"{target} already exists and is not empty; choose another name or --directory"
        )
    # Everything is rendered before the first file is written: a failure leaves nothing.
    rendered = render_project(name)
    for relative, content in rendered.items():
        path = target.joinpath(*relative.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return target


def _cmd_new(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    target = new_project(args.name, directory)
    shown = target if directory.is_absolute() else Path(args.directory, args.name)
    print(f"Created the project {args.name!r} in {shown}")
    print("Next:")
    for line in next_steps(shown):
        print(f"  {line}")
    return 0


def next_steps(folder: Path) -> list[str]:
    """What to run after `sseviews new`, in order, with the comments in one column."""
    steps = [
        (f"cd {shlex.quote(str(folder))}", ""),
        (PROJECT_INSTALL, "the project, its dependencies and pytest"),
        ("sseviews run .", "then open http://127.0.0.1:8000/"),
        ("python -m pytest", "its tests"),
    ]
    width = max(len(command) for command, comment in steps if comment)
    return [
        f"{command:<{width}}   # {comment}" if comment else command for command, comment in steps
    ]


# -- sseviews run ----------------------------------------------------------------------


def _package_in(folder: Path) -> str:
    """The one package a project folder holds (the one named after the folder first)."""
    candidates = sorted(
        child.name
        for child in folder.iterdir()
        if child.is_dir()
        and child.name.isidentifier()
        and child.name != "tests"
        and (child / "__init__.py").is_file()
    )
    preferred = folder.name.replace("-", "_")
    if preferred in candidates:
        return preferred
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CommandError(
            f"{folder} is neither a package (no __init__.py) nor a project folder holding one"
        )
    raise CommandError(
        f"{folder} holds several packages ({', '.join(candidates)}); "
        "name the one to run, for example: sseviews run "
        f"{Path(folder, candidates[0])}"
    )


def resolve_target(target: str) -> tuple[str, str, Path]:
    """Return `(module, attribute, folder to import it from)` for `sseviews run TARGET`.

    TARGET is a path (`app.py`, a package folder, a project folder holding one
    package) or a dotted module name, optionally followed by `:attribute`
    (default `app`).

    Raises:
        CommandError: Nothing runnable is found there.
    """
    attribute = "app"
    location = target
    head, colon, tail = target.rpartition(":")
    if colon and tail.isidentifier() and not Path(target).exists():
        location, attribute = head, tail
    path = Path(location)
    if path.exists():
        path = path.resolve()
        if path.is_file():
            if path.suffix != ".py" or not path.stem.isidentifier():
                raise CommandError(f"{location} is not a Python module (a .py file)")
            return path.stem, attribute, path.parent
        if (path / "__init__.py").is_file():
            if not path.name.isidentifier():
                raise CommandError(f"{location}: {path.name!r} cannot be imported as a package")
            return path.name, attribute, path.parent
        return _package_in(path), attribute, path
    if location.endswith(".py") or "/" in location or "\\" in location:
        raise CommandError(f"{location} does not exist")
    if not all(part.isidentifier() for part in location.split(".")):
        raise CommandError(
            f"{location!r} is neither a path nor a module name (for example: myproject.app)"
        )
    return location, attribute, Path.cwd()


def _install_command(missing: str, folder: Path) -> str:
    """The command that installs the module `missing`, which the app in `folder` imports."""
    if (folder / "pyproject.toml").is_file() or (folder / "setup.py").is_file():
        try:
            shown = folder.relative_to(Path.cwd()).as_posix()
        except ValueError:
            shown = str(folder)
        return f"python -m pip install -e '{shown}'"
    extra = _EXTRA_OF_MODULE.get(missing)
    if extra is not None:
        return install_extra(extra)
    return f"python -m pip install {missing}  (the distribution may have another name)"


def _check_importable(module: str, attribute: str, folder: Path) -> None:
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None:
            raise
        if module == exc.name or module.startswith(exc.name + "."):
            raise CommandError(f"no module named {module!r} (looked in {folder})") from None
        # The app imports a dependency that is not installed: one line, no traceback.
        missing = exc.name.partition(".")[0]
        raise CommandError(
            f"{module!r} imports {exc.name!r}, which is not installed; "
            f"install it with: {_install_command(missing, folder)}"
        ) from None
    if not hasattr(loaded, attribute):
        raise CommandError(f"module {module!r} has no attribute {attribute!r} (the ASGI app)")


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        raise CommandError(f"sseviews run needs uvicorn; {_install_hint()}") from None
    module, attribute, folder = resolve_target(args.target)
    _check_importable(module, attribute, folder)
    uvicorn.run(
        f"{module}:{attribute}",
        host=args.host,
        port=args.port,
        reload=args.reload,
        reload_dirs=[str(folder)] if args.reload else None,
        workers=args.workers,
        app_dir=str(folder),
    )
    return 0


# -- sseviews asyncapi -----------------------------------------------------------------


def _cmd_asyncapi(args: argparse.Namespace) -> int:
    import json

    from ._asyncapi import asyncapi

    module, attribute, folder = resolve_target(args.target)
    _check_importable(module, attribute, folder)
    app = getattr(importlib.import_module(module), attribute)
    try:
        document = asyncapi(app, title=args.title, version=args.api_version)
    except TypeError as exc:
        raise CommandError(f"{module}:{attribute}: {exc}") from None
    print(json.dumps(document, indent=2, ensure_ascii=False))
    return 0


# -- sseviews typescript ----------------------------------------------------------------


def _cmd_typescript(args: argparse.Namespace) -> int:
    from ._typescript import typescript

    module, attribute, folder = resolve_target(args.target)
    _check_importable(module, attribute, folder)
    app = getattr(importlib.import_module(module), attribute)
    try:
        source = typescript(app, target=args.target)
    except TypeError as exc:
        raise CommandError(f"{module}:{attribute}: {exc}") from None
    sys.stdout.write(source)
    return 0


# -- the command line --------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sseviews", description="Start and run sseviews projects."
    )
    parser.add_argument("--version", action="version", version=f"sseviews {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    new = commands.add_parser(
        "new",
        help="create a new project from the template",
        description="Create the folder NAME holding a new project: an app with a chat room "
        "and a clock stream, its pages, models, tests and README.",
    )
    new.add_argument("name", metavar="NAME", help="the project's package name, e.g. my_chat")
    new.add_argument(
        "--directory",
        default=".",
        metavar="DIR",
        help="the folder to create NAME in (default: the current folder)",
    )
    new.set_defaults(handler=_cmd_new)

    run = commands.add_parser(
        "run",
        help="serve a project with uvicorn",
        description="Serve TARGET's `app` with uvicorn. TARGET is a project folder, a "
        "package folder, a .py file or a module name, optionally followed by :ATTRIBUTE.",
    )
    run.add_argument("target", metavar="PATH_OR_MODULE")
    run.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    run.add_argument("--port", type=int, default=8000, help="default: 8000")
    run.add_argument("--reload", action="store_true", help="restart when a file changes")
    run.add_argument("--workers", type=int, default=None, help="worker processes")
    run.set_defaults(handler=_cmd_run)

    spec = commands.add_parser(
        "asyncapi",
        help="print the AsyncAPI 3.0 document of an app's streams",
        description="Print, as JSON, the AsyncAPI 3.0 document describing every event "
        "stream of TARGET's `app`: its paths, event names and payload schemas. TARGET is "
        "a module name or path, optionally followed by :ATTRIBUTE, as for `run`.",
    )
    spec.add_argument("target", metavar="PATH_OR_MODULE")
    spec.add_argument("--title", default=None, help="the document's title")
    spec.add_argument("--api-version", default=None, metavar="VERSION", help="the API's version")
    spec.set_defaults(handler=_cmd_asyncapi)

    typed = commands.add_parser(
        "typescript",
        help="print TypeScript types of an app's streams and a typed sseviews.js wrapper",
        description="Print one TypeScript module (ES module) holding the types of every "
        "event of every stream of TARGET's `app`, from the views' event_types, and "
        "connect(), which opens a stream with sseviews.js and gives each on(name, handler) "
        "its payload type. TARGET is a module name or path, optionally followed by "
        ":ATTRIBUTE, as for `run`.",
    )
    typed.add_argument("target", metavar="PATH_OR_MODULE")
    typed.set_defaults(handler=_cmd_typescript)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `sseviews` command with `argv` (default: `sys.argv[1:]`); return its exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except CommandError as exc:
        print(f"sseviews {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return code
