// Runs the `eventsource` npm package (v4, or v2 installed as `eventsource2`) against one URL
// and prints what it sees as JSON lines: {"type": "open" | "event" | "error" | "closed", ...}.
// Usage: node eventsource_client.mjs <v4|v2> <url> <comma-separated event names>
// It runs until killed, or exits once the EventSource is CLOSED (a refusal).
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const [flavor, url, names] = process.argv.slice(2);
const EventSource =
  flavor === "v2" ? require("eventsource2") : (await import("eventsource")).EventSource;

const print = (record) => process.stdout.write(JSON.stringify(record) + "\n");
const source = new EventSource(url);

source.onopen = () => print({ type: "open" });
source.onerror = (error) => {
  // v4 reports the HTTP status as `code`, v2 as `status`.
  print({ type: "error", status: error.code ?? error.status ?? null });
  // v2 closes the source just after its error event: look once that has run.
  setTimeout(() => {
    if (source.readyState === 2) {
      print({ type: "closed" });
      process.exit(0);
    }
  }, 0);
};
const record = (message) =>
  print({ type: "event", event: message.type, data: message.data, id: message.lastEventId });
source.onmessage = record;
for (const name of names ? names.split(",") : []) {
  source.addEventListener(name, record);
}
