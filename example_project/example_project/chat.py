"""Chat rooms: names, groups, posting a message, reading a room's latest messages."""

from __future__ import annotations

import hmac
import re

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sseviews import Broadcast
from sseviews.stores.base import parse_id
from starlette.exceptions import HTTPException
from starlette.requests import Request

from .models import Message

# Public room names: they appear in URLs and in group names.
ROOM_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
# The private room's messages are stored under a name no public room can have.
PRIVATE_ROOM = "@private"
PRIVATE_GROUP = "private"
MAX_AUTHOR = 40
MAX_TEXT = 500
# Messages a room page shows when it opens.
PAGE_SIZE = 50


def check_room(room: str) -> str:
    """Return `room` if it is a public room name, else raise 404."""
    if ROOM_NAME.fullmatch(room) is None:
        raise HTTPException(404, "room names are 1-40 lowercase letters, digits and dashes")
    return room


def room_group(room: str) -> str:
    """The broadcast group of a room: every open page of the room subscribes to it."""
    return PRIVATE_GROUP if room == PRIVATE_ROOM else f"room:{room}"


def member_name(request: Request) -> str | None:
    """The name a room stream is listed under in the room's presence (`?name=`), if any.

    The example has no login, so a page says who its reader is; a real app would
    take the name from its session instead.

    Raises:
        HTTPException: 422 for a name longer than `MAX_AUTHOR` characters.
    """
    name = request.query_params.get("name", "").strip()
    if len(name) > MAX_AUTHOR:
        raise HTTPException(422, f"name must be at most {MAX_AUTHOR} characters")
    return name or None


def clean_message(fields: dict[str, str]) -> tuple[str, str]:
    """Return `(author, text)` from a posted form or JSON object, or raise 422."""
    author = fields.get("author", "").strip() or "anonymous"
    text = fields.get("text", "").strip()
    if not text:
        raise HTTPException(422, "text must not be empty")
    if len(text) > MAX_TEXT:
        raise HTTPException(422, f"text must be at most {MAX_TEXT} characters")
    if len(author) > MAX_AUTHOR:
        raise HTTPException(422, f"author must be at most {MAX_AUTHOR} characters")
    return author, text


async def post_message(
    sessions: async_sessionmaker[AsyncSession],
    broadcast: Broadcast,
    room: str,
    author: str,
    text: str,
) -> Message:
    """Store a message and publish it to its room's group, in one transaction.

    The event is published before the commit: if publishing fails, the message is
    not stored either. Posts to one room are serialised (SQLite serialises every
    write; PostgreSQL takes a per-room lock), so a room's messages are committed in
    the order of their event ids and a page's resume cursor never skips one.

    Raises:
        BroadcastError: The broadcast cannot publish (nothing was stored).
    """
    async with sessions.begin() as session:
        if session.get_bind().dialect.name == "postgresql":
            lock = func.pg_advisory_xact_lock(func.hashtext(room))
            await session.execute(select(lock))
        message = Message(room=room, author=author, text=text)
        session.add(message)
        await session.flush()  # assigns the id and created_at
        message.event_id = await broadcast.publish(room_group(room), message.to_dict())
    return message


async def latest_messages(session: AsyncSession, room: str) -> list[Message]:
    """The room's last `PAGE_SIZE` messages, oldest first."""
    query = select(Message).where(Message.room == room).order_by(Message.id.desc())
    rows = (await session.scalars(query.limit(PAGE_SIZE))).all()
    return list(reversed(rows))


async def resume_cursor(messages: list[Message], broadcast: Broadcast, group: str) -> str:
    """The id a page showing `messages` of `group` resumes its stream after ("" for live
    only).

    An id from another epoch of the group (its history was reset, for example a
    `memory://` history after a restart) cannot be resumed: the page then starts live.
    """
    for message in reversed(messages):
        if message.event_id:
            epoch, _ = parse_id(message.event_id)
            current, _ = parse_id(await broadcast.last_id(group))
            return message.event_id if epoch == current else ""
    return ""


def check_token(request: Request, expected: str) -> None:
    """Let the request through if it carries the private room's token.

    The token comes from `?token=`, the `token` cookie, or `Authorization: Bearer`.

    Raises:
        HTTPException: 401 without a token, 403 with a wrong one.
    """
    token = request.query_params.get("token") or request.cookies.get("token")
    if not token:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        token = value if scheme.lower() == "bearer" else ""
    if not token:
        raise HTTPException(
            401, "the private room needs a token", headers={"WWW-Authenticate": "Bearer"}
        )
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise HTTPException(403, "this token does not open the private room")
