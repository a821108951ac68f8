"""The Starlette app: pages, the endpoints that post, and the event streams.

`create_app()` builds one app from `Settings` (by default from the environment):
its own database engine, its own `Broadcast`, and its stream views wired to them.
The module-level `app` is the one `python -m example_project` serves.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import anyio
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sseviews import Broadcast, BroadcastError, StreamRouter
from sseviews.stores.sqlalchemy import SQLAlchemyStore
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from .chat import (
    PRIVATE_GROUP,
    PRIVATE_ROOM,
    check_room,
    check_token,
    clean_message,
    latest_messages,
    member_name,
    post_message,
    resume_cursor,
    room_group,
)
from .htmx_feed import VENDOR, htmx_routes
from .jobs import JobRunner
from .models import Base, Message
from .settings import Settings
from .views import DashboardFeed, JobFeed, PrivateRoomFeed, RoomFeed, configure

logger = logging.getLogger("example_project")

MAX_BODY_BYTES = 16 * 1024
MAX_JOB_STEPS = 100


def _hhmm(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%H:%M")


templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
templates.env.filters["hhmm"] = _hhmm


# -- reading what the browser posts ----------------------------------------------------


async def read_fields(request: Request) -> dict[str, str]:
    """The posted JSON object or urlencoded form, as text fields.

    Raises:
        HTTPException: 413 for a body over 16 KiB, 415 for another content type,
            400 for a body that does not parse, 422 for JSON that is not an object.
    """
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"the body must be at most {MAX_BODY_BYTES} bytes")
    if not body:
        return {}
    content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            data = json.loads(body)
        except ValueError:
            raise HTTPException(400, "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise HTTPException(422, "expected a JSON object")
        return {
            str(key): str(value)
            for key, value in data.items()
            if isinstance(value, str | int | float) and not isinstance(value, bool)
        }
    if content_type == "application/x-www-form-urlencoded":
        try:
            text = body.decode("utf-8")
            return dict(parse_qsl(text, keep_blank_values=True, errors="strict"))
        except UnicodeDecodeError:
            raise HTTPException(400, "the form is not valid UTF-8") from None
    raise HTTPException(415, "post JSON or an urlencoded form")


def _is_json(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("application/json")


# -- pages -------------------------------------------------------------------------


async def index(request: Request) -> Response:
    last = func.max(Message.id)
    query = (
        select(Message.room, func.count(), last)
        .where(Message.room != PRIVATE_ROOM)
        .group_by(Message.room)
        .order_by(last.desc())
        .limit(20)
    )
    async with request.app.state.sessions() as session:
        rooms = [(room, count) for room, count, _ in await session.execute(query)]
    return templates.TemplateResponse(request, "index.html", {"rooms": rooms})


async def room_page(request: Request) -> Response:
    room = check_room(request.path_params["room"])
    state = request.app.state
    async with state.sessions() as session:
        messages = await latest_messages(session, room)
    context = {
        "room": room,
        "messages": messages,
        "cursor": await resume_cursor(messages, state.broadcast, room_group(room)),
        "events_url": request.url_for("room_events", room=room).path,
        "post_url": request.url_for("post_room_message", room=room).path,
        "members_url": request.url_for("room_members", room=room).path,
        "name": member_name(request) or "",
    }
    return templates.TemplateResponse(request, "room.html", context)


async def room_members(request: Request) -> Response:
    """Who is in the room now: its presence entries, oldest first, as JSON."""
    room = check_room(request.path_params["room"])
    try:
        entries = await request.app.state.broadcast.presence(room_group(room))
    except BroadcastError as exc:
        logger.warning("could not read who is in %s: %s", room, exc)
        raise HTTPException(
            503, "the member list cannot be read right now", headers={"Retry-After": "2"}
        ) from None
    return JSONResponse([entry.as_dict() for entry in entries])


async def private_page(request: Request) -> Response:
    state = request.app.state
    try:
        check_token(request, state.settings.private_token)
    except HTTPException:
        # The page itself is public; its stream says why it is refused.
        allowed = False
    else:
        allowed = True
    messages = []
    if allowed:
        async with state.sessions() as session:
            messages = await latest_messages(session, PRIVATE_ROOM)
    token = request.query_params.get("token", "")
    query = "?" + urlencode({"token": token}) if token else ""
    context = {
        "room": "private",
        "messages": messages,
        "cursor": await resume_cursor(messages, state.broadcast, PRIVATE_GROUP),
        "events_url": request.url_for("private_events").path + query,
        "post_url": request.url_for("post_private_message").path + query,
        "has_cookie": "token" in request.cookies,
    }
    return templates.TemplateResponse(request, "private.html", context)


async def dashboard_page(request: Request) -> Response:
    return templates.TemplateResponse(request, "dashboard.html")


async def jobs_page(request: Request) -> Response:
    job = request.query_params.get("job", "")
    return templates.TemplateResponse(request, "jobs.html", {"job": job if job.isdigit() else ""})


# -- actions -----------------------------------------------------------------------


async def _post(request: Request, room: str, page: str) -> Response:
    author, text = clean_message(await read_fields(request))
    state = request.app.state
    try:
        message = await post_message(state.sessions, state.broadcast, room, author, text)
    except BroadcastError as exc:
        logger.warning("could not publish a message to %s: %s", room, exc)
        raise HTTPException(
            503, "messages cannot be delivered right now", headers={"Retry-After": "2"}
        ) from None
    if not _is_json(request):
        return RedirectResponse(page, status_code=303)  # a form posted without JavaScript
    return JSONResponse({**message.to_dict(), "event_id": message.event_id}, status_code=201)


async def post_room_message(request: Request) -> Response:
    room = check_room(request.path_params["room"])
    return await _post(request, room, request.url_for("room", room=room).path)


async def post_private_message(request: Request) -> Response:
    check_token(request, request.app.state.settings.private_token)
    return await _post(request, PRIVATE_ROOM, request.url_for("private").path)


async def set_private_token(request: Request) -> Response:
    """Keep the token the form posted in a cookie for the private room ("" forgets it)."""
    token = (await read_fields(request)).get("token", "").strip()
    response = RedirectResponse(request.url_for("private").path, status_code=303)
    if token:
        response.set_cookie("token", token, path="/private", httponly=True, samesite="strict")
    else:
        response.delete_cookie("token", path="/private")
    return response


async def start_job(request: Request) -> Response:
    fields = await read_fields(request)
    settings: Settings = request.app.state.settings
    raw = fields.get("steps", "") or str(settings.job_steps)
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_JOB_STEPS:
        raise HTTPException(422, f"steps must be a whole number from 1 to {MAX_JOB_STEPS}")
    job = await request.app.state.jobs.start(int(raw))
    events = request.url_for("job_events", job_id=job.id).path
    if not _is_json(request):
        return RedirectResponse(f"{request.url_for('jobs').path}?job={job.id}", status_code=303)
    return JSONResponse({"id": job.id, "steps": job.steps, "events": events}, status_code=201)


# -- the app -----------------------------------------------------------------------


async def create_tables(engine: AsyncEngine) -> None:
    """Create the missing tables (a real project would run Alembic migrations instead).

    Several workers starting at once may all see a table missing; the losers of
    that race fail their CREATE, and find the table there on a second look.
    """
    for attempt in range(2):
        try:
            async with engine.begin() as connection:
                await connection.run_sync(Base.metadata.create_all)
            return
        except DBAPIError:
            if attempt:
                raise


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the app: database, broadcast and routes, from `settings` or the environment."""
    settings = Settings.from_env() if settings is None else settings
    engine = create_async_engine(settings.database_url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    broadcast = Broadcast(
        settings.broadcast_url, history=settings.history_url, prefix=settings.broadcast_prefix
    )
    # Jobs keep their events' history in the app's own database, on its own engine: a
    # step's row update and its `progress` event commit (or roll back) together.
    jobs_prefix = f"{settings.broadcast_prefix}_jobs"
    jobs_broadcast = Broadcast(
        settings.broadcast_url,
        history=SQLAlchemyStore(engine, table_prefix=jobs_prefix),
        prefix=jobs_prefix,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.started = anyio.current_time()
        try:
            await create_tables(engine)
            async with broadcast, jobs_broadcast, anyio.create_task_group() as tasks:
                app.state.jobs = JobRunner(
                    tasks, sessions, jobs_broadcast, step_seconds=settings.job_step_seconds
                )
                yield
                tasks.cancel_scope.cancel()  # running jobs record that they were stopped
        finally:
            await engine.dispose()

    streams = StreamRouter()
    streams.add_stream(
        "/rooms/{room}/events", configure(RoomFeed, broadcast=broadcast), name="room_events"
    )
    streams.add_stream(
        "/private/events", configure(PrivateRoomFeed, broadcast=broadcast), name="private_events"
    )
    streams.add_stream("/dashboard/events", DashboardFeed, name="dashboard_events")
    streams.add_stream(
        "/jobs/{job_id}/events",
        configure(JobFeed, broadcast=jobs_broadcast, session_factory=sessions),
        name="job_events",
    )
    routes: list[Any] = [
        Route("/", index, name="index"),
        Route("/rooms/{room}", room_page, name="room"),
        Route("/rooms/{room}/messages", post_room_message, methods=["POST"]),
        Route("/rooms/{room}/members", room_members, name="room_members"),
        Route("/private", private_page, name="private"),
        Route("/private/messages", post_private_message, methods=["POST"]),
        Route("/private/token", set_private_token, methods=["POST"]),
        Route("/dashboard", dashboard_page, name="dashboard"),
        Route("/jobs", jobs_page, name="jobs"),
        Route("/jobs", start_job, methods=["POST"]),
        *streams.routes,
        *htmx_routes(
            broadcast,
            templates.TemplateResponse,
            Path(settings.node_modules) if settings.node_modules else VENDOR,
        ),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.settings = settings
    app.state.sessions = sessions
    app.state.broadcast = broadcast
    app.state.jobs_broadcast = jobs_broadcast
    return app


# `python -m example_project` serves this one (`example_project:app`, or `example_project.app:app`).
app = create_app()
