"""Scale-out benchmark: what adding processes costs, through Redis and Redis Cluster.

Every server is a real uvicorn subprocess (uvloop + httptools, one worker) on
127.0.0.1, driven by the raw-socket client of ``benchmarks/loadclient.py``
running in this process, with the pieces of ``bench_fanout.py`` (opening
subscribers, parsing what they received, latency statistics, the table).

Cases (side by side, in one run):

a. **Per-user groups** (``apps/scaleout_sseviews.py``) -- ``--users`` (4000)
   subscribers, each streaming its own group ``u:N``, spread evenly over P
   uvicorn processes (user N on process N mod P) for each P of ``--procs``
   (1,2,4,8), all on one ``Broadcast`` URL under a unique prefix. One more
   process of the same app, with no subscribers, publishes ``--rate`` (1000)
   events/s for ``--seconds`` (5) to users drawn at random, on a fixed schedule
   (open loop), through Redis. Measured: the summed CPU time (user + system) of
   the P subscriber processes over the publishing window, divided by the events
   delivered; every event must reach its user's stream exactly once (lost,
   duplicated and misrouted events are counted and reported). Target: at the
   largest P (8), at most 1.3x the figure at P=1.

   Side by side, at each P, the same job runs on the **raw ASGI floor**
   (``apps/scaleout_raw.py``: no Starlette, no sseviews; redis-py's pub/sub
   connection, SUBSCRIBE/UNSUBSCRIBE per user, the publisher's script sends the
   whole SSE message), the least code that does it, so the table can tell what
   adding processes costs on this machine (idle event loops, wake-ups, cores
   shared with Redis and the client) from what it costs sseviews. The floor
   speaks plain Redis only: it is measured on the ``redis`` layer, and its
   column is ``-`` on the others. ``--servers`` picks ``raw``, ``sseviews`` or
   both (the default); the two alternate at each P, in an order rotated from
   run to run.
b. **One group** (``apps/fanout_sseviews.py``, the fan-out benchmark's app) --
   ``--subscribers`` (2000) streams of one group receive ``--events`` (20)
   events published ``--interval-ms`` (20) ms apart: in one process on
   ``memory://``, and in two processes (half the subscribers on each, events
   published through the first) through Redis. p50/p99 latency from each
   event's scheduled publish time. Target: p99 through Redis at most 1.5x memory.
c. **Redis Cluster** -- (a) and (b) again on a 3-shard Redis Cluster, started
   from ``redis-server`` on spare loopback ports (``--cluster start``, the
   default) or reached at ``--cluster redis+cluster://HOST:PORT[,...]/``
   (sharded pub/sub: each process holds one pub/sub connection per master).
d. **PostgreSQL only** -- (a) and (b) again with ``postgresql+asyncpg://`` as the
   live layer and the history (LISTEN/NOTIFY on a channel per group; each run's
   tables are dropped afterwards). Target for (b), from issue #18: p99 at most
   2x memory.

Every server process's connections to the live layer (established TCP connections to a
Redis node's or PostgreSQL's port, from psutil) are counted while it serves its subscribers.

Every measurement runs ``--runs`` times (fresh servers and a fresh prefix each
time; the order of the P values and of the layers rotated from run to run), and
the medians are reported as a markdown table with the same columns as the other
benchmarks (``report.py --scaleout`` joins its rows into the README's table; the
floor's figures of case (a) in the raw ASGI column, with (info) rows for its
ratio at the largest P to P=1 and for sseviews' ratio to it there),
followed by a detail table per case (case (a): a line per layer, P and server,
with each server's ratio to its own P=1 and sseviews' ratio to the floor), and
written with every per-run figure to ``benchmarks/results/scaleout-<timestamp>.json``.

Usage (from anywhere; paths are resolved from this file)::

    python benchmarks/bench_scaleout.py                  # full size, 3 runs
    python benchmarks/bench_scaleout.py --quick          # smoke test
    python benchmarks/bench_scaleout.py --runs 1 --cases per-user --procs 1,8
    python benchmarks/bench_scaleout.py --cases per-user --layers redis --servers raw
    python benchmarks/bench_scaleout.py --layers cluster --cluster redis+cluster://127.0.0.1:7000/
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import psutil

sys.dont_write_bytecode = True  # keep __pycache__ out of the work tree

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from benchmarks import bench_fanout as fanout  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.bench_fanout import (  # noqa: E402
    CaseResults,
    RecordingStream,
    Row,
    client_gc_paused,
    close_all,
    get_json,
    latency_summary,
    message_fields,
    open_subscribers,
    split_events,
    wait_subscribers,
)
from benchmarks.harness import HOST, BenchError, ServerSpec, UvicornServer  # noqa: E402
from benchmarks.loadclient import run  # noqa: E402

#: Case (a)'s servers: the raw ASGI floor and sseviews, measured side by side.
PER_USER_SPECS = {
    "raw": ServerSpec("scaleout-raw", "raw ASGI per-user", "benchmarks.apps.scaleout_raw:app"),
    "sseviews": ServerSpec(
        "scaleout", "sseviews per-user", "benchmarks.apps.scaleout_sseviews:app"
    ),
}
SERVERS = tuple(PER_USER_SPECS)
#: The layers the raw floor runs on: it speaks plain Redis pub/sub only.
RAW_LAYERS = ("redis",)
ONE_GROUP_SPEC = ServerSpec("one-group", "sseviews one group", fanout.SSEVIEWS_APP)
CASES = ("per-user", "one-group")
LAYERS = ("redis", "cluster", "postgres")
#: The PostgreSQL-only layer's URL (LISTEN/NOTIFY live, the history in the same database).
POSTGRES_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
CLUSTER_SHARDS = 3
# What the cluster's URL looks like, to ask sseviews whether it takes such URLs
# before a cluster is started for nothing.
CLUSTER_PROBE_URL = "redis+cluster://127.0.0.1:7000/"

DELIVERY_GRACE = 15.0  # after the publishing schedule, for the last events to arrive
WARMUP_TIMEOUT = 30.0
POLL_SECONDS = 0.02
DUPLICATE_WAIT = 0.2  # after the last expected event: anything extra shows up now


@dataclass(frozen=True)
class Sizes:
    runs: int
    users: int  # (a): subscribers, one group each
    procs: tuple[int, ...]  # (a): process counts
    rate: float  # (a): events/s
    seconds: float  # (a): publishing window
    warmup_events: int  # (a): published (and received) before the window
    batch: int  # subscribers connected concurrently
    subscribers: int  # (b): subscribers of the one group, in total
    events: int  # (b)
    interval_ms: float  # (b)
    settle_seconds: float


FULL = Sizes(
    runs=3,
    users=4000,
    procs=(1, 2, 4, 8),
    rate=1000.0,
    seconds=5.0,
    warmup_events=500,
    batch=200,
    subscribers=2000,
    events=20,
    interval_ms=20.0,
    settle_seconds=1.0,
)
QUICK = replace(
    FULL,
    runs=1,
    users=400,
    procs=(1, 2),
    seconds=1.0,
    warmup_events=100,
    batch=100,
    subscribers=200,
    settle_seconds=0.3,
)


# -- Redis layers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """A live layer the servers share (a Redis topology, or PostgreSQL): its Broadcast
    URL and its nodes."""

    key: str  # "redis", "cluster" or "postgres"
    label: str
    url: str  # the Broadcast URL
    nodes: tuple[tuple[str, int], ...]  # (host, port) of every node

    @property
    def node_urls(self) -> list[str]:
        scheme = "rediss" if urlsplit(self.url).scheme.startswith("rediss") else "redis"
        return [f"{scheme}://{host}:{port}/0" for host, port in self.nodes]

    @property
    def ports(self) -> frozenset[int]:
        return frozenset(port for _, port in self.nodes)

    def prefix_for(self, prefix: str) -> str:
        """The Broadcast prefix of a run: PostgreSQL names tables after it, which
        takes letters, digits and underscores, at most 40 characters."""
        if self.key != "postgres":
            return prefix
        return "sb_" + hashlib.sha1(prefix.encode()).hexdigest()[:16]

    def delete_keys(self, prefix: str) -> None:
        if self.key == "postgres":
            drop_postgres_tables(self.url, self.prefix_for(prefix))
            return
        for url in self.node_urls:
            fanout.delete_redis_keys(prefix, url)


def drop_postgres_tables(url: str, prefix: str) -> None:
    """Drop the tables of the run whose prefix is ``prefix`` (history, payloads, presence)."""

    async def drop() -> None:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
        try:
            names = await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE $1", prefix + "%"
            )
            for (name,) in names:
                await conn.execute(f'DROP TABLE IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


def postgres_layer(url: str) -> Layer:
    parts = urlsplit(url)
    return Layer(
        "postgres",
        "PostgreSQL (LISTEN/NOTIFY)",
        url,
        ((parts.hostname or HOST, parts.port or 5432),),
    )


def postgres_unavailable(url: str) -> str | None:
    async def check() -> None:
        conn = await asyncpg.connect(
            url.replace("postgresql+asyncpg://", "postgresql://", 1), timeout=5
        )
        await conn.close()

    try:
        asyncio.run(check())
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"PostgreSQL at {url} unavailable: {type(exc).__name__}: {exc}"
    return None


def redis_layer(url: str) -> Layer:
    parts = urlsplit(url)
    return Layer("redis", "Redis", url, ((parts.hostname or HOST, parts.port or 6379),))


def cluster_nodes(seeds: Sequence[tuple[str, int]]) -> tuple[tuple[tuple[str, int], ...], int]:
    """Every node of the cluster that the first reachable seed knows, and how many are masters."""
    errors = []
    for host, port in seeds:
        client = fanout.redis_client(f"redis://{host}:{port}/0")
        try:
            text = client.execute_command("CLUSTER", "NODES")
        except Exception as exc:
            errors.append(f"{host}:{port}: {type(exc).__name__}: {exc}")
            continue
        finally:
            client.close()
        if isinstance(text, bytes):
            text = text.decode()
        nodes, masters = [], 0
        for line in str(text).splitlines():
            fields = line.split()
            address = fields[1].split("@")[0]  # "host:port@bus[,hostname]"
            node_host, _, node_port = address.rpartition(":")
            nodes.append((node_host or host, int(node_port)))
            masters += "master" in fields[2].split(",")
        return tuple(sorted(nodes)), masters
    raise BenchError("no seed of the cluster answered CLUSTER NODES: " + "; ".join(errors))


def cluster_layer(url: str) -> Layer:
    """The layer of ``redis+cluster://HOST:PORT[,HOST:PORT...]/``."""
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    seeds = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":")
        seeds.append((host or HOST, int(port or 6379)))
    nodes, masters = cluster_nodes(seeds)
    return Layer("cluster", f"Redis Cluster ({masters} shards)", url, nodes)


def _spare_cluster_port() -> int:
    """A loopback port that is free, and so is its cluster bus port (+10000)."""
    for _ in range(200):
        port = random.randrange(20000, 30000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind((HOST, candidate))
        except OSError:
            continue
        return port
    raise BenchError("no spare port pair for a cluster node")


@contextmanager
def local_cluster(shards: int, work_dir: Path) -> Iterator[str]:
    """``shards`` redis-server masters in cluster mode on loopback; yields the URL.

    No replicas and no persistence; the servers are killed on exit.
    """
    processes: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    try:
        for _ in range(shards):
            port = _spare_cluster_port()
            command = [
                "redis-server", "--port", str(port), "--bind", HOST,
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--dir", str(work_dir), "--save", "", "--appendonly", "no",
            ]  # fmt: skip
            with open(work_dir / f"redis-{port}.log", "ab") as log:
                processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
            ports.append(port)
        for port, process in zip(ports, processes, strict=True):
            _wait_redis(port, process)
        addresses = [f"{HOST}:{port}" for port in ports]
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0",
             "--cluster-yes"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if created.returncode != 0:
            raise BenchError(f"redis-cli --cluster create failed: {created.stdout[-500:]}")
        _wait_cluster_ok(ports)
        yield f"redis+cluster://{','.join(addresses)}/"
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait(10)


def _wait_redis(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while fanout.redis_unavailable(f"redis://{HOST}:{port}/0") is not None:
        if process.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"redis-server on port {port} did not start")
        time.sleep(0.05)


def _wait_cluster_ok(ports: Sequence[int]) -> None:
    deadline = time.monotonic() + 30
    for port in ports:
        client = fanout.redis_client(f"redis://{HOST}:{port}/0")
        try:
            while client.cluster("info").get("cluster_state") != "ok":
                if time.monotonic() > deadline:
                    raise BenchError(f"the cluster node on port {port} never reported state ok")
                time.sleep(0.1)
        finally:
            client.close()


def layer_unavailable(layer_key: str, url: str, env: dict[str, str]) -> str | None:
    """Why ``url`` cannot serve as the ``layer_key`` layer here, or None."""
    if layer_key == "postgres":
        return harness.probe("import sseviews.backends.postgres", env) or postgres_unavailable(url)
    reason = harness.probe("import sseviews.backends.redis", env)
    if reason is not None:
        return reason
    if layer_key == "redis":
        return fanout.redis_unavailable(url)
    # The Broadcast constructor takes the URL apart and picks a backend by its
    # scheme; it does not connect, so the cluster need not be running yet.
    reason = harness.probe(
        f"from sseviews import Broadcast; Broadcast({url!r}, prefix='sseviews-bench-probe')", env
    )
    if reason is None:
        return None
    scheme = urlsplit(url).scheme
    return f"this sseviews does not accept {scheme}:// URLs ({reason})"


def redis_connections(pid: int, ports: frozenset[int]) -> int:
    """Established TCP connections of process ``pid`` to any of ``ports``."""
    return sum(
        1
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port in ports and conn.status == psutil.CONN_ESTABLISHED
    )


def _connection_figures(
    servers: Sequence[UvicornServer], ports: frozenset[int]
) -> dict[str, float]:
    counts = [redis_connections(fanout.server_pid(server), ports) for server in servers]
    values = {f"redis_connections_process{index}": float(n) for index, n in enumerate(counts)}
    values["redis_connections_min"] = float(min(counts))
    values["redis_connections_max"] = float(max(counts))
    return values


# -- case (a): per-user groups ---------------------------------------------------------------


def _user_path(server_index: int, processes: int) -> Callable[[int], str]:
    return lambda index: f"/user?u={server_index + index * processes}"


async def _wait_delivered(streams: list[RecordingStream], total: int, time_limit: float) -> bool:
    """Wait until the streams together received ``total`` events; False at ``time_limit``."""
    deadline = time.monotonic() + time_limit
    while sum(stream.events for stream in streams) < total:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL_SECONDS)
    return True


def _forget_received(streams: list[RecordingStream]) -> None:
    for stream in streams:
        recorder = stream.recorder
        recorder.pieces.clear()
        recorder.events = 0
        recorder.body_bytes = 0


def tally(
    streams: list[RecordingStream], users: list[int], expected: int
) -> tuple[dict[str, float], list[tuple[int, float, float]]]:
    """Check every stream's events against its user; count and collect them.

    Returns the counts (delivered, lost, duplicated, misrouted, out of order) and
    ``(index, publish time, arrival)`` of every delivery.
    """
    received: Counter[int] = Counter()
    misrouted = out_of_order = 0
    samples: list[tuple[int, float, float]] = []
    for user, stream in zip(users, streams, strict=True):
        previous = -1
        for arrival, message in split_events(stream.recorder.pieces):
            _, data = message_fields(message)
            index = data["i"]
            misrouted += data["u"] != user
            out_of_order += index <= previous
            previous = index
            received[index] += 1
            samples.append((index, data["t"], arrival))
    delivered = sum(received.values())
    unique = sum(1 for index in received if 0 <= index < expected)
    counts = {
        "delivered": float(delivered),
        "lost": float(expected - unique),
        "duplicated": float(delivered - unique),
        "misrouted": float(misrouted),
        "out_of_order": float(out_of_order),
    }
    return counts, samples


async def measure_per_user(
    servers: list[UvicornServer], publisher: UvicornServer, sizes: Sizes, ports: frozenset[int]
) -> dict[str, float]:
    """Case (a): open every user's stream, publish to random users, measure server CPU."""
    processes = len(servers)
    users_of = [list(range(k, sizes.users, processes)) for k in range(processes)]
    interval = 1.0 / sizes.rate
    n = round(sizes.rate * sizes.seconds)
    streams: list[RecordingStream] = []
    users: list[int] = []
    try:
        for k, server in enumerate(servers):
            streams += await open_subscribers(
                server.port, len(users_of[k]), sizes.batch, 0, None, _user_path(k, processes)
            )
            users += users_of[k]
        for k, server in enumerate(servers):
            await wait_subscribers(server.port, len(users_of[k]))

        # Warm-up: the same traffic for a moment, then forget what arrived.
        await get_json(publisher.port, f"/start?n={sizes.warmup_events}&interval={interval}")
        if not await _wait_delivered(streams, sizes.warmup_events, WARMUP_TIMEOUT):
            got = sum(stream.events for stream in streams)
            raise BenchError(f"warm-up: {got} of {sizes.warmup_events} events arrived")
        await wait_subscribers(publisher.port, 0)  # its publisher task is done
        await asyncio.sleep(DUPLICATE_WAIT)
        _forget_received(streams)

        # What the servers use with no traffic (timers, heartbeats), for reference.
        load_before = os.getloadavg()[0]
        idle_before = sum(server.cpu_seconds() for server in servers)
        await asyncio.sleep(sizes.settle_seconds)
        idle_cpu = sum(server.cpu_seconds() for server in servers) - idle_before

        pids = [os.getpid()] + [fanout.server_pid(server) for server in servers]
        waits_before = [fanout.run_queue_wait(pid) for pid in pids]
        cpu_before = [server.cpu_seconds() for server in servers]
        publisher_cpu = publisher.cpu_seconds()
        with client_gc_paused():
            t_start = time.time()
            await get_json(publisher.port, f"/start?n={n}&interval={interval}")
            await _wait_delivered(streams, n, sizes.seconds + DELIVERY_GRACE)
            cpu = [s.cpu_seconds() - c for s, c in zip(servers, cpu_before, strict=True)]
            publisher_cpu = publisher.cpu_seconds() - publisher_cpu
            t_end = time.time()
        waits = [fanout.run_queue_wait(pid) - w for pid, w in zip(pids, waits_before, strict=True)]
        connections = _connection_figures(servers, ports)
        publisher_connections = _connection_figures([publisher], ports)["redis_connections_max"]
        await asyncio.sleep(DUPLICATE_WAIT)
        stats = await get_json(publisher.port, "/stats")
        for server in (*servers, publisher):
            server.check_alive()
        if stats.get("publish_error"):
            raise BenchError(f"the publisher failed: {stats['publish_error']}")
        counts, samples = tally(streams, users, n)
    finally:
        close_all(streams)

    t0 = stats.get("schedule_start")
    if t0 is None:
        raise BenchError("the publisher did not report its schedule start")
    window = t_end - t_start
    distinct_delivered = max(counts["delivered"] - counts["duplicated"], 1.0)
    values = {
        "server_cpu_us_per_event": sum(cpu) / distinct_delivered * 1e6,
        "server_cpu_cores": sum(cpu) / window,
        **{f"server_cpu_ms_process{k}": seconds * 1e3 for k, seconds in enumerate(cpu)},
        "idle_server_cpu_ms_per_s": idle_cpu / sizes.settle_seconds * 1e3,
        **counts,
        "window_seconds": window,
    }
    if samples:
        from_schedule = latency_summary([arrival - t0 - i * interval for i, _, arrival in samples])
        values["p50_ms_from_schedule"] = from_schedule["p50_ms"]
        values["p99_ms_from_schedule"] = from_schedule["p99_ms"]
        values["max_ms_from_schedule"] = from_schedule["max_ms"]
        lags = [published - t0 - i * interval for i, published, _ in samples]
        values["publish_lag_max_ms"] = max(lags) * 1e3
    values.update(connections)
    values["publisher_redis_connections"] = publisher_connections
    values["publisher_cpu_us_per_event"] = publisher_cpu / n * 1e6
    values["client_run_queue_wait_ms"] = waits[0] * 1e3
    values["server_run_queue_wait_ms"] = sum(waits[1:]) * 1e3
    values["loadavg_1min_before"] = load_before
    return values


# -- orchestration -----------------------------------------------------------------------------


def per_user_key(layer: str, processes: int, server: str = "sseviews") -> str:
    """The result key of case (a) (sseviews' keys are those of results without the floor)."""
    if server == "sseviews":
        return f"per-user-{layer}-p{processes}"
    return f"per-user-{server}-{layer}-p{processes}"


def per_user_servers(layer: str, servers: Sequence[str]) -> list[str]:
    """The servers of ``servers`` that case (a) runs on ``layer``."""
    return [server for server in servers if server != "raw" or layer in RAW_LAYERS]


def one_group_key(layer: str) -> str:
    return f"one-group-{layer}"


class Runner:
    def __init__(
        self, sizes: Sizes, log_dir: Path, prefix: str, results: dict[str, CaseResults]
    ) -> None:
        self.sizes = sizes
        self.log_dir = log_dir
        self.prefix = prefix
        self.results = results

    def _env(self, url: str, prefix: str) -> dict[str, str]:
        return harness.child_env(
            FANOUT_BROADCAST_URL=url, FANOUT_PREFIX=prefix, SCALEOUT_USERS=str(self.sizes.users)
        )

    def per_user(self, layer: Layer, processes: int, run_index: int, server: str) -> None:
        sizes = self.sizes
        spec = PER_USER_SPECS[server]
        prefix = f"{self.prefix}-r{run_index}-{layer.key}-p{processes}-{server}"
        env = self._env(layer.url, layer.prefix_for(prefix))

        def body() -> dict[str, float]:
            with ExitStack() as stack:
                servers = [UvicornServer(spec, env, self.log_dir) for _ in range(processes + 1)]
                harness.start_all(stack, servers)
                *subscribers, publisher = servers
                return run(measure_per_user(subscribers, publisher, sizes, layer.ports))

        what = (
            f"{spec.label}: {sizes.users} subscribers over {processes} process(es), "
            f"{sizes.rate:g} events/s for {sizes.seconds:g} s through {layer.label}"
        )
        try:
            harness.attempt(
                self.results[per_user_key(layer.key, processes, server)],
                what,
                run_index,
                sizes.runs,
                body,
            )
        finally:
            layer.delete_keys(prefix)

    def one_group(self, layer: Layer | None, run_index: int) -> None:
        """Case (b): on memory:// in one process (``layer`` None), or over two on ``layer``."""
        sizes = self.sizes
        fanout_sizes = fanout.Sizes(
            runs=sizes.runs,
            subscribers=sizes.subscribers,
            events=sizes.events,
            interval_ms=sizes.interval_ms,
            batch=sizes.batch,
            redis_subscribers=sizes.subscribers // 2,
            replay_events=0,
            replay_warmup=0,
            settle_seconds=sizes.settle_seconds,
        )
        key = one_group_key("memory" if layer is None else layer.key)
        prefix = f"{self.prefix}-r{run_index}-{key}"
        if layer is None:
            env = self._env("memory://", prefix)
        else:
            env = self._env(layer.url, layer.prefix_for(prefix))
        counts = [sizes.subscribers] if layer is None else [sizes.subscribers // 2] * 2

        def body() -> dict[str, float]:
            with ExitStack() as stack:
                servers = [UvicornServer(ONE_GROUP_SPEC, env, self.log_dir) for _ in counts]
                harness.start_all(stack, servers)
                values = run(fanout.measure_fanout(servers, counts, fanout_sizes))
                if layer is not None:
                    values.update(_connection_figures(servers, layer.ports))
                return values

        where = "memory:// in 1 process" if layer is None else f"2 processes on {layer.label}"
        what = f"one group, {sizes.subscribers} subscribers x {sizes.events} events, {where}"
        try:
            harness.attempt(self.results[key], what, run_index, sizes.runs, body)
        finally:
            if layer is not None:
                layer.delete_keys(prefix)


def run_benchmark(
    cases: Sequence[str],
    layers: Sequence[Layer],
    sizes: Sizes,
    runner: Runner,
    servers: Sequence[str] = SERVERS,
) -> None:
    for run_index in range(sizes.runs):
        if "per-user" in cases:
            for layer in harness.rotated(layers, run_index):
                for processes in harness.rotated(sizes.procs, run_index):
                    # The floor and sseviews one after the other at each P, so both
                    # see the same machine.
                    for server in harness.rotated(per_user_servers(layer.key, servers), run_index):
                        runner.per_user(layer, processes, run_index, server)
        if "one-group" in cases:
            for layer_or_memory in harness.rotated([None, *layers], run_index):
                runner.one_group(layer_or_memory, run_index)


# -- reporting ---------------------------------------------------------------------------------


def _ours(key: str) -> tuple[None, None, None, str]:
    return (None, None, None, key)


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "es" if noun.endswith("s") else "s")


def rows(
    sizes: Sizes, layers: Sequence[tuple[str, str]], servers: Sequence[str] = SERVERS
) -> list[Row]:
    """The table's rows for ``layers`` (key, label) that ran, with case (a) on ``servers``.

    Case (a)'s rows show the raw ASGI floor in the raw column (``-`` on a layer
    it does not run on) and sseviews in its own; the ratio to P=1 and the target
    are sseviews' (the floor's when sseviews did not run). Two (info) rows per
    layer give the floor's ratio at the largest P and sseviews' ratio to it there.
    """
    table: list[Row] = []
    base, top = min(sizes.procs), max(sizes.procs)
    metric = "server_cpu_us_per_event"
    for layer, label in layers:
        ran = per_user_servers(layer, servers)
        if not ran:
            continue
        ours = "sseviews" in ran

        def cell(
            processes: int, server: str, layer: str = layer, ran: list[str] = ran
        ) -> str | None:
            return per_user_key(layer, processes, server) if server in ran else None

        ratio_of = "sseviews" if ours else "raw"
        for processes in sizes.procs:
            this, first = (
                per_user_key(layer, processes, ratio_of),
                per_user_key(layer, base, ratio_of),
            )
            table.append(
                Row(
                    f"per-user groups through {label}, {sizes.users:,} subscribers over "
                    f"{_plural(processes, 'process')}, {sizes.rate:,.0f} events/s to random "
                    "users, server CPU per delivered event, us",
                    metric,
                    (cell(processes, "raw"), None, None, cell(processes, "sseviews")),
                    1,
                    None if processes == base else (this, first, metric),
                    f"P={base}",
                    1.3 if ours and processes == top and top > base else None,
                    headline=processes == base,
                )
            )
        raw_top, raw_base, ours_top = cell(top, "raw"), cell(base, "raw"), cell(top, "sseviews")
        if raw_top is not None and raw_base is not None and top > base:
            table.append(
                Row(f"(info) per-user groups through {label}, raw ASGI floor, server CPU per "
                    f"delivered event at P={top}, us", metric, (raw_top, None, None, None), 1,
                    (raw_top, raw_base, metric), f"P={base}")
            )  # fmt: skip
        if raw_top is not None and ours_top is not None:
            table.append(
                Row(f"(info) per-user groups through {label}, sseviews over the raw ASGI floor "
                    f"at P={top}, server CPU per delivered event, us", metric,
                    (raw_top, None, None, ours_top), 1, (ours_top, raw_top, metric), "raw")
            )  # fmt: skip
    half = sizes.subscribers // 2
    group = f"one group, {sizes.subscribers:,} subscribers"
    memory = one_group_key("memory")
    table.append(
        Row(f"{group}, memory:// in 1 process, p99 from the scheduled publish time, ms",
            "p99_ms_from_schedule", _ours(memory), 1, headline=True)
    )  # fmt: skip
    for layer, label in layers:
        key = one_group_key(layer)
        table.append(
            Row(f"{group} through {label}, 2 processes x {half:,}, p99 from the scheduled "
                "publish time, ms", "p99_ms_from_schedule", _ours(key), 1,
                (key, memory, "p99_ms_from_schedule"), "memory",
                2.0 if layer == "postgres" else 1.5)
        )  # fmt: skip
    for layer, label in [("memory", "memory://"), *layers]:
        key = one_group_key(layer)
        table.append(
            Row(f"(info) {group}, {label}, p50 from the scheduled publish time, ms",
                "p50_ms_from_schedule", _ours(key), 1,
                None if layer == "memory" else (key, memory, "p50_ms_from_schedule"), "memory")
        )  # fmt: skip
    return table


def _median(results: dict[str, CaseResults], key: str, metric: str) -> float | None:
    return results[key].median(metric) if key in results else None


def _sum(results: dict[str, CaseResults], key: str, metric: str) -> float | None:
    if key not in results or not results[key].runs.get(metric):
        return None
    return sum(results[key].runs[metric])


def _pair(first: float | None, second: float | None, decimals: int) -> str:
    return f"{harness.fmt(first, decimals)} / {harness.fmt(second, decimals)}"


def _connections(results: dict[str, CaseResults], key: str) -> str:
    low = _median(results, key, "redis_connections_min")
    high = _median(results, key, "redis_connections_max")
    if low is None or high is None:
        return "-"
    return f"{low:g}" if low == high else f"{low:g} to {high:g}"


def detail_tables(
    results: dict[str, CaseResults],
    sizes: Sizes,
    layers: Sequence[tuple[str, str]],
    servers: Sequence[str] = SERVERS,
) -> str:
    """Per-P and per-layer figures that do not fit the shared columns (medians; counts summed).

    Case (a) has a line per layer, P and server: "vs P=1" compares a server with
    itself at the smallest P, "sseviews / raw" sseviews with the raw ASGI floor
    at the same P.
    """
    metric = "server_cpu_us_per_event"
    lines = [
        f"Per-user groups: {sizes.users:,} subscribers, {sizes.rate:,.0f} events/s for "
        f"{sizes.seconds:g} s to random users (medians; event counts summed over the runs)."
        + (
            " The raw ASGI floor (`apps/scaleout_raw.py`) runs on the plain Redis layer only."
            if "raw" in servers
            else ""
        ),
        "",
        "| layer | processes | server | server CPU per delivered event, us | vs P="
        f"{min(sizes.procs)} | sseviews / raw | server CPU, cores | p50 / p99 from schedule, ms "
        "| servers idle, CPU ms/s | publisher behind schedule, most, ms "
        "| delivered / lost / duplicated / misrouted / out of order "
        "| connections to the live layer per server process (publisher) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layer, label in layers:
        for processes in sizes.procs:
            raw = _median(results, per_user_key(layer, processes, "raw"), metric)
            for server in per_user_servers(layer, servers):
                key = per_user_key(layer, processes, server)
                if key not in results:
                    continue
                base = _median(results, per_user_key(layer, min(sizes.procs), server), metric)
                cpu = _median(results, key, metric)
                over_raw = cpu / raw if server == "sseviews" and cpu is not None and raw else None
                counts = " / ".join(
                    harness.fmt(_sum(results, key, name), 0)
                    for name in ("delivered", "lost", "duplicated", "misrouted", "out_of_order")
                )
                publisher = _median(results, key, "publisher_redis_connections")
                cells = [
                    label,
                    str(processes),
                    "raw ASGI" if server == "raw" else server,
                    harness.fmt(cpu, 1),
                    harness.fmt_ratio(cpu / base if cpu is not None and base else None),
                    "" if over_raw is None else harness.fmt_ratio(over_raw),
                    harness.fmt(_median(results, key, "server_cpu_cores"), 3),
                    _pair(
                        _median(results, key, "p50_ms_from_schedule"),
                        _median(results, key, "p99_ms_from_schedule"),
                        1,
                    ),
                    harness.fmt(_median(results, key, "idle_server_cpu_ms_per_s"), 1),
                    harness.fmt(_median(results, key, "publish_lag_max_ms"), 1),
                    counts,
                    f"{_connections(results, key)} ({harness.fmt(publisher, 0)})",
                ]
                lines.append(harness.table_row(cells))
    lines += [
        "",
        f"One group: {sizes.subscribers:,} subscribers, {sizes.events} events "
        f"{sizes.interval_ms:g} ms apart (medians).",
        "",
        "| layer | processes | p50 / p99 from schedule, ms | p50 / p99 publish-to-client, ms "
        "| server CPU per delivery, us | connections to the live layer per server process |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for layer, label in [("memory", "memory://"), *layers]:
        key = one_group_key(layer)
        if key not in results:
            continue
        lines.append(
            harness.table_row(
                [
                    label,
                    "1" if layer == "memory" else "2",
                    _pair(
                        _median(results, key, "p50_ms_from_schedule"),
                        _median(results, key, "p99_ms_from_schedule"),
                        1,
                    ),
                    _pair(_median(results, key, "p50_ms"), _median(results, key, "p99_ms"), 1),
                    harness.fmt(_median(results, key, "server_cpu_us_per_delivery"), 2),
                    _connections(results, key),
                ]
            )
        )
    return "\n".join(lines)


def loss_note(results: dict[str, CaseResults]) -> str | None:
    """A warning if any per-user run lost, duplicated, misrouted or reordered an event."""
    bad = []
    for key, outcome in results.items():
        for name in ("lost", "duplicated", "misrouted", "out_of_order"):
            total = sum(outcome.runs.get(name, []))
            if total:
                bad.append(f"{key}: {total:g} {name.replace('_', ' ')}")
    if not bad:
        return None
    return "EVENTS NOT DELIVERED EXACTLY ONCE, in order: " + "; ".join(bad) + "."


# -- command line ------------------------------------------------------------------------------


def _procs(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(item) for item in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2,4,8, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"process counts must be >= 1, got {text!r}")
    return values


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = harness.new_parser(
        "Scale-out benchmark: per-user groups over 1..8 processes (server CPU per delivered "
        "event) and one group over 2 processes (latency), through Redis and Redis Cluster.",
        f"repetitions (default {FULL.runs}; --quick: {QUICK.runs})",
    )
    parser.add_argument("--cases", help="comma-separated subset of: " + ",".join(CASES))
    parser.add_argument(
        "--layers", help="comma-separated subset of: " + ",".join(LAYERS) + " (default all)"
    )
    parser.add_argument(
        "--servers",
        help="(a) comma-separated subset of: " + ",".join(SERVERS) + " (default both; the raw "
        "ASGI floor runs on the " + ",".join(RAW_LAYERS) + " layer only)",
    )
    parser.add_argument("--procs", type=_procs, help="(a) process counts, e.g. 1,2,4,8")
    parser.add_argument("--users", type=int, help="(a) subscribers, each in its own group")
    parser.add_argument("--rate", type=float, help="(a) events/s published to random users")
    parser.add_argument("--seconds", type=float, help="(a) publishing window, s")
    parser.add_argument("--warmup-events", type=int, help="(a) events published before it")
    parser.add_argument("--subscribers", type=int, help="(b) subscribers of the one group")
    parser.add_argument("--events", type=int, help="(b) events published")
    parser.add_argument("--interval-ms", type=float, help="(b) ms between two events")
    parser.add_argument("--batch", type=int, help="subscribers connected concurrently")
    parser.add_argument(
        "--redis", default=fanout.REDIS_URL, help=f"the plain Redis (default {fanout.REDIS_URL})"
    )
    parser.add_argument(
        "--cluster",
        default="start",
        help="'start' (default): a 3-shard cluster from redis-server on spare loopback "
        "ports; or the Broadcast URL of a running one, redis+cluster://HOST:PORT[,...]/",
    )
    parser.add_argument(
        "--postgres",
        default=POSTGRES_URL,
        help=f"the PostgreSQL layer's URL (default {POSTGRES_URL})",
    )
    harness.add_output_argument(parser, "scaleout")
    return parser.parse_args(argv)


def _split(text: str | None, allowed: Sequence[str], what: str) -> list[str]:
    chosen = text.split(",") if text else list(allowed)
    unknown = [item for item in chosen if item not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}: expected some of {','.join(allowed)}")
    return chosen


def open_layers(
    keys: Sequence[str], args: argparse.Namespace, work_dir: Path, stack: ExitStack, explicit: bool
) -> tuple[list[Layer], dict[str, str]]:
    """The usable layers of ``keys`` (a local cluster started on ``stack``), and why not the rest.

    A layer named on the command line (``explicit``) that cannot be used ends the program.
    """
    env = harness.child_env()
    layers: list[Layer] = []
    skipped: dict[str, str] = {}
    for key in keys:
        url = {"redis": args.redis, "cluster": args.cluster, "postgres": args.postgres}[key]
        reason = layer_unavailable(key, CLUSTER_PROBE_URL if url == "start" else url, env)
        if reason is None and key == "cluster":
            try:
                if url == "start":
                    cluster_dir = work_dir / "cluster"
                    cluster_dir.mkdir()
                    url = stack.enter_context(local_cluster(CLUSTER_SHARDS, cluster_dir))
                layers.append(cluster_layer(url))
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                reason = f"no cluster: {exc}"
        elif reason is None:
            layers.append(postgres_layer(url) if key == "postgres" else redis_layer(url))
        if reason is not None:
            skipped[key] = reason
            if explicit:
                raise SystemExit(f"layer {key} requested but unavailable: {reason}")
            harness.say(f"skipping the {key} layer: {reason}")
    return layers, skipped


def new_results(
    cases: Sequence[str], layers: Sequence[Layer], sizes: Sizes, servers: Sequence[str] = SERVERS
) -> dict[str, CaseResults]:
    """An empty result per measurement to take, in the order of the table."""
    results: dict[str, CaseResults] = {}
    for layer in layers:
        if "per-user" in cases:
            for processes in sizes.procs:
                for server in per_user_servers(layer.key, servers):
                    name = "" if server == "sseviews" else f" ({PER_USER_SPECS[server].label})"
                    results[per_user_key(layer.key, processes, server)] = CaseResults(
                        f"per-user, {layer.label}, P={processes}{name}"
                    )
        if "one-group" in cases:
            results[one_group_key(layer.key)] = CaseResults(f"one group, {layer.label}")
    if "one-group" in cases:
        results[one_group_key("memory")] = CaseResults("one group, memory://")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    names = ("runs", "procs", "users", "rate", "seconds", "warmup_events", "subscribers",
             "events", "interval_ms", "batch")  # fmt: skip
    sizes = harness.sizes_from_args(args, FULL, QUICK, names)
    if (
        min(sizes.runs, sizes.users, sizes.warmup_events, sizes.batch, sizes.events) < 1
        or sizes.subscribers < 2
        or min(sizes.rate, sizes.seconds) <= 0
        or sizes.interval_ms < 0
    ):
        raise SystemExit("sizes and --runs must be >= 1 (--subscribers >= 2), --rate and "
                         "--seconds > 0, --interval-ms >= 0")  # fmt: skip
    cases = _split(args.cases, CASES, "case(s)")
    servers = _split(args.servers, SERVERS, "server(s)")
    layer_keys = _split(args.layers, LAYERS, "layer(s)")
    explicit = args.layers is not None
    needed = max(sizes.users, sizes.subscribers) + 500
    harness.ensure_nofile(needed, f"{needed} sockets")

    started = dt.datetime.now()
    prefix = f"sseviews-bench-scaleout-{harness.timestamp(started)}-{os.getpid()}"
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as tmp, ExitStack() as stack:
        layers, skipped = open_layers(layer_keys, args, Path(tmp), stack, explicit)
        results = new_results(cases, layers, sizes, servers)
        runner = Runner(sizes, Path(tmp), prefix, results)
        try:
            run_benchmark(cases, layers, sizes, runner, servers)
        finally:
            for layer in layers:
                layer.delete_keys(prefix)

    ran = [(layer.key, layer.label) for layer in layers]
    table, summary = fanout.build_table(
        results,
        [
            row
            for row in rows(sizes, ran, servers)
            if all(k is None or k in results for k in row.cells)
        ],
    )
    details = detail_tables(results, sizes, ran, servers)
    output = args.output or harness.default_output("scaleout", started)
    harness.write_json(
        output,
        "scaleout",
        started=started,
        seconds=time.monotonic() - t0,
        argv=argv,
        sizes=sizes,
        environment=harness.environment_info(fanout.environment_versions, loadavg_at_end=True),
        table=table,
        sections={
            "rows": summary,
            "details_markdown": details,
            "layers": {layer.key: asdict(layer) for layer in layers},
            "skipped_layers": skipped,
            "cases": {key: asdict(value) for key, value in results.items()},
        },
    )
    notes = [details]
    notes += [f"{key} layer skipped: {reason}" for key, reason in skipped.items()]
    no_floor = [label for key, label in ran if "raw" in servers and key not in RAW_LAYERS]
    if "per-user" in cases and no_floor:
        notes.append(
            "The raw ASGI floor of case (a) speaks plain Redis pub/sub only: not measured "
            f"through {', '.join(no_floor)} ('-' in its column)."
        )
    if (note := loss_note(results)) is not None:
        notes.append(note)
    loads = [v for o in results.values() for v in o.runs.get("loadavg_1min_before", [])]
    if loads:
        notes.append(
            f"Load average (1 min) before the measurements: {min(loads):.2f} to "
            f"{max(loads):.2f}, on {os.cpu_count()} CPUs shared by the client, the servers, "
            "the publisher and Redis."
        )
    status = harness.print_report(
        "SSE scale-out benchmark", sizes.runs, args.quick, table, results.values(), output, notes
    )
    return status or (1 if loss_note(results) else 0)


if __name__ == "__main__":
    sys.exit(main())
