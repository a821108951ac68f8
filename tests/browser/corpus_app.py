"""A corpus of tricky events, served to a browser's `EventSource` by a real uvicorn.

Run as `python -m uvicorn corpus_app:app --app-dir tests/browser`; the browser test
(`test_encoder_corpus.py`) imports `CORPORA` from here to compute what the
browser must receive.

- `GET /stream/<name>` streams the corpus `<name>` (an `EventStreamView` that yields
  every item, then returns), with no pings and no `retry` preamble, so the body
  is exactly the items' encodings one after the other.
- `GET /page/<name>` is a page that opens an `EventSource` on that stream, listens
  to every event name in the corpus and to `onmessage`, collects
  `{type, data, lastEventId, json}` in `window.received`, and closes the
  EventSource when the final `end` event arrives (so it never reconnects).
- `GET /` answers 200 (the readiness probe).

Every corpus ends with `Event(..., event="end")`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse
from starlette.routing import Route

from sseviews import Event, EventStreamView

END = Event("bye ✓", event="end", id="end-id")

# Items are what `events()` yields: `Event`s, or plain values (sent as the data of
# an unnamed event). The order matters: `lastEventId` is carried from event to event.
MAIN: list[Any] = [
    Event("hello", id="1"),
    "a plain str, yielded bare",  # carries lastEventId "1"
    # -- unicode -------------------------------------------------------------------
    Event("漢字かなカナ 한국어 中文 𠜎𠜱", event="cjk"),
    Event("مرحبا بالعالم — שלום עולם \u200fRTL mark\u200e, \u202eoverride\u202c", event="rtl"),
    Event(
        "e\u0301 n\u0303 a\u030a Z\u0335\u0321\u031ba\u0334l\u0337g\u0338o\u0489",
        event="combining",
    ),
    Event("NFC \u00e9 != NFD e\u0301; Hangul \u1100\u1161 vs \uac00"),  # no normalisation
    Event("\ufeffa BOM at the start of the data (not of the stream)"),
    # -- emoji and astral (surrogate-pair) code points --------------------------------
    Event(
        # ZWJ family, ZWJ + skin tone, ZWJ + VS16 flag, regional-indicator flags,
        # a tag-sequence flag (Scotland), VS16 heart, keycap
        "\U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 "
        "\U0001f468\U0001f3fd\u200d\U0001f4bb \U0001f3f3\ufe0f\u200d\U0001f308 "
        "\U0001f1ef\U0001f1f5\U0001f1fa\U0001f1e6 "
        "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f "
        "\u2764\ufe0f 1\ufe0f\u20e3",
        event="🎉 emoji",
    ),
    Event("\U0001f600\U0001d11e\U00020000\U000e0001\U0010fffd", id="😀 astral id"),
    # -- line endings inside data -----------------------------------------------------
    Event("before a lone CR\rafter it"),
    "crlf\r\nline two\r\nline three",  # bare str with CRLF
    Event("lf\nline two\nline three", event="multi line"),
    Event("mixed\r\n\r\r\n\n\rend"),
    Event("a trailing newline\n"),
    Event("a trailing CRLF\r\n"),
    Event("\ra leading CR"),
    Event("\n"),
    Event("\n\n\n"),
    Event("\r\n\r\n"),
    Event("\r"),
    # -- spaces, empty, colons, field look-alikes ---------------------------------------
    Event("  two leading spaces"),
    Event(" "),
    Event("\tleading tab"),
    Event("  indented\n    more\n\ttabbed\n trailing space "),
    Event(""),
    "",  # an empty bare str
    Event(":starts with a colon, is not a comment"),
    Event(": also data\n:second line too\n::"),
    Event("event: x\nid: y\nretry: 5\ndata: nested\n: comment-like\n\n", event="fieldlike"),
    Event("id: injected?"),
    Event("retry: 5"),
    # -- characters that str.splitlines() would split on, and NUL ------------------------
    Event("vt\x0bff\x0cfs\x1cgs\x1drs\x1enel\x85ls\u2028ps\u2029end"),
    Event("nul\x00inside"),
    # -- long data ---------------------------------------------------------------------
    Event("x" * 100_000, event="long ascii"),
    Event("ab€😀" * 25_000, event="long unicode"),  # 100k code points, 225 KB of UTF-8
    Event("\n".join(f"line {i}" for i in range(2000))),
    # -- JSON ------------------------------------------------------------------------------
    Event(
        {
            "名前": "Café ☕",
            "nested": {
                "numbers": [0, 1, -2, 3.5, -0.25, 1e-7, 6.02e23, 2**53],
                "flags": [True, False, None],
                "empty": {"list": [], "dict": {}, "str": ""},
                "emoji": "👩‍💻 🏳️‍🌈",
                "text": 'line1\nline2\r\n"quoted" \\ </script> \t',
                "separators": "\u2028\u2029\x85",
                "rtl": "שלום",
            },
        },
        event="json",
        id="json-1",
    ),
    {"bare": True, "n": 0, "null": None},
    [1, "two", None, True, {"three": [3]}],
    42,
    -3.25,
    False,
    None,  # a bare None is JSON-encoded: "null"
    Event(0),
    Event(False),
    Event([]),
    Event({}),
    # -- bytes -----------------------------------------------------------------------------
    Event("café ✓ 😀 漢字".encode(), event="bytes"),
    b"bare bytes\r\nsecond line\rthird",
    Event(bytearray("bytearray ü".encode())),
    Event(memoryview("memoryview 🧠".encode())),
    # -- event names -------------------------------------------------------------------------
    Event("unicode name", event="ünïcødé-ëvent"),
    Event("CJK name", event="事件"),
    Event("leading spaces in the name", event="  spaced name"),
    Event("colons in the name", event="a:b:c"),
    Event("NUL in the name", event="nul\x00name"),
    Event("explicitly named message", event="message"),
    Event("empty name", event=""),
    # -- ids ---------------------------------------------------------------------------------
    Event("unicode id with spaces", id=" 💥 id with spaces "),
    Event("carries the previous id"),
    Event("int id", id=42),
    Event(id="only-id"),  # no data: not dispatched, but sets lastEventId
    Event("after an id-only message"),
    Event(comment="a comment-only message\ndata: not data\r\nevent: nope\rid: nope"),
    Event(comment=""),
    Event(retry=2500),  # retry-only: not dispatched
    Event("after the comment and retry messages"),
    Event("with everything", event="all", id="all-id", retry=3000, comment="c1\nc2"),
    Event("resets the id", id=""),
    Event("after the reset"),
    Event("id: set again", id="ünï ïd"),
    END,
]

# NaN and Infinity are refused when an Event is built (they are not JSON, and the
# browser's JSON.parse rejects them): see tests/test_events.py and test_views.py.
CORPORA: dict[str, list[Any]] = {"main": MAIN}


def event_names(items: list[Any]) -> list[str]:
    """The names a page must listen to: every `event` field except `message` and empty."""
    names: list[str] = []
    for item in items:
        name = item.event if isinstance(item, Event) else None
        if name and name != "message" and name not in names:
            names.append(name)
    return names


class CorpusView(EventStreamView):
    ping_interval = None  # the body is exactly the corpus, nothing else

    async def on_connect(self) -> None:
        if self.request.path_params["corpus"] not in CORPORA:
            raise HTTPException(404, "no such corpus")

    async def events(self) -> AsyncIterator[Any]:
        for item in CORPORA[self.request.path_params["corpus"]]:
            yield item


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>sseviews encoder corpus: __CORPUS__</title>
<style>
  body { font: 13px/1.35 monospace; margin: 12px; }
  #status { font-weight: bold; }
  li { white-space: pre; overflow: hidden; text-overflow: ellipsis; max-width: 860px; }
  .type { color: #06c; } .id { color: #a50; }
</style>
</head>
<body>
<h1>EventSource corpus "__CORPUS__"</h1>
<p>status: <span id="status">connecting</span></p>
<ol id="events" start="0"></ol>
<script>
const NAMES = __NAMES__;
window.received = [];
window.errors = [];
window.opens = 0;
window.done = false;
const list = document.getElementById("events");
const status = document.getElementById("status");
function record(e) {
  let parsed;
  try {
    parsed = {ok: true, value: JSON.parse(e.data)};
  } catch (err) {
    parsed = {ok: false, error: String(err)};
  }
  window.received.push({type: e.type, data: e.data, lastEventId: e.lastEventId, json: parsed});
  const li = document.createElement("li");
  const preview = JSON.stringify(e.data.length > 70 ? e.data.slice(0, 70) + "…" : e.data);
  li.innerHTML = '<span class="type"></span> <span class="id"></span> <span class="data"></span>';
  li.querySelector(".type").textContent = JSON.stringify(e.type);
  li.querySelector(".id").textContent = "[" + JSON.stringify(e.lastEventId) + "]";
  li.querySelector(".data").textContent =
    preview + (e.data.length > 70 ? " (" + e.data.length + " UTF-16 units)" : "");
  list.appendChild(li);
}
const es = new EventSource("/stream/__CORPUS__");
window.es = es;
es.onopen = () => { window.opens += 1; status.textContent = "open"; };
es.onerror = () => {
  window.errors.push(es.readyState);
  status.textContent = "error (readyState " + es.readyState + ")";
};
es.onmessage = record;
for (const name of NAMES) es.addEventListener(name, record);
es.addEventListener("end", () => {  // after record(): listeners run in order
  es.close();
  window.done = true;
  status.textContent = "done: " + window.received.length + " events";
});
</script>
</body>
</html>
"""


async def page(request: Request) -> HTMLResponse:
    corpus = request.path_params["corpus"]
    if corpus not in CORPORA:
        raise HTTPException(404, "no such corpus")
    # ASCII-only JSON with "<" escaped: safe inside <script>, NUL and all.
    names = json.dumps(event_names(CORPORA[corpus])).replace("<", "\\u003c")
    html = PAGE.replace("__NAMES__", names).replace("__CORPUS__", corpus)
    return HTMLResponse(html)


async def ready(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(
    routes=[
        Route("/", ready),
        Route("/page/{corpus}", page),
        Route("/stream/{corpus}", CorpusView),
    ]
)
