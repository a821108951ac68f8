from __future__ import annotations

import importlib
import subprocess
import sys
import types

import sseviews

CORE_NAMES = {
    "DisconnectReason",
    "Event",
    "EventStreamView",
    "SSEViewsError",
    "ShutdownMiddleware",
    "ShutdownSignal",
    "StreamEnded",
    "StreamRouter",
}


def public_names() -> list[str]:
    return sorted(
        name
        for name, value in vars(sseviews).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)
        and name != "annotations"  # from __future__ import annotations
    )


def isort_style(name: str) -> tuple[int, str]:
    # The order ruff's RUF022 keeps __all__ in: CONSTANTS, then Classes, then the rest.
    if name.isupper():
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


def test_api_all_equals_sorted_public_names() -> None:
    assert sseviews.__all__ == sorted(public_names(), key=isort_style)


def test_api_all_has_no_duplicates() -> None:
    assert len(set(sseviews.__all__)) == len(sseviews.__all__)


def test_api_core_names_exported() -> None:
    assert CORE_NAMES <= set(sseviews.__all__)


def test_api_every_name_importable_from_root() -> None:
    namespace: dict[str, object] = {}
    exec(f"from sseviews import {', '.join(sseviews.__all__)}", namespace)
    for name in sseviews.__all__:
        value = namespace[name]
        assert value is getattr(sseviews, name)
        if isinstance(value, type):
            assert value.__module__.startswith("sseviews"), name


def test_api_star_import_gives_all() -> None:
    namespace: dict[str, object] = {}
    exec("from sseviews import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(sseviews.__all__)


def test_api_asyncapi_is_exported() -> None:
    from sseviews._asyncapi import asyncapi

    assert "asyncapi" in sseviews.__all__
    assert sseviews.asyncapi is asyncapi


def test_api_exceptions_share_one_root() -> None:
    for name in sseviews.__all__:
        value = getattr(sseviews, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, sseviews.SSEViewsError), name


def test_api_version_is_a_string() -> None:
    assert isinstance(sseviews.__version__, str)
    assert sseviews.__version__.count(".") >= 1


def test_api_testing_module_exports() -> None:
    testing = importlib.import_module("sseviews.testing")
    assert {"EventParser", "EventStreamClient", "StreamEnded"} <= set(testing.__all__)
    for name in testing.__all__:
        assert hasattr(testing, name), name
    assert testing.StreamEnded is sseviews.StreamEnded


def test_api_import_needs_only_starlette_and_anyio() -> None:
    optional = [
        "sqlalchemy",
        "redis",
        "jinja2",
        "uvicorn",
        "pydantic",
        "fastapi",
        "httpx",
        "jwt",
        "jsonschema",
    ]
    code = f"import sys, sseviews; print(','.join(m for m in {optional!r} if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.strip() == ""
