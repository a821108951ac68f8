// Runs @microsoft/fetch-event-source against one URL and prints what it sees as JSON
// lines: {"type": "open" | "event" | "error" | "closed", ...}.
// Usage: node fetch_event_source_client.mjs <url>
// As its README says, onopen refuses what is not an event stream (a fatal error, no
// retry), and onclose throws so that a stream the server ended is resumed (with
// Last-Event-ID); onerror returning nothing retries after the server's `retry:`.
import { createRequire } from "node:module";

// The package calls window.setTimeout and window.fetch, which Node has on globalThis,
// and document.removeEventListener even with openWhenHidden, which Node lacks.
globalThis.window ??= globalThis;
globalThis.document ??= { addEventListener() {}, removeEventListener() {}, hidden: false };
const require = createRequire(import.meta.url);
const { fetchEventSource } = require("@microsoft/fetch-event-source");

const print = (record) => process.stdout.write(JSON.stringify(record) + "\n");
class Refused extends Error {}
class Ended extends Error {}

await fetchEventSource(process.argv[2], {
  openWhenHidden: true, // no `document` in Node
  async onopen(response) {
    const type = response.headers.get("content-type") ?? "";
    print({ type: "open", status: response.status });
    if (!response.ok || !type.startsWith("text/event-stream")) {
      throw new Refused(`HTTP ${response.status}`);
    }
  },
  onmessage(message) {
    print({
      type: "event",
      event: message.event || "message",
      data: message.data,
      id: message.id,
      retry: message.retry ?? null,
    });
  },
  onclose() {
    throw new Ended("the server ended the stream");
  },
  onerror(error) {
    print({ type: "error", message: String(error) });
    if (error instanceof Refused) {
      throw error; // stops fetchEventSource
    }
  },
}).catch((error) => {
  if (!(error instanceof Refused)) throw error;
});
print({ type: "closed" });
