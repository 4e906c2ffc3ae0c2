"""The budget, the leases and locks, the poll slots, the posts memory and beat's claim reads on
a real Redis Cluster: three masters of this module's own (``tests/redis_cluster.py``), with a
password, reached through ``HIPCHAT_POLLER_REDIS_URL=redis+cluster://...`` as a deployment
would reach it (:func:`tasks.redis_conn.connect`).

Every connection's keys share the hash tag ``{conn:ID}`` and so one slot; the tests pick
connections whose slots are served by different nodes, so that each node runs the scripts
and pipelines that span nodes are split by the cluster client.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from cryptography.fernet import Fernet
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from emulator import EmulatorServer
from storage.errors import StorageUnavailable
from tasks.budget import RedisLog, SlidingLogBudget, Status
from tasks.connections_api import add_connection
from tasks.keys import Keys
from tasks.lease import Leases
from tasks.posts import RedisPosts, message_key
from tasks.redis_conn import RETRIES, SOCKET_TIMEOUT_SECONDS, connect, redis_errors
from tasks.runtime import Runtime
from tasks.settings import Settings
from tests.pipeline_support import Backend, make_pipeline
from tests.redis_cluster import RedisClusterServers
from tests.redis_server import free_port
from tests.storage_support import opened, sqlite_url
from tests.waiting import wait_for
from worker.app import create_app
from worker.preflight import persistence_warning
from worker.scheduler import ConnectionScheduler

pytestmark = pytest.mark.integration

HOUR = 3600.0
BROKER = "memory://localhost/"  # a cluster cannot be the broker; nothing is sent here


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    password = f"cluster-{secrets.token_hex(8)}"
    with RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"), password=password) as c:
        yield c


@pytest.fixture
def client(cluster: RedisClusterServers) -> Iterator[RedisCluster]:
    found = connect(Settings(redis_url=cluster.url, broker_url=BROKER))
    assert isinstance(found, RedisCluster)
    yield found
    found.close()


def one_per_node(cluster: RedisClusterServers, keys: Keys, count: int = 3) -> list[int]:
    """Connection ids whose keys live on ``count`` different nodes."""
    by_node: dict[int | None, int] = {}
    for conn in range(1, 200):
        by_node.setdefault(cluster.node_of(keys.budget_log(conn)).port, conn)
        if len(by_node) == count:
            return sorted(by_node.values())
    raise AssertionError(f"no {count} connections on {count} nodes")


def test_a_cluster_url_makes_a_cluster_client_with_the_usual_timeouts(
    cluster: RedisClusterServers, client: RedisCluster
) -> None:
    assert {f"{n.host}:{n.port}" for n in client.get_nodes()} == set(cluster.addresses)
    node = client.get_primaries()[0].redis_connection
    assert node is not None
    assert node.connection_pool.connection_kwargs["socket_timeout"] == SOCKET_TIMEOUT_SECONDS
    assert client.retry.get_retries() == RETRIES
    assert client.ping()


def test_the_budget_race_grants_exactly_the_capacity_on_every_node(
    cluster: RedisClusterServers, client: RedisCluster, key_prefix: str
) -> None:
    """100 threads per connection, all at once, on three connections served by three nodes:
    exactly 25 takes succeed on each."""
    keys = Keys(key_prefix)
    conns = one_per_node(cluster, keys)
    budget = SlidingLogBudget(RedisLog(client, keys), capacity=25, window_seconds=HOUR)
    for conn in conns:
        budget.initialise(conn)
    threads = 100 * len(conns)
    start = threading.Barrier(threads)

    def hammer(i: int) -> tuple[int, bool]:
        conn = conns[i % len(conns)]
        start.wait()
        return conn, budget.take(conn).granted

    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(hammer, range(threads)))
    for conn in conns:
        assert sum(granted for c, granted in outcomes if c == conn) == 25, conn
        assert budget.usage(conn).used == 25  # usage reads the log and Redis TIME
        assert budget.take(conn).status is Status.REFUSED
    nodes = {cluster.node_of(keys.budget_log(c)).port for c in conns}
    assert len(nodes) == 3
    for conn in conns:  # each connection's keys are on its node, and only there
        owner = cluster.node_of(keys.budget_state(conn))
        with cluster.client(owner) as plain:
            assert plain.llen(keys.budget_log(conn)) == 25
            assert plain.hexists(keys.budget_state(conn), "epoch")


def test_reservations_and_hipchats_ceiling_on_the_cluster(
    cluster: RedisClusterServers, client: RedisCluster, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    conn = one_per_node(cluster, keys)[-1]
    budget = SlidingLogBudget(RedisLog(client, keys), capacity=2, window_seconds=60)
    budget.initialise(conn)
    assert budget.take(conn, 2).granted
    waiting = budget.reserve(conn)  # within the reservation horizon (15 min)
    assert waiting.status is Status.RESERVED
    assert 59 < waiting.wait <= 61
    assert waiting.reservation is not None
    budget.clear(conn)
    budget.initialise(conn)
    budget.observe_429(conn, reset_at=2e9)
    assert budget.take(conn).status is Status.REFUSED
    assert budget.usage(conn).hipchat_remaining == 0


def test_leases_locks_poll_slots_and_posts_on_the_cluster(
    cluster: RedisClusterServers, client: RedisCluster, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    conns = one_per_node(cluster, keys)
    leases = Leases(client, keys)
    threads = 50
    start = threading.Barrier(threads)
    losers_returned = threading.Event()

    def lease(_: int) -> bool:
        start.wait()
        with leases.poll(conns[0]) as got:
            if got:  # hold it until every other thread has tried
                losers_returned.wait(10)
            return got

    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(lease, i) for i in range(threads)]
        wait_for(lambda: sum(f.done() for f in futures) >= threads - 1, 10, "49 refusals")
        losers_returned.set()
        assert [f.result() for f in futures].count(True) == 1

    claim = threading.Barrier(threads)

    def claims(_: int) -> bool:
        claim.wait()
        return leases.claim_interval(conns[1], 7, ttl_seconds=60)

    with ThreadPoolExecutor(threads) as pool:
        assert list(pool.map(claims, range(threads))).count(True) == 1
    assert leases.claim_interval(conns[1], 8, ttl_seconds=60)
    assert not leases.claim_interval(conns[1], 7, ttl_seconds=60)

    # Drain locks of subscriptions on every node, read back in one pipeline across nodes.
    subs = [1, 2, 3, 4, 5, 6]
    with leases.drain(subs[0]) as first, leases.drain(subs[3]) as second:
        assert first
        assert second
        with leases.drain(subs[0]) as again:
            assert not again
        assert leases.draining(subs) == {subs[0], subs[3]}
    assert leases.draining(subs) == set()
    leases.request_drain(subs[1])
    assert leases.take_drain_request(subs[1])
    assert not leases.take_drain_request(subs[1])

    posts = RedisPosts(client, keys)
    assert posts.begin(conns[2], "task:1") is None
    assert posts.begin(conns[2], "task:1") is not None
    posts.remember(conns[2], [message_key("m1")])
    assert posts.own(conns[2], [message_key("m1"), message_key("m2")]) == {message_key("m1")}


def test_beat_reads_the_claims_of_connections_on_every_node(
    cluster: RedisClusterServers, tmp_path: Path, key_prefix: str
) -> None:
    url = sqlite_url(tmp_path)
    with opened(url, migrate=True):
        pass
    settings = Settings(
        database_url=url,
        redis_url=cluster.url,
        broker_url=BROKER,
        data_dir=str(tmp_path),
        secret_key=Fernet.generate_key().decode(),
        redis_key_prefix=key_prefix,
    )
    app = create_app(settings)
    rt = Runtime.of(app)
    try:
        assert isinstance(rt.redis, RedisCluster)
        ids = [add_connection(rt, f"c{i}", "http://h.example", "t").id for i in range(12)]
        nodes = {cluster.node_of(rt.keys.poll_slot(i)).port for i in ids}
        assert len(nodes) == 3
        claimed = {conn: 100 + conn for conn in ids[::2]}
        for conn, index in claimed.items():
            assert rt.leases.claim_interval(conn, index, ttl_seconds=60)
        scheduler = ConnectionScheduler(app, resume=True)
        assert scheduler._read_claims(ids) == claimed
        assert len(scheduler.schedule) == len(ids)
    finally:
        rt.close()
        rt.redis.close()
        app.close()


def test_a_poll_through_the_cluster(
    cluster: RedisClusterServers,
    client: RedisCluster,
    pipeline_emulator: EmulatorServer,
    tmp_path: Path,
    key_prefix: str,
) -> None:
    url = sqlite_url(tmp_path)
    with opened(url, migrate=True):
        pass
    backend = Backend("cluster", url, client, key_prefix, str(tmp_path))
    try:
        pipe = make_pipeline(backend, pipeline_emulator, redis_url=cluster.url, broker_url=BROKER)
        assert isinstance(pipe.rt.posts, RedisPosts)
        sub = pipe.subscribe("room_message")
        assert pipe.poll().event_count == 0  # the first poll primes
        pipe.say("hello cluster")
        result = pipe.poll()
        assert result.event_count == 1, result.status
        assert [p["message"] for p in pipe.payloads(sub.id)] == ["hello cluster"]
        keys = pipe.rt.keys
        owner = cluster.node_of(keys.budget_log(pipe.conn_id))
        with cluster.client(owner) as plain:
            assert plain.llen(keys.budget_log(pipe.conn_id)) >= 2  # both polls' calls
            assert not plain.exists(keys.poll_lease(pipe.conn_id))  # released
    finally:
        for rt in backend.runtimes:
            rt.close()


def test_a_primary_down_is_storage_unavailable_and_the_others_serve_on(
    cluster: RedisClusterServers, client: RedisCluster, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    conns = one_per_node(cluster, keys)
    budget = SlidingLogBudget(RedisLog(client, keys), capacity=5, window_seconds=HOUR)
    for conn in conns:
        budget.initialise(conn)
    down = cluster.node_of(keys.budget_log(conns[0]))
    down.stop()
    try:
        with pytest.raises(StorageUnavailable) as caught:
            budget.take(conns[0])
        assert cluster.password is not None
        assert cluster.password not in str(caught.value)
        assert f"connection {conns[0]}" in str(caught.value)
        assert isinstance(caught.value.__cause__, redis.ConnectionError)
        # Until the cluster declares the node failed, the other slots are served.
        assert budget.take(conns[1]).granted
        assert budget.take(conns[2]).granted
    finally:
        # Back within the node timeout, before the others declare it failed; its nodes.conf
        # is kept, so it rejoins with its slots, and without its data.
        down.start()
        cluster.wait_ready()
    # The budget's state was on that node: a log that may have lost calls refuses a window.
    assert budget.take(conns[0]).status is Status.REFUSED
    assert budget.usage(conns[0]).hipchat_remaining == 0


def test_an_unreachable_cluster_is_storage_unavailable_without_its_password() -> None:
    nodes = ",".join(f"127.0.0.1:{free_port()}" for _ in range(2))
    settings = Settings(redis_url=f"redis+cluster://:s3cret-pw@{nodes}", broker_url=BROKER)
    with pytest.raises(StorageUnavailable) as caught:
        connect(settings)
    assert "s3cret-pw" not in str(caught.value)
    assert "Redis Cluster" in str(caught.value)
    assert caught.value.retry_after > 0


def test_misuse_of_a_cluster_client_is_a_bug_not_an_outage(client: RedisCluster) -> None:
    pipe = client.pipeline(transaction=False)
    with pytest.raises(RedisClusterException), redis_errors("misuse", "a test"):
        pipe.time()  # keyless commands cannot be pipelined on a cluster


# -- the Celery app: a cluster is never the broker, nor the result backend ---------------------


@pytest.mark.parametrize(
    ("broker", "backend"),
    [("redis://127.0.0.1:6379/3", "redis://127.0.0.1:6379/3"), ("amqp://h//", "rpc://")],
)
def test_with_a_cluster_results_go_to_the_broker(broker: str, backend: str) -> None:
    settings = Settings(redis_url="redis+cluster://127.0.0.1:7000", broker_url=broker)
    app = create_app(settings)
    assert app.conf.broker_url == broker
    assert app.conf.result_backend == backend
    app.close()


def test_a_cluster_without_persistence_is_warned_about(client: RedisCluster) -> None:
    """The start-up warning asks every primary: each holds some connections' budgets."""
    primaries = [node.redis_connection for node in client.get_primaries()]
    assert all(node is not None for node in primaries)
    for node in primaries:
        assert node is not None
        node.config_set("appendonly", "no")
        node.config_set("save", "")
    warning = persistence_warning(client)
    assert warning is not None
    assert warning.startswith("Redis has no persistence")
    for node in primaries:
        assert node is not None
        node.config_set("appendonly", "yes")
    assert persistence_warning(client) is None
    for node in primaries:
        assert node is not None
        node.config_set("appendonly", "no")
