"""`sseviews.htmx.Fragments`: HTML fragment events from Jinja2 templates."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import jinja2
import pytest
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from support.apps import app_for

from sseviews import Broadcast, Event, EventStreamView
from sseviews.htmx import Fragments
from sseviews.testing import EventStreamClient

pytestmark = pytest.mark.anyio

ITEM = '<li class="msg">\n  <b>{{ author }}</b>: {{ text }}\n</li>\n'


@pytest.fixture
def fragments(tmp_path: Path) -> Fragments:
    (tmp_path / "item.html").write_text(ITEM)
    return Fragments(tmp_path)


def test_htmx_fragment_is_escaped_and_split_into_data_lines(fragments: Fragments) -> None:
    event = fragments.event("chat", "item.html", author="<script>x</script>", text="a & b")
    assert event.event == "chat"
    assert event.encode() == (
        b"event: chat\n"
        b'data: <li class="msg">\n'
        b"data:   <b>&lt;script&gt;x&lt;/script&gt;</b>: a &amp; b\n"
        b"data: </li>\n\n"
    )


def test_htmx_env_without_autoescape_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="autoescape"):
        Fragments(env=jinja2.Environment(autoescape=False))
    with pytest.raises(ValueError, match="either"):
        Fragments()
    with pytest.raises(ValueError, match="either"):
        Fragments(tmp_path, env=jinja2.Environment(autoescape=True))


def test_htmx_accepts_starlette_templates(tmp_path: Path) -> None:
    (tmp_path / "item.html").write_text(ITEM)
    fragments = Fragments(env=Jinja2Templates(directory=tmp_path))
    assert "&lt;i&gt;" in fragments.render("item.html", author="<i>", text="")


async def test_htmx_fragment_from_events_and_publish_arrive_whole(fragments: Fragments) -> None:
    broadcast = Broadcast("memory://")

    class Feed(EventStreamView):
        groups = ("feed",)

        async def events(self) -> AsyncIterator[Event]:
            yield fragments.event("chat", "item.html", id=1, author="view", text="hello")
            async for event in self.subscription:
                yield event

    Feed.broadcast = broadcast

    app = app_for(broadcast, Route("/feed", Feed))
    async with EventStreamClient(app) as client:
        async with client.stream("/feed") as stream:
            first = await stream.next_event()
            await broadcast.publish(
                "feed", fragments.event("chat", "item.html", author="p", text="<hi>")
            )
            second = await stream.next_event()
    assert first.data == '<li class="msg">\n  <b>view</b>: hello\n</li>'
    assert second.event == "chat"
    assert second.data == '<li class="msg">\n  <b>p</b>: &lt;hi&gt;\n</li>'
