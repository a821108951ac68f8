// The page of the `sseviews typescript` browser test: it imports the generated module
// (compiled by tsc next to this file) and records what each typed handler received.
// Each handler uses its data as its declared type (a string method on text, arithmetic
// on numbers), so data of another type throws instead of being recorded.
import { connect } from "./streams.js";

interface Seen {
  name: string;
  value: unknown;
  type: string;
}

const seen: Seen[] = [];
(window as unknown as { seen: Seen[] }).seen = seen;

function record(name: string, value: string | number): void {
  seen.push({ name, value, type: typeof value });
  const item = document.createElement("li");
  item.textContent = `${name}: ${JSON.stringify(value)}`;
  document.getElementById("log")?.append(item);
}

connect("/events/rooms/{room}", { params: { room: "lobby" }, query: { token: "letmein" } })
  .on("message", (text) => record("message", text.padStart(4, "0")))
  .on("tick", (tick) => record("tick", `${tick.room}:${tick.n + 1}`))
  .on("note", (note) => record("note", note.text.toUpperCase() + (note.author ?? "")))
  .on("presence", (presence) => record("presence", presence.online ? presence.user : "-"))
  .on("state", (state) => record("state", state === "open" ? "is open" : "is closed"))
  .on("count", (count) => record("count", count * 2));
