"""Cost of an htmx fragment per publish: rendered once vs once per subscriber.

`python benchmarks/fragments.py` renders a small chat-message template (6 lines of
HTML) and reports, for one publish to 2000 subscribers:

- once: `Fragments.event()` renders and encodes it once (what `publish()` does:
  every subscriber gets a reference to the same bytes);
- per subscriber: rendering it 2000 times, as code that renders in each stream's
  `events()` would.

Medians of 7 runs. Also measures `StreamTokens.verify()`, the token check paid once
per connect by a view that sets `tokens` (best of 5 x 20,000 calls).

Every figure is CPU time of this process (`time.process_time`), not wall-clock
time: on an idle machine the two agree for this single-threaded work, and on a
shared one other processes no longer inflate it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import timeit
from collections.abc import Callable
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
        started = time.process_time()
        function()  # type: ignore[operator]
        samples.append(time.process_time() - started)
    return statistics.median(samples)


def best_seconds_per_call(function: Callable[[], object], number: int) -> float:
    """CPU seconds per call of `function`: the best of 5 runs of `number` calls."""
    runs = timeit.repeat(function, timer=time.process_time, number=number, repeat=5)
    return min(runs) / number


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
    verify = best_seconds_per_call(lambda: tokens.verify(token), number)
    rotated = StreamTokens("n" * 32, previous=["s" * 32])
    old = best_seconds_per_call(lambda: rotated.verify(token), number)
    print(f"token check per connect (StreamTokens.verify):     {verify * 1e6:9.1f} us")
    print(f"... signed with the previous secret (rotation):    {old * 1e6:9.1f} us")


if __name__ == "__main__":
    main()
