"""Cost of an htmx fragment per publish: rendered once vs once per subscriber.

`python benchmarks/fragments.py` renders a small chat-message template (6 lines of
HTML) and reports, for one publish to 2000 subscribers:

- once: `Fragments.event()` renders and encodes it once (what `publish()` does:
  every subscriber gets a reference to the same bytes);
- per subscriber: rendering it 2000 times, as code that renders in each stream's
  `events()` would.

Medians of 7 runs. Also measures `StreamTokens.verify()`, the token check paid once
per connect by a view that sets `tokens`.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import timeit
from pathlib import Path

from sseviews.htmx import Fragments
from sseviews.tokens import StreamTokens

SUBSCRIBERS = 2000
TEMPLATE = """<li class="message" id="m-{{ id }}">
  <span class="who">{{ author }}</span>
  <time>{{ at }}</time>
  <p>{{ text }}</p>
  {% if tags %}<ul>{% for tag in tags %}<li>{{ tag }}</li>{% endfor %}</ul>{% endif %}
</li>"""
CONTEXT = {
    "id": 42,
    "author": "ada <admin>",
    "at": "12:00",
    "text": "hello & welcome " * 4,
    "tags": ["a", "b"],
}


def median_seconds(function: object, runs: int = 7) -> float:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        function()  # type: ignore[operator]
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "message.html").write_text(TEMPLATE)
        fragments = Fragments(folder)
        fragments.event("chat", "message.html", **CONTEXT)  # warm the template cache

        once = median_seconds(lambda: fragments.event("chat", "message.html", **CONTEXT))
        each = median_seconds(
            lambda: [fragments.event("chat", "message.html", **CONTEXT) for _ in range(SUBSCRIBERS)]
        )
    print(f"fragment render + encode, once per publish:        {once * 1e6:9.1f} us")
    print(f"rendered per subscriber ({SUBSCRIBERS} subscribers):       {each * 1e3:9.2f} ms")
    print(f"ratio: {each / once:,.0f}x")

    tokens = StreamTokens("s" * 32)
    token = tokens.issue("user-42", groups=["room:lobby", "room:help"])
    number = 20000
    verify = min(timeit.repeat(lambda: tokens.verify(token), number=number, repeat=5)) / number
    rotated = StreamTokens("n" * 32, previous=["s" * 32])
    old = min(timeit.repeat(lambda: rotated.verify(token), number=number, repeat=5)) / number
    print(f"token check per connect (StreamTokens.verify):     {verify * 1e6:9.1f} us")
    print(f"... signed with the previous secret (rotation):    {old * 1e6:9.1f} us")


if __name__ == "__main__":
    main()
