"""The example project, driven in-process with `EventStreamClient` (no server, no sockets).

The same features are checked in a real browser by `tests/browser/`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import sqlalchemy
from sqlalchemy.ext.asyncio import create_async_engine

from sseviews import Event
from sseviews.testing import EventStream, EventStreamClient

# The example project is its own distribution (`pip install -e example_project`);
# this also finds it in a checkout where it was not installed.
EXAMPLE_ROOT = Path(__file__).resolve().parents[1] / "example_project"
if str(EXAMPLE_ROOT) not in sys.path:
    sys.path.insert(0, str(EXAMPLE_ROOT))

from example_project import Settings, create_app  # noqa: E402

pytestmark = pytest.mark.anyio

TOKEN = "s3cret"


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'app.db'}",
        "private_token": TOKEN,
        "job_step_seconds": 0.01,
        "metrics_interval": 0.05,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[EventStreamClient]:
    async with EventStreamClient(create_app(settings)) as client:
        yield client


async def post(client: EventStreamClient, room: str, text: str, **fields: str) -> dict[str, Any]:
    response = await client.post(f"/rooms/{room}/messages", json={"text": text, **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def collect(stream: EventStream) -> list[Event]:
    """Every event until the view ends the stream."""
    with anyio.fail_after(5):
        return [event async for event in stream]


# -- chat ----------------------------------------------------------------------------


async def test_chat_post_arrives_with_its_id(client: EventStreamClient) -> None:
    async with client.stream("/rooms/lobby/events") as stream:
        assert stream.status_code == 200
        assert stream.retry == 500
        posted = await post(client, "lobby", "hello", author="ada")
        event = await stream.next_event(timeout=2)
    assert event.id is not None
    assert event.id == posted["event_id"]
    assert event.event is None  # pages read messages with onmessage
    data = event.json()
    assert (data["id"], data["author"], data["text"]) == (posted["id"], "ada", "hello")


async def test_chat_form_post_redirects_to_the_room(client: EventStreamClient) -> None:
    response = await client.post("/rooms/lobby/messages", data={"author": "", "text": "by form"})
    assert response.status_code == 303
    assert response.headers["location"] == "/rooms/lobby"
    page = await client.get("/rooms/lobby")
    assert "by form" in page.text
    assert "anonymous" in page.text


async def test_chat_reconnect_replays_each_missed_message_once(client: EventStreamClient) -> None:
    async with client.stream("/rooms/lobby/events") as stream:
        await post(client, "lobby", "one")
        seen = await stream.next_event(timeout=2)
    for text in ("two", "three"):
        await post(client, "lobby", text)
    resume = {"last-event-id": seen.id or ""}
    async with client.stream("/rooms/lobby/events", headers=resume) as stream:
        replayed = [await stream.next_event(timeout=2) for _ in range(2)]
        await post(client, "lobby", "four")
        live = await stream.next_event(timeout=2)
    assert [event.json()["text"] for event in replayed] == ["two", "three"]
    assert live.json()["text"] == "four"  # nothing replayed twice before it
    ids = [seen.id, *(event.id for event in replayed), live.id]
    assert len(set(ids)) == 4


async def test_chat_page_resumes_right_after_its_newest_message(
    client: EventStreamClient,
) -> None:
    first = await post(client, "lobby", "<script>alert(1)</script>")
    page = await client.get("/rooms/lobby")
    assert page.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert f'data-cursor="{first["event_id"]}"' in page.text
    # Posted between the page and its stream: the stream's replay brings it.
    second = await post(client, "lobby", "after the page")
    async with client.stream(f"/rooms/lobby/events?lastEventId={first['event_id']}") as stream:
        event = await stream.next_event(timeout=2)
    assert event.id == second["event_id"]


async def test_chat_page_after_restart_with_memory_history_starts_live(
    settings: Settings,
) -> None:
    async with EventStreamClient(create_app(settings)) as client:
        old = await post(client, "lobby", "before the restart")
    # Same database, new process: the memory history (and its epoch) is gone.
    async with EventStreamClient(create_app(settings)) as client:
        page = await client.get("/rooms/lobby")
        assert "before the restart" in page.text
        assert 'data-cursor=""' in page.text
        # A browser still holding the old id is told to start afresh.
        headers = {"last-event-id": old["event_id"]}
        async with client.stream("/rooms/lobby/events", headers=headers) as stream:
            reset = await stream.next_event(timeout=2)
    assert reset.event == "sseviews.reset"


async def test_chat_sql_history_replays_across_a_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, history_url=f"sqlite+aiosqlite:///{tmp_path / 'h.db'}")
    async with EventStreamClient(create_app(settings)) as client:
        seen = await post(client, "lobby", "seen before the restart")
    async with EventStreamClient(create_app(settings)) as client:
        missed = await post(client, "lobby", "posted while the browser was away")
        headers = {"last-event-id": seen["event_id"]}
        async with client.stream("/rooms/lobby/events", headers=headers) as stream:
            event = await stream.next_event(timeout=2)
        page = await client.get("/rooms/lobby")
    assert event.id == missed["event_id"]
    assert f'data-cursor="{missed["event_id"]}"' in page.text


async def test_chat_rooms_are_separate(client: EventStreamClient) -> None:
    async with client.stream("/rooms/other/events") as stream:
        await post(client, "lobby", "for the lobby")
        await post(client, "other", "for other")
        event = await stream.next_event(timeout=2)
    assert event.json()["text"] == "for other"


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"content-type": "application/json"}, b'{"text": ""}', 422),
        ({"content-type": "application/json"}, b'{"text": "%s"}' % (b"x" * 501), 422),
        ({"content-type": "application/json"}, b'{"text": "x", "author": "%s"}' % (b"a" * 41), 422),
        ({"content-type": "application/json"}, b"{not json", 400),
        ({"content-type": "application/json"}, b'["text"]', 422),
        ({"content-type": "application/x-www-form-urlencoded"}, b"text=%ff", 400),
        ({"content-type": "text/plain"}, b"hello", 415),
        ({"content-type": "application/json"}, b" " * (16 * 1024 + 1), 413),
    ],
)
async def test_chat_refuses_bad_posts(
    client: EventStreamClient, headers: dict[str, str], body: bytes, status: int
) -> None:
    response = await client.post("/rooms/lobby/messages", headers=headers, content=body)
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text


async def test_chat_refuses_bad_room_names(client: EventStreamClient) -> None:
    for path in ("/rooms/Lobby", "/rooms/a%20b", "/rooms/" + "x" * 41):
        assert (await client.get(path)).status_code == 404
        response = await client.post(f"{path}/messages", json={"text": "x"})
        assert response.status_code == 404
        async with client.stream(f"{path}/events") as stream:
            assert stream.status_code == 404


async def test_index_lists_public_rooms(client: EventStreamClient) -> None:
    await post(client, "alpha", "a")
    await post(client, "alpha", "b")
    await client.post("/private/messages", json={"text": "secret"}, params={"token": TOKEN})
    page = await client.get("/")
    assert page.status_code == 200
    assert 'href="/rooms/alpha"' in page.text
    assert "2 messages" in page.text
    assert "private" not in page.text.split('id="rooms"')[1]


# -- the private room ------------------------------------------------------------------


async def test_private_stream_without_token_is_refused_with_401(
    client: EventStreamClient,
) -> None:
    async with client.stream("/private/events") as stream:
        await stream.wait_ended()
    assert stream.status_code == 401
    assert stream.headers["www-authenticate"] == "Bearer"
    assert "needs a token" in stream.text
    assert stream.headers["content-type"].startswith("text/plain")  # not an event stream


async def test_private_stream_with_a_wrong_token_is_refused_with_403(
    client: EventStreamClient,
) -> None:
    for headers in ({"cookie": "token=nope"}, {"authorization": "Bearer nope"}):
        async with client.stream("/private/events", headers=headers) as stream:
            await stream.wait_ended()
        assert stream.status_code == 403
    async with client.stream("/private/events?token=nope") as stream:
        await stream.wait_ended()
    assert stream.status_code == 403


@pytest.mark.parametrize(
    ("url", "headers"),
    [
        (f"/private/events?token={TOKEN}", {}),
        ("/private/events", {"cookie": f"token={TOKEN}"}),
        ("/private/events", {"authorization": f"Bearer {TOKEN}"}),
    ],
)
async def test_private_stream_with_the_token_gets_private_messages(
    client: EventStreamClient, url: str, headers: dict[str, str]
) -> None:
    async with client.stream(url, headers=headers) as stream:
        assert stream.status_code == 200
        # A public room named "private" is another room.
        await post(client, "private", "public room")
        response = await client.post(
            "/private/messages", json={"text": "psst"}, headers={"cookie": f"token={TOKEN}"}
        )
        assert response.status_code == 201
        event = await stream.next_event(timeout=2)
    assert event.json()["text"] == "psst"
    assert event.id == response.json()["event_id"]


async def test_private_posts_and_page_need_the_token(client: EventStreamClient) -> None:
    refused = await client.post("/private/messages", json={"text": "let me in"})
    assert refused.status_code == 401
    wrong = await client.post("/private/messages?token=nope", json={"text": "let me in"})
    assert wrong.status_code == 403
    await client.post(f"/private/messages?token={TOKEN}", json={"text": "inner secret"})
    # The page is public (its stream explains the refusal); the messages are not.
    outside = await client.get("/private")
    assert outside.status_code == 200
    assert "inner secret" not in outside.text
    inside = await client.get("/private", headers={"cookie": f"token={TOKEN}"})
    assert "inner secret" in inside.text


async def test_private_token_form_sets_and_forgets_the_cookie(client: EventStreamClient) -> None:
    response = await client.post("/private/token", data={"token": TOKEN})
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"token={TOKEN};")
    assert "HttpOnly" in cookie
    assert "Path=/private" in cookie
    forget = await client.post("/private/token", data={"token": ""})
    assert "Max-Age=0" in forget.headers["set-cookie"]


# -- jobs ----------------------------------------------------------------------------


async def start_job(client: EventStreamClient, steps: int) -> dict[str, Any]:
    response = await client.post("/jobs", json={"steps": steps})
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


async def test_job_progress_ends_with_done(client: EventStreamClient) -> None:
    job = await start_job(client, 4)
    assert job["events"] == f"/jobs/{job['id']}/events"
    async with client.stream(job["events"]) as stream:
        assert stream.status_code == 200
        events = await collect(stream)
        assert stream.ended  # the view returned after `done`
    names = [event.event for event in events]
    assert names[-1] == "done"
    assert set(names[:-1]) == {"progress"}
    percents = [event.json()["percent"] for event in events[:-1]]
    assert percents == sorted(percents)
    assert percents[-1] == 100
    assert events[-1].json() == {
        "job": job["id"],
        "status": "done",
        "result": "checked 4 things, all fine",
    }


async def test_job_watched_after_it_finished_gets_done_at_once(
    client: EventStreamClient,
) -> None:
    job = await start_job(client, 2)
    async with client.stream(job["events"]) as stream:
        await collect(stream)
    async with client.stream(job["events"]) as stream:
        events = await collect(stream)
    assert [event.event for event in events] == ["progress", "done"]
    assert events[0].json()["percent"] == 100


async def test_job_reconnect_replays_the_steps_after_last_event_id(
    client: EventStreamClient,
) -> None:
    job = await start_job(client, 3)
    async with client.stream(job["events"]) as stream:
        first = await collect(stream)
    with_ids = [event for event in first if event.id is not None]
    resume = {"last-event-id": with_ids[0].id or ""}
    async with client.stream(job["events"], headers=resume) as stream:
        replayed = await collect(stream)
    assert [event.id for event in replayed] == [event.id for event in with_ids[1:]]
    assert replayed[-1].event == "done"


async def test_job_interrupted_by_shutdown_is_reported_done(settings: Settings) -> None:
    slow = Settings(**{**settings.__dict__, "job_step_seconds": 30.0})
    async with EventStreamClient(create_app(slow)) as client:
        job = await start_job(client, 5)
    async with EventStreamClient(create_app(slow)) as client:
        async with client.stream(job["events"]) as stream:
            events = await collect(stream)
    assert events[-1].event == "done"
    assert events[-1].json()["status"] == "interrupted"
    assert events[-1].json()["result"] == "stopped at step 0 of 5"


async def test_job_steps_commit_with_their_events_in_the_app_database(
    settings: Settings,
) -> None:
    async with EventStreamClient(create_app(settings)) as client:
        job = await start_job(client, 3)
        async with client.stream(job["events"]) as stream:
            first = await collect(stream)
    # The events are stored in the app's database, next to the job's row.
    engine = create_async_engine(settings.database_url)
    try:
        count = sqlalchemy.text("SELECT count(*) FROM example_project_jobs_v2_events")
        async with engine.connect() as conn:
            stored = (await conn.execute(count)).scalar_one()
    finally:
        await engine.dispose()
    with_ids = [event for event in first if event.id is not None]
    assert stored == len(with_ids) == 4  # three progress events and done
    # So they outlive the process: a watcher resumes after a restart, no reset.
    async with EventStreamClient(create_app(settings)) as client:
        resume = {"last-event-id": with_ids[0].id or ""}
        async with client.stream(job["events"], headers=resume) as stream:
            replayed = await collect(stream)
    assert [event.id for event in replayed] == [event.id for event in with_ids[1:]]


async def test_job_form_post_redirects_to_its_page(client: EventStreamClient) -> None:
    response = await client.post("/jobs", data={"steps": "2"})
    assert response.status_code == 303
    assert response.headers["location"].startswith("/jobs?job=")
    page = await client.get(response.headers["location"])
    job_id = response.headers["location"].rsplit("=", 1)[1]
    assert f'data-job="{job_id}"' in page.text


@pytest.mark.parametrize("steps", [0, 101, "ten", -1, 2.5])
async def test_job_refuses_bad_steps(client: EventStreamClient, steps: object) -> None:
    response = await client.post("/jobs", json={"steps": steps})
    assert response.status_code == 422


async def test_job_stream_of_an_unknown_job_is_404(client: EventStreamClient) -> None:
    for path in ("/jobs/999/events", "/jobs/abc/events"):
        async with client.stream(path) as stream:
            await stream.wait_ended()
        assert stream.status_code == 404


# -- dashboard -------------------------------------------------------------------------


async def test_dashboard_emits_process_metrics(client: EventStreamClient) -> None:
    async with client.stream("/dashboard/events") as stream:
        events = [await stream.next_event(timeout=2) for _ in range(3)]
        assert not stream.ended
    assert [event.event for event in events] == ["metrics"] * 3
    metrics = events[-1].json()
    assert metrics["pid"] == os.getpid()
    assert metrics["rss_bytes"] > 1024 * 1024
    assert metrics["cpu_percent"] >= 0
    assert metrics["streams"] == 0  # the dashboard joins no group
    assert metrics["uptime_seconds"] >= 0
    if sys.platform == "linux":
        assert metrics["open_files"] > 0
        assert metrics["threads"] >= 1


async def test_dashboard_counts_open_group_streams(client: EventStreamClient) -> None:
    async with client.stream("/rooms/lobby/events"), client.stream("/rooms/other/events"):
        async with client.stream("/dashboard/events") as stream:
            metrics = (await stream.next_event(timeout=2)).json()
    assert metrics["streams"] == 2


# -- the htmx page ---------------------------------------------------------------------

HTMX_SCRIPTS = ("htmx.org/dist/htmx.min.js", "htmx-ext-sse/sse.js")
HTMX4_SCRIPTS = ("htmx4/dist/htmx.min.js", "htmx4/dist/ext/hx-sse.js")
INSTALL = "npm install --no-save --no-package-lock htmx.org@2 htmx-ext-sse@2 htmx4@npm:htmx.org@4"


def fake_node_modules(folder: Path, scripts: tuple[str, ...] = HTMX_SCRIPTS) -> Path:
    """A node_modules holding the files a page loads (their content is not run here)."""
    for script in scripts:
        path = folder / "node_modules" / script
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"/* {script} */\n")
    return folder / "node_modules"


async def test_htmx_page_without_htmx_says_what_to_run(tmp_path: Path) -> None:
    missing = tmp_path / "no_npm_here" / "node_modules"
    settings = make_settings(tmp_path, node_modules=str(missing))
    async with EventStreamClient(create_app(settings)) as client:
        page = await client.get("/htmx")
        script = await client.get("/vendor/htmx.org/dist/htmx.min.js")
    assert page.status_code == 200
    command = f"cd {missing.parent} &amp;&amp; npm install --no-save --no-package-lock"
    assert command in page.text
    assert "htmx.org@2 htmx-ext-sse@2" in page.text
    assert "/vendor/" not in page.text  # no script the browser would fail to load
    # Nothing can be typed into a form that has nowhere to go.
    assert '<input name="text" placeholder="message" maxlength="500" required disabled>' in (
        page.text
    )
    assert "<button disabled>Send</button>" in page.text
    # Not StaticFiles' 500 for a missing folder: a 404 that says the same.
    assert script.status_code == 404
    assert "htmx is not installed; run: cd " in script.text


async def test_htmx_page_with_htmx_loads_it_from_vendor(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, node_modules=str(fake_node_modules(tmp_path)))
    async with EventStreamClient(create_app(settings)) as client:
        page = await client.get("/htmx")
        scripts = [await client.get(f"/vendor/{script}") for script in HTMX_SCRIPTS]
    assert page.status_code == 200
    assert "npm install" not in page.text
    assert " disabled" not in page.text
    for script, response in zip(HTMX_SCRIPTS, scripts, strict=True):
        assert f'<script src="/vendor/{script}"></script>' in page.text
        assert response.status_code == 200
        assert response.text == f"/* {script} */\n"


async def test_htmx_page_works_once_htmx_is_installed_while_serving(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, node_modules=str(tmp_path / "node_modules"))
    async with EventStreamClient(create_app(settings)) as client:
        assert "npm install" in (await client.get("/htmx")).text
        assert (await client.get(f"/vendor/{HTMX_SCRIPTS[0]}")).status_code == 404
        fake_node_modules(tmp_path)  # `npm install`, the server still running
        assert "npm install" not in (await client.get("/htmx")).text
        assert (await client.get(f"/vendor/{HTMX_SCRIPTS[0]}")).status_code == 200


async def test_htmx_post_from_htmx_answers_204_and_publishes_a_fragment(
    client: EventStreamClient,
) -> None:
    async with client.stream("/htmx/events") as stream:
        response = await client.post(
            "/htmx/messages",
            data={"author": "ada", "text": "<b>hi</b>"},
            headers={"HX-Request": "true"},
        )
        event = await stream.next_event(timeout=2)
    assert response.status_code == 204
    assert event.event is None  # unnamed: both htmx 2 (sse-swap="message") and 4 swap it
    assert "&lt;b&gt;hi&lt;/b&gt;" in event.data
    assert "ada" in event.data


async def test_htmx_form_posted_without_htmx_is_published_and_comes_back(
    client: EventStreamClient,
) -> None:
    # htmx failed to load: the browser posts the form itself. The message must not be lost.
    async with client.stream("/htmx/events") as stream:
        response = await client.post("/htmx/messages", data={"author": "", "text": "by form"})
        event = await stream.next_event(timeout=2)
    assert response.status_code == 303
    assert response.headers["location"] == "/htmx"
    assert "by form" in event.data
    assert "anonymous" in event.data


async def test_htmx4_form_posted_without_htmx_is_published_and_comes_back_to_htmx4(
    client: EventStreamClient,
) -> None:
    async with client.stream("/htmx/events") as stream:
        response = await client.post(
            "/htmx/messages", data={"page": "htmx4", "author": "", "text": "by form"}
        )
        event = await stream.next_event(timeout=2)
    assert response.status_code == 303
    assert response.headers["location"] == "/htmx4"
    assert "by form" in event.data


async def test_htmx_post_refuses_an_empty_message(client: EventStreamClient) -> None:
    response = await client.post("/htmx/messages", data={"text": "  "})
    assert response.status_code == 422


async def test_index_lists_the_htmx_page(client: EventStreamClient) -> None:
    page = await client.get("/")
    assert '<a href="/htmx">htmx feed</a>:' in page.text
    assert '<a href="/htmx4">htmx 4 feed</a>:' in page.text
    assert "npm" in page.text


# -- pages and settings -----------------------------------------------------------------

PAGES = ["/", "/rooms/lobby", "/dashboard", "/jobs", "/private", "/htmx", "/htmx4"]


@pytest.mark.parametrize("path", PAGES)
async def test_pages_render(client: EventStreamClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "EventSource" in response.text or path in ("/", "/htmx", "/htmx4")


@pytest.mark.parametrize("path", PAGES)
async def test_pages_link_an_inline_icon(client: EventStreamClient, path: str) -> None:
    # Without a <link rel="icon">, every page load makes the browser ask for
    # /favicon.ico, which the app does not serve: a 404 in the log each time.
    assert (await client.get("/favicon.ico")).status_code == 404
    response = await client.get(path)
    assert '<link rel="icon" href="data:image/svg+xml,' in response.text


async def test_streams_answer_head_without_a_body(client: EventStreamClient) -> None:
    response = await client.request("HEAD", "/rooms/lobby/events")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.content == b""


def test_settings_from_env() -> None:
    settings = Settings.from_env(
        {
            "DATABASE_URL": "postgresql+asyncpg://app@db/app",
            "BROADCAST_URL": "redis://127.0.0.1:6379/0",
            "HISTORY_URL": "",
            "JOB_STEPS": "3",
            "JOB_STEP_SECONDS": "0.25",
            "NODE_MODULES": "/srv/npm/node_modules",
            "UNRELATED": "x",
        }
    )
    assert settings.database_url == "postgresql+asyncpg://app@db/app"
    assert settings.broadcast_url == "redis://127.0.0.1:6379/0"
    assert settings.history_url is None
    assert (settings.job_steps, settings.job_step_seconds) == (3, 0.25)
    assert settings.node_modules == "/srv/npm/node_modules"
    assert Settings.from_env({}) == Settings()
    with pytest.raises(ValueError, match="JOB_STEPS must be a number"):
        Settings.from_env({"JOB_STEPS": "many"})


# -- typed events (event_types) and the AsyncAPI document -------------------------------

ASYNCAPI_SCHEMA = Path(__file__).parent / "schemas" / "asyncapi-3.0.0.json"


def test_asyncapi_of_the_example_lists_typed_channels(capsys: pytest.CaptureFixture[str]) -> None:
    import jsonschema

    from sseviews._cli import main

    assert main(["asyncapi", "example_project.app:app"]) == 0
    document = json.loads(capsys.readouterr().out)
    validator = jsonschema.Draft7Validator(json.loads(ASYNCAPI_SCHEMA.read_text()))
    assert [error.message for error in validator.iter_errors(document)] == []

    def messages(channel: str) -> dict[str, tuple[str, Any]]:
        found = document["channels"][channel]["messages"].values()
        return {each["name"]: (each["contentType"], each["payload"]) for each in found}

    def ref(name: str) -> tuple[str, dict[str, str]]:
        return ("application/json", {"$ref": f"#/components/schemas/{name}"})

    reset = messages("room_events")["sseviews.reset"]
    # Any stream can end with sseviews.error (its events() raised).
    error = {"sseviews.error": messages("room_events")["sseviews.error"]}
    presence = {"sseviews.join": ref("Presence"), "sseviews.leave": ref("Presence")}
    room = {"message": ref("ChatMessage"), **presence, "sseviews.reset": reset, **error}
    assert messages("room_events") == room
    assert messages("private_events") == room
    assert messages("dashboard_events") == {"metrics": ref("Metrics"), **error}
    assert messages("job_events") == {
        "progress": ref("Progress"),
        "done": ref("Outcome"),
        "sseviews.reset": reset,
        **error,
    }
    feed = ("text/plain", {"type": "string"})
    assert messages("htmx_events") == {"message": feed, "sseviews.reset": reset, **error}
    schemas = document["components"]["schemas"]
    assert schemas["Outcome"]["properties"]["status"] == {"enum": ["done", "interrupted"]}
    assert set(schemas["Metrics"]["required"]) == {
        "pid",
        "rss_bytes",
        "cpu_percent",
        "open_files",
        "threads",
        "streams",
        "uptime_seconds",
    }


async def test_typed_room_presence_events_match_their_declaration(
    client: EventStreamClient,
) -> None:
    # The test client checks every relayed event against RoomFeed.event_types.
    async with client.stream("/rooms/lobby/events") as watcher:
        async with client.stream("/rooms/lobby/events?name=ada"):
            joined = await watcher.next_event(timeout=2)
        left = await watcher.next_event(timeout=2)
    assert [joined.event, left.event] == ["sseviews.join", "sseviews.leave"]
    assert joined.json()["info"] == {"name": "ada"}


async def test_typed_htmx_feed_sends_html_text(client: EventStreamClient) -> None:
    async with client.stream("/htmx/events") as stream:
        response = await client.post(
            "/htmx/messages",
            content=b"author=ada&text=hi",
            headers={"content-type": "application/x-www-form-urlencoded", "hx-request": "true"},
        )
        assert response.status_code == 204
        event = await stream.next_event(timeout=2)
    assert event.event is None  # unnamed: the only kind htmx 4 swaps
    assert "hi" in event.data and "<li" in event.data


async def test_typed_room_event_that_breaks_its_declaration_fails_the_test(
    settings: Settings,
) -> None:
    app = create_app(settings)
    async with EventStreamClient(app) as client:
        with pytest.raises(AssertionError, match=r"RoomFeed sent event 'message'.*text"):
            async with client.stream("/rooms/lobby/events") as stream:
                await app.state.broadcast.publish("room:lobby", {"id": 1, "text": 2})
                await stream.next_event(timeout=2)


@pytest.mark.parametrize("installed", ["nothing", "htmx2", "both"])
async def test_htmx4_page_loads_htmx4_or_says_what_to_run(tmp_path: Path, installed: str) -> None:
    node_modules = tmp_path / "node_modules"
    if installed != "nothing":
        fake_node_modules(tmp_path)
    if installed == "both":
        fake_node_modules(tmp_path, HTMX4_SCRIPTS)
    settings = make_settings(tmp_path, node_modules=str(node_modules))
    async with EventStreamClient(create_app(settings)) as client:
        response = await client.get("/htmx4")
        scripts = [await client.get(f"/vendor/{script}") for script in HTMX4_SCRIPTS]
    page = response.text
    has_htmx4 = installed == "both"
    assert response.status_code == 200  # never a 500, whatever is missing
    assert 'hx-sse:connect="/htmx/events"' in page
    for script, answer in zip(HTMX4_SCRIPTS, scripts, strict=True):
        assert (f'<script src="/vendor/{script}"></script>' in page) is has_htmx4
        assert answer.status_code == (200 if has_htmx4 else 404)
    assert ("/vendor/" in page) is has_htmx4  # no script the browser would fail to load
    # The one command for both pages: `npm install --no-save` removes what it is not given.
    assert (f"cd {tmp_path} &amp;&amp; {INSTALL}" in page) is not has_htmx4
    assert ("disabled" in page) is not has_htmx4  # nothing typed into a dead form is lost
