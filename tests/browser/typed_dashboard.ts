// The example dashboard's metrics through the generated module: each handler uses
// the Metrics fields as their declared types (numbers, a nullable number).
import { connect } from "./streams.js";

interface Sample {
  pid: number;
  rss: number;
  cpu: string;
  threads: string;
  streams: number;
}

const samples: Sample[] = [];
(window as unknown as { samples: Sample[] }).samples = samples;

connect("/dashboard/events").on("metrics", (metrics) => {
  samples.push({
    pid: metrics.pid,
    rss: metrics.rss_bytes,
    cpu: metrics.cpu_percent.toFixed(1),
    threads: metrics.threads === null ? "unknown" : metrics.threads.toFixed(0),
    streams: metrics.streams + 0,
  });
});
