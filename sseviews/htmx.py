"""HTML fragment events for htmx's SSE extension, rendered from Jinja2 templates.

htmx's SSE support swaps the data of an event into the page, so it wants HTML,
not JSON. htmx 2's extension swaps the events an element names (`sse-swap="chat"`
swaps every `chat` event, `sse-swap="message"` the unnamed ones); htmx 4's
`hx-sse:connect` swaps only unnamed events. Unnamed fragments work with both.

`Fragments` renders a template into an `Event` whose data is that HTML; multi-line
HTML is sent as several `data:` lines, which both join back with newlines.

Autoescaping is always on: values from users cannot inject markup.

A fragment given to `Broadcast.publish()` is rendered once, when you build it,
and its bytes are shared by every subscriber.

Needs Jinja2: `pip install sseviews[htmx]`.
"""

from __future__ import annotations

import os
from typing import Any

import jinja2

from ._events import Event

__all__ = ["Fragments"]


class Fragments:
    """Render Jinja2 templates into HTML fragment events.

    Args:
        directory: A folder (or several) of templates; an autoescaping
            environment is made for it.
        env: A Jinja2 `Environment` of your own (or a Starlette
            `Jinja2Templates`, whose `env` is used) instead of `directory`.

    Raises:
        ValueError: Neither or both of `directory` and `env` are given, or `env`
            has autoescaping turned off.
    """

    __slots__ = ("env",)

    def __init__(
        self,
        directory: str | os.PathLike[str] | list[str | os.PathLike[str]] | None = None,
        *,
        env: Any = None,
    ) -> None:
        if (directory is None) == (env is None):
            raise ValueError("Fragments needs either a template directory or env=, not both")
        if env is None:
            env = jinja2.Environment(
                loader=jinja2.FileSystemLoader(directory),  # type: ignore[arg-type]
                autoescape=True,
                enable_async=False,
            )
        else:
            env = getattr(env, "env", env)  # Starlette's Jinja2Templates
            if not isinstance(env, jinja2.Environment):
                raise ValueError(f"Fragments env must be a jinja2.Environment, got {env!r}")
            if env.autoescape is False:
                raise ValueError(
                    "Fragments env must autoescape (jinja2.Environment(autoescape=True)): "
                    "fragments carry user data into the page"
                )
        self.env: jinja2.Environment = env

    def render(self, template: str, /, **context: Any) -> str:
        """Render `template` with `context` into an HTML string (autoescaped)."""
        return self.env.get_template(template).render(**context)

    def event(
        self, name: str | None, template: str, /, *, id: str | int | None = None, **context: Any
    ) -> Event:
        """Render `template` into an `Event` named `name` (the name `sse-swap` selects).

        Yield it from `events()`, or publish it: `await broadcast.publish(group,
        fragments.event("chat", "message.html", message=m))` renders once for
        every subscriber.

        Args:
            name: The event name; None sends an unnamed (`message`) event,
                the only kind htmx 4 swaps (it dispatches named events as DOM
                events).
            template: The template's name in the environment.
            id: The event id (leave it out for `publish()`, which assigns ids).
            **context: The template's variables.
        """
        return Event(self.render(template, **context), event=name, id=id)
