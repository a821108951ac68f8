"""Real Redis topologies for tests: a Sentinel group and a Redis Cluster.

Both are made of `redis-server` processes (`redis-server --sentinel` for the
sentinels) on spare loopback ports, with their configuration files, data and logs
in a directory of the test session's own. Everything they start is stopped by
`stop()`, which the fixtures run even when a test fails.

- `SentinelGroup`: a master, a replica and 3 sentinels watching the service
  `SentinelGroup.service`. `kill_master()` SIGKILLs the master and
  `wait_for_failover()` waits until the sentinels promoted the replica (a few
  seconds: the sentinels consider a master down after `down_after_ms`).
- `RedisCluster`: 3 masters and 3 replicas made with `redis-cli --cluster create`.
  `kill_master(node)` SIGKILLs a master and `wait_for_failover(node)` waits until
  its replica took its slots over.

`heal()` restarts what a test killed (a killed master comes back as a replica)
and waits until the topology is whole again, so the session-scoped topologies
serve test after test; the function-scoped fixtures `sentinel_group` and
`redis_cluster` call it before each test.

The waits poll the servers with a synchronous client: call the blocking methods
from async tests with `anyio.to_thread.run_sync`.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

__all__ = [
    "RedisCluster",
    "RedisNode",
    "SentinelGroup",
    "redis_cluster",
    "sentinel_group",
    "spare_ports",
]

HOST = "127.0.0.1"
#: Set this environment variable to keep the topologies' logs and files after a run.
KEEP_ENV = "SSEVIEWS_KEEP_TOPOLOGY"
#: Bound on starting a topology, or on any one wait for it to settle.
SETTLE_TIMEOUT = 30.0


class PortTaken(RuntimeError):
    """A port chosen as spare was taken before the server could bind it."""


def spare_ports(count: int) -> list[int]:
    """`count` distinct loopback ports with nothing listening on them (at the time of the call)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((HOST, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for(what: str, check: Callable[[], bool], seconds: float = SETTLE_TIMEOUT) -> None:
    """Poll `check` until it returns True; raise AssertionError after `seconds`.

    A check that raises a Redis or OS error counts as not yet.
    """
    deadline = time.monotonic() + seconds
    error: Exception | None = None
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError) as exc:
            error = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting until {what} (last: {error})")
        time.sleep(0.05)


class RedisNode:
    """One `redis-server` process (a data node or a sentinel) on a loopback port.

    Its configuration file is written on the first start and kept: Sentinel and
    Cluster rewrite it (the sentinels' view, `nodes-*.conf`), and a restart reads
    it back.
    """

    def __init__(
        self, directory: Path, name: str, port: int, settings: list[str], *, sentinel: bool = False
    ) -> None:
        self.directory = directory
        self.name = name
        self.port = port
        self.settings = settings
        self.sentinel = sentinel
        self.config = directory / f"{name}.conf"
        self.log_path = directory / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __repr__(self) -> str:
        return f"<RedisNode {self.name} {HOST}:{self.port}>"

    def start(self, *extra: str) -> None:
        """Start the server (with `extra` command-line settings) and wait until it answers PING.

        Raises:
            PortTaken: Another process took the port first.
        """
        assert not self.running, f"{self} is already running"
        if not self.config.exists():
            lines = [
                f"port {self.port}",
                f"bind {HOST}",
                f"dir {self.directory}",
                f"logfile {self.log_path}",
                'save ""',
                "appendonly no",
                # Replicas sync at once, not after the default 5 s wait for more of them.
                "repl-diskless-sync-delay 0",
                *self.settings,
            ]
            self.config.write_text("\n".join(lines) + "\n")
        command = ["redis-server", str(self.config)]
        if self.sentinel:
            command.append("--sentinel")
        command += extra
        self.process = subprocess.Popen(
            command,
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent(),
        )
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                self.process = None
                log = self.log()
                if "address already in use" in log.lower():
                    raise PortTaken(f"{self}: port taken")
                raise RuntimeError(f"{self} exited at startup:\n{log}")
            try:
                if self.client().ping():
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self} did not answer PING in 10s:\n{self.log()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the server: no shutdown, no save, no goodbye to its clients."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a paused process dies all the same
            process.kill()
        if process is not None:
            process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP the server: it keeps its sockets but answers nothing."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A new synchronous client of this node (close it, or use it in `with`)."""
        return redis.Redis(
            host=HOST, port=self.port, socket_timeout=2, socket_connect_timeout=2, protocol=2
        )

    def execute(self, *args: str | int) -> object:
        """Run one command on this node and return its (decoded) reply."""
        with self.client() as client:
            return _decode(client.execute_command(*args))

    def wait_replicated(
        self, replicas: int = 1, timeout_ms: int = 5000, probe: str = "replication-probe"
    ) -> int:
        """Wait until `replicas` replicas have everything written to this master so far;
        return how many have.

        `WAIT` counts only what its own connection wrote, so this writes the key
        `probe` first, on the same connection (on a cluster node, give a key of
        its own slots).
        """
        with self.client() as client:
            client.set(probe, "1")
            return int(client.execute_command("WAIT", replicas, timeout_ms))

    def info(self, section: str) -> dict[str, Any]:
        """`INFO section`, parsed by redis-py (`slave0` is a dict, numbers are ints)."""
        with self.client() as client:
            return dict(client.info(section))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"


def _die_with_parent() -> Callable[[], None] | None:
    """On Linux, from the main thread: make a child die when this process dies, so a
    test run killed from outside (or by pytest-timeout's os._exit) leaves no server.

    Not from other threads: the signal follows the thread that forked, and a worker
    thread that ends would take the server with it.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def set_death_signal() -> None:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return set_death_signal


def _decode(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [_decode(item) for item in value]
    return value


def _start_retrying(start_once: Callable[[], None], stop: Callable[[], None]) -> None:
    """Run `start_once`, again (3 tries in all) when a spare port was taken meanwhile;
    `stop` what it started after any failure."""
    for attempt in range(3):
        try:
            start_once()
            return
        except PortTaken:
            stop()
            if attempt == 2:
                raise
        except BaseException:
            stop()
            raise


def _start_nodes(nodes: list[RedisNode]) -> None:
    """Start `nodes`; on any failure stop those started and re-raise."""
    try:
        for node in nodes:
            node.start()
    except BaseException:
        for node in nodes:
            node.kill()
        raise


# -- Sentinel ---------------------------------------------------------------------


class SentinelGroup:
    """A master, a replica and 3 sentinels (quorum 2), on spare loopback ports.

    Args:
        directory: Where configuration files, data and logs go (removed by `stop`).
        down_after_ms: How long a master must be silent before a sentinel
            considers it down (`down-after-milliseconds`). At 1000, a loaded
            machine made sentinels think a just-promoted master was down, and
            fail over again.
        failover_timeout_ms: The sentinels' `failover-timeout`.
    """

    #: The name of the service the sentinels watch (the SERVICE_NAME of the URL).
    service = "sseviews"

    def __init__(
        self, directory: Path, *, down_after_ms: int = 2000, failover_timeout_ms: int = 4000
    ) -> None:
        self.directory = directory
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.nodes: list[RedisNode] = []
        self.sentinels: list[RedisNode] = []

    def url(self, db: int = 0, scheme: str = "redis+sentinel") -> str:
        """`redis+sentinel://` URL of the service, naming every sentinel."""
        hosts = ",".join(f"{HOST}:{sentinel.port}" for sentinel in self.sentinels)
        return f"{scheme}://{hosts}/{self.service}/{db}"

    # -- lifecycle

    def start(self) -> None:
        """Start the data nodes, then the sentinels; wait until everything has settled."""
        _start_retrying(self._start_once, lambda: self.stop(remove=False))

    def _start_once(self) -> None:
        for path in self.directory.glob("*.conf"):
            path.unlink()
        ports = spare_ports(5)
        master = RedisNode(self.directory, "node-a", ports[0], [])
        replica = RedisNode(self.directory, "node-b", ports[1], [])
        self.nodes = [master, replica]
        self.sentinels = [
            RedisNode(
                self.directory,
                f"sentinel-{i}",
                port,
                [
                    f"sentinel monitor {self.service} {HOST} {master.port} 2",
                    f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
                    f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {self.service} 1",
                ],
                sentinel=True,
            )
            for i, port in enumerate(ports[2:], start=1)
        ]
        master.start()
        replica.start("--replicaof", HOST, str(master.port))
        wait_for("the replica is in sync", lambda: self._in_sync(master))
        _start_nodes(self.sentinels)
        self.wait_settled()

    def stop(self, *, remove: bool = True) -> None:
        """Kill every process of the group (sentinels first), and remove its directory."""
        for node in [*self.sentinels, *self.nodes]:
            node.kill()
        if remove and not os.environ.get(KEEP_ENV):
            shutil.rmtree(self.directory, ignore_errors=True)

    def heal(self) -> None:
        """Bring back killed nodes (as replicas of the master) and paused ones; wait to settle."""
        for node in [*self.nodes, *self.sentinels]:
            if node.running:
                node.resume()
        for sentinel in self.sentinels:
            if not sentinel.running:
                sentinel.start()
        if any(not node.running for node in self.nodes):
            master = self.master()
            for node in self.nodes:
                if not node.running:
                    node.start("--replicaof", HOST, str(master.port))
        self.wait_settled()

    # -- what the sentinels and the nodes say

    def master_addresses(self) -> list[tuple[str, int]]:
        """The master's address as each running sentinel reports it."""
        addresses = []
        for sentinel in self.sentinels:
            if sentinel.running:
                host, port = sentinel.execute("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)  # type: ignore[misc]
                addresses.append((str(host), int(port)))
        return addresses

    def master(self) -> RedisNode:
        """The node the sentinels agree is the master (AssertionError if they do not)."""
        addresses = set(self.master_addresses())
        assert len(addresses) == 1, f"the sentinels disagree on the master: {addresses}"
        (address,) = addresses
        return next(node for node in self.nodes if node.address == address)

    def replica(self) -> RedisNode:
        """The running node that is not the master."""
        master = self.master()
        return next(node for node in self.nodes if node is not master and node.running)

    def _in_sync(self, master: RedisNode) -> bool:
        """Whether `master` is a master with every other running node online and caught up."""
        info = master.info("replication")
        if info.get("role") != "master":
            return False
        others = [node for node in self.nodes if node is not master and node.running]
        if info.get("connected_slaves") != len(others):
            return False
        offset = info["master_repl_offset"]
        for i in range(len(others)):
            fields = info[f"slave{i}"]
            if fields.get("state") != "online" or fields.get("offset") != offset:
                return False
        return all(node.info("replication").get("master_link_status") == "up" for node in others)

    def _settled(self) -> bool:
        addresses = set(self.master_addresses())
        if len(addresses) != 1:
            return False
        master = self.master()
        if not self._in_sync(master):
            return False
        running = [node for node in self.nodes if node.running and node is not master]
        for sentinel in self.sentinels:
            state = _pairs(sentinel.execute("SENTINEL", "MASTER", self.service))
            if "s_down" in state["flags"] or "o_down" in state["flags"]:
                return False
            if int(state["num-other-sentinels"]) != len(self.sentinels) - 1:
                return False
            replicas = [
                _pairs(r)
                for r in sentinel.execute("SENTINEL", "REPLICAS", self.service)  # type: ignore[union-attr]
            ]
            healthy = {
                int(r["port"])
                for r in replicas
                if "s_down" not in r["flags"] and r.get("master-link-status") == "ok"
            }
            if not {node.port for node in running} <= healthy:
                return False
        return True

    def wait_settled(self, seconds: float = SETTLE_TIMEOUT) -> None:
        """Wait until the sentinels agree on the master, know each other, and see the
        replicas in sync."""
        try:
            wait_for("the sentinel group settled", self._settled, seconds)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    # -- faults

    def kill_master(self) -> RedisNode:
        """SIGKILL the master; return it (see `wait_for_failover`)."""
        master = self.master()
        master.kill()
        return master

    def detach_replica(self) -> RedisNode:
        """Point the replica at a port where nothing listens, and return it.

        Writes to the master from then on never reach it: a replica lagging
        behind, whose promotion loses those writes. `reattach_replica` undoes it.
        """
        replica = self.replica()
        (nowhere,) = spare_ports(1)
        replica.execute("REPLICAOF", HOST, nowhere)
        return replica

    def reattach_replica(self, replica: RedisNode, master: RedisNode) -> None:
        """Point `replica` at `master` again (which may be dead: then it waits for it)."""
        replica.execute("REPLICAOF", HOST, master.port)

    def wait_for_failover(self, old: RedisNode, seconds: float = SETTLE_TIMEOUT) -> RedisNode:
        """Wait until every sentinel names a new master that reports role:master; return it."""

        def promoted() -> bool:
            addresses = set(self.master_addresses())
            if len(addresses) != 1 or old.address in addresses:
                return False
            return self.master().info("replication").get("role") == "master"

        try:
            wait_for(f"a failover away from {old}", promoted, seconds)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None
        return self.master()

    def logs(self) -> str:
        return "\n".join(
            f"--- {node.name} ({'running' if node.running else 'stopped'}):\n{node.log()[-3000:]}"
            for node in [*self.nodes, *self.sentinels]
        )


def _pairs(reply: object) -> dict[str, str]:
    """A flat [key, value, key, value...] reply as a dict."""
    assert isinstance(reply, list), reply
    return {str(reply[i]): str(reply[i + 1]) for i in range(0, len(reply), 2)}


# -- Cluster ----------------------------------------------------------------------


class RedisCluster:
    """3 masters and 3 replicas (`redis-cli --cluster create --cluster-replicas 1`).

    Args:
        directory: Where configuration files, data and logs go (removed by `stop`).
        node_timeout_ms: `cluster-node-timeout`: how long a master must be
            unreachable before its replica takes over.
    """

    def __init__(self, directory: Path, *, node_timeout_ms: int = 1000) -> None:
        self.directory = directory
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisNode] = []

    def url(self, scheme: str = "redis+cluster") -> str:
        """`redis+cluster://` URL naming every node."""
        hosts = ",".join(f"{HOST}:{node.port}" for node in self.nodes)
        return f"{scheme}://{hosts}/"

    # -- lifecycle

    def start(self) -> None:
        """Start 6 nodes, create the cluster, wait until every node reports cluster_state:ok."""
        _start_retrying(self._start_once, lambda: self.stop(remove=False))

    def _start_once(self) -> None:
        for pattern in ("*.conf", "*.rdb"):
            for path in self.directory.glob(pattern):
                path.unlink()
        ports = spare_ports(12)
        self.nodes = [
            RedisNode(
                self.directory,
                f"node-{i}",
                ports[i],
                [
                    "cluster-enabled yes",
                    f"cluster-port {ports[i + 6]}",
                    f"cluster-config-file nodes-{i}.conf",
                    f"cluster-node-timeout {self.node_timeout_ms}",
                ],
            )
            for i in range(6)
        ]
        _start_nodes(self.nodes)
        create = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"{HOST}:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=SETTLE_TIMEOUT,
            check=False,
        )
        if create.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed ({create.returncode}):\n"
                f"{create.stdout.decode(errors='replace')}{create.stderr.decode(errors='replace')}"
            )
        self.wait_settled()

    def stop(self, *, remove: bool = True) -> None:
        """Kill every node, and remove the directory."""
        for node in self.nodes:
            node.kill()
        if remove and not os.environ.get(KEEP_ENV):
            shutil.rmtree(self.directory, ignore_errors=True)

    def heal(self) -> None:
        """Restart killed nodes (a killed master rejoins as its replacement's replica),
        resume paused ones, and wait until every master has a replica again."""
        for node in self.nodes:
            if node.running:
                node.resume()
            else:
                node.start()
        self.wait_settled()

    # -- what the nodes say

    def _view(self, node: RedisNode) -> list[dict[str, str]]:
        """`CLUSTER NODES` as `node` sees it: one dict per node."""
        rows = []
        for line in str(node.execute("CLUSTER", "NODES")).splitlines():
            fields = line.split()
            rows.append(
                {
                    "id": fields[0],
                    "port": fields[1].split("@")[0].rsplit(":", 1)[1],
                    "flags": fields[2],
                    "master": fields[3],
                    "link": fields[7],
                    "slots": " ".join(fields[8:]),
                }
            )
        return rows

    def masters(self) -> list[RedisNode]:
        """The running masters, as the first running node sees them."""
        viewer = next(node for node in self.nodes if node.running)
        ports = {
            int(row["port"])
            for row in self._view(viewer)
            if "master" in row["flags"] and "fail" not in row["flags"] and row["slots"]
        }
        return [node for node in self.nodes if node.port in ports and node.running]

    def replica_of(self, master: RedisNode) -> RedisNode:
        """The running replica of `master`."""
        rows = self._view(master)
        master_id = next(row["id"] for row in rows if "myself" in row["flags"])
        ports = {int(row["port"]) for row in rows if row["master"] == master_id}
        return next(node for node in self.nodes if node.port in ports and node.running)

    def slot_ranges(self, master: RedisNode) -> list[tuple[int, int]]:
        """The slot ranges `master` serves."""
        rows = self._view(master)
        mine = next(row for row in rows if "myself" in row["flags"])
        ranges = []
        for part in mine["slots"].split():
            if part.startswith("["):  # a slot being migrated
                continue
            first, _, last = part.partition("-")
            ranges.append((int(first), int(last or first)))
        return ranges

    def _settled(self) -> bool:
        running = [node for node in self.nodes if node.running]
        for node in running:
            info = dict(
                line.split(":", 1)
                for line in str(node.execute("CLUSTER", "INFO")).splitlines()
                if ":" in line
            )
            info = {key: value.strip() for key, value in info.items()}
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
            rows = self._view(node)
            live = [row for row in rows if "fail" not in row["flags"]]
            masters = [row for row in live if "master" in row["flags"] and row["slots"]]
            if len(masters) != 3:
                return False
            if any(row["link"] != "connected" for row in live):
                return False
            # Every running node is known and live; every master has its running replicas.
            running_ports = {str(n.port) for n in running}
            if running_ports - {row["port"] for row in live}:
                return False
            replicas = [row for row in live if "slave" in row["flags"]]
            if len(replicas) != len(running) - 3:
                return False
        return True

    def wait_settled(self, seconds: float = SETTLE_TIMEOUT) -> None:
        """Wait until every running node reports cluster_state:ok, 3 masters covering
        every slot, and every running replica attached."""
        try:
            wait_for("the cluster settled", self._settled, seconds)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    # -- faults

    def kill_master(self, node: RedisNode) -> None:
        """SIGKILL `node`, a master (see `wait_for_failover`)."""
        assert node in self.masters(), f"{node} is not a master"
        node.kill()

    def wait_for_failover(
        self, old: RedisNode, replica: RedisNode, seconds: float = SETTLE_TIMEOUT
    ) -> None:
        """Wait until `replica` of the killed master `old` serves its slots and the
        cluster is ok again."""

        def promoted() -> bool:
            role = replica.info("replication").get("role")
            return role == "master" and self._settled()

        try:
            wait_for(f"{replica} took over from {old}", promoted, seconds)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def logs(self) -> str:
        return "\n".join(
            f"--- {node.name} ({'running' if node.running else 'stopped'}):\n{node.log()[-3000:]}"
            for node in self.nodes
        )


# -- fixtures ---------------------------------------------------------------------


def _need_redis_server() -> None:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server and redis-cli are needed (.ci/run installs them)")


@pytest.fixture(scope="session")
def _sentinel_group_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    _need_redis_server()
    group = SentinelGroup(tmp_path_factory.mktemp("sentinel-group"))
    group.start()
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture
def sentinel_group(_sentinel_group_session: SentinelGroup) -> SentinelGroup:
    """The session's Sentinel group, whole again (what earlier tests killed is back)."""
    _sentinel_group_session.heal()
    return _sentinel_group_session


@pytest.fixture(scope="session")
def _redis_cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    _need_redis_server()
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(_redis_cluster_session: RedisCluster) -> RedisCluster:
    """The session's Redis Cluster, whole again (what earlier tests killed is back)."""
    _redis_cluster_session.heal()
    return _redis_cluster_session
