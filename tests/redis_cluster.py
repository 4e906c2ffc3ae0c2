"""A Redis Cluster of a test's own: three masters (no replicas) on loopback ports.

Each node is a :class:`~tests.redis_server.RedisServer` in its own directory, started with
``--cluster-enabled yes`` and a cluster bus port of its own (``--cluster-port``: the default,
port + 10000, may be taken or past 65535), without persistence. ``redis-cli --cluster
create`` assigns the slots; :meth:`RedisClusterServers.start` returns once every node says
``cluster_state:ok`` and every node hands out the same slot map, which is what a client
reads when it connects::

    with RedisClusterServers(tmp_path, password="...") as cluster:
        settings = Settings(redis_url=cluster.url, broker_url="memory://localhost/")
        cluster.node_of(b"key")  # the RedisServer that serves this key's slot

:meth:`stop` ends every node (each its own process group), whatever state it is in.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.crc import key_slot

from tests.redis_server import RedisServer, free_port
from tests.waiting import wait_for

SLOTS = 16384
CREATE_TIMEOUT = 60.0  # seconds; redis-cli waits for the nodes to agree (gossip, about 1 s)
READY_TIMEOUT = 30.0


class RedisClusterServers:
    def __init__(self, directory: Path, *, masters: int = 3, password: str | None = None) -> None:
        self.directory = directory
        self.password = password
        self.nodes = [
            RedisServer(directory / f"node-{i}", options=self._options(), password=password)
            for i in range(masters)
        ]

    def _options(self) -> list[str]:
        options = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",  # in the node's own --dir
            # A node stopped for a test and started again within this is never declared
            # failed: the cluster takes it back with its slots.
            "--cluster-node-timeout", "15000",
            "--cluster-port", str(free_port()),
        ]  # fmt: skip
        if self.password:
            options += ["--masterauth", self.password]
        return options

    @property
    def addresses(self) -> list[str]:
        return [f"{node.host}:{node.port}" for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://[:PASSWORD@]HOST:PORT,HOST:PORT,...`` (every node a seed)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis+cluster://{auth}{','.join(self.addresses)}"

    def start(self) -> RedisClusterServers:
        try:
            for node in self.nodes:
                node.start()
            self._create()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_ready(self) -> None:
        """Until every node says ``cluster_state:ok`` and hands out the same slot map."""
        wait_for(
            self._ready,
            READY_TIMEOUT,
            "every node: cluster_state:ok, one slot map",
            describe=lambda: "\n".join(n.log_tail(10) for n in self.nodes),
        )

    # -- what the tests ask -----------------------------------------------------------------
    def client(self, node: RedisServer, **options: Any) -> redis.Redis:
        """A plain (not cluster) client of one node; the caller closes it."""
        return redis.Redis(
            host=node.host, port=node.port, password=self.password, socket_timeout=5, **options
        )

    def node_of(self, key: str | bytes) -> RedisServer:
        """The node that serves ``key``'s slot, as that node itself says."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        with self.client(self.nodes[0]) as c:
            slots = c.execute_command("CLUSTER SLOTS")
        for start, end, owner, *_ in slots:
            if start <= slot <= end:
                return next(n for n in self.nodes if n.port == int(owner[1]))
        raise AssertionError(f"slot {slot} is served by no node")

    # -- details ------------------------------------------------------------------------------
    def _create(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
        if self.password:
            env["REDISCLI_AUTH"] = self.password  # not -a: it would show in the process list
        argv = ["redis-cli", "--cluster", "create", *self.addresses]
        done = subprocess.run(
            [*argv, "--cluster-replicas", "0", "--cluster-yes"],
            env=env,
            capture_output=True,
            text=True,
            timeout=CREATE_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")

    def _ready(self) -> bool:
        maps = []
        for node in self.nodes:
            try:
                with self.client(node) as c:
                    info = c.execute_command("CLUSTER INFO")
                    slots = c.execute_command("CLUSTER SLOTS")
            except redis.RedisError:
                return False
            if info.get("cluster_state") != "ok":  # redis-py parses CLUSTER INFO into a dict
                return False
            maps.append(sorted((int(s), int(e), int(owner[1])) for s, e, owner, *_ in slots))
        covered = sum(e - s + 1 for s, e, _ in maps[0])
        return covered == SLOTS and all(m == maps[0] for m in maps)
