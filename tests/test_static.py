"""`js_route()`: the browser helper served from the installed package."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.applications import Starlette

import sseviews
from sseviews import js_route
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio

SOURCE = Path(sseviews.__file__).parent / "static" / "sseviews.js"


async def test_static_js_route_serves_the_helper_with_an_etag() -> None:
    app = Starlette(routes=[js_route("/assets/sseviews.js")])
    async with EventStreamClient(app) as client:
        response = await client.get("/assets/sseviews.js")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/javascript")
        assert response.content == SOURCE.read_bytes()
        etag = response.headers["etag"]
        again = await client.get("/assets/sseviews.js", headers={"If-None-Match": etag})
        assert again.status_code == 304
        assert again.content == b""


def test_static_helper_stays_small() -> None:
    # Minified it is about 1.8 KB (docs/browser-client.md); the source, with its
    # comments, must stay well inside what minifies to under 4 KB.
    assert len(SOURCE.read_bytes()) < 6000
    assert "sseviews.expired" in SOURCE.read_text()
