"""Settings are validated at start: every number finite and in its range, URLs this code can
use, a log level it knows. Each problem is one sentence naming the variable; a URL (which may
hold a password) is never quoted."""

from __future__ import annotations

import pytest

from storage.errors import ValidationError
from tasks.settings import Settings

P = "HIPCHAT_POLLER_"


def problems(**env: str) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        Settings.from_env({P + k.upper(): v for k, v in env.items()})
    return caught.value.errors


def test_the_defaults_are_valid_and_warn_of_nothing() -> None:
    settings = Settings.from_env({})
    assert settings.warnings() == []
    assert settings.outbox_retention_days == 7.0


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-5", "86401"])
def test_the_poll_interval_is_finite_positive_and_at_most_a_day(value: str) -> None:
    assert problems(poll_interval_seconds=value) == [
        f"{P}POLL_INTERVAL_SECONDS must be a number of seconds above 0 and at most 86400 "
        f"(got {float(value)!r})"
    ]


@pytest.mark.parametrize(
    ("name", "value", "rule"),
    [
        ("bucket_capacity", "0", "at least 1"),
        ("bucket_window_seconds", "nan", "a number of seconds above 0"),
        ("bucket_margin_seconds", "-1", "a number of seconds within 0..86400"),
        ("broker_visibility_timeout_seconds", "0", "a number of seconds above 0"),
        ("relay_interval_seconds", "0", "a number of seconds above 0"),
        ("relay_min_age_seconds", "-1", "a number of seconds within 0..86400"),
        ("outbox_retention_days", "0", "a number of days > 0"),
        ("http_read_timeout_seconds", "inf", "a number of seconds above 0"),
        ("history_page_size", "1001", "within 1..1000"),
        ("webhook_max_attempts", "0", "at least 1"),
        ("webhook_backoff_max_seconds", "1", "at least WEBHOOK_BACKOFF_BASE_SECONDS"),
        ("action_max_attempts", "0", "at least 1"),
    ],
)
def test_each_number_has_its_rule(name: str, value: str, rule: str) -> None:
    [problem] = problems(**{name: value})
    assert problem.startswith(f"{P}{name.upper()} must be {rule}")


def test_every_problem_is_reported_at_once() -> None:
    found = problems(poll_interval_seconds="nan", bucket_capacity="0", log_level="LOUD")
    assert len(found) == 3


def test_a_number_that_is_not_one() -> None:
    assert problems(poll_interval_seconds="soon") == [
        f"{P}POLL_INTERVAL_SECONDS: expected a number, got 'soon'"
    ]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("foo://bar", "foo is not supported; use sqlite:///PATH or postgresql+psycopg://"),
        ("mysql://root:hunter2@db/app", "mysql is not supported; use sqlite:///PATH or"),
        ("postgresql://u:hunter2@db/app", "write postgresql+psycopg:// (psycopg 3)"),
        ("hunter2", "is not a URL; use sqlite:///PATH"),
    ],
)
def test_unsupported_databases_are_named_without_quoting_the_url(url: str, problem: str) -> None:
    [found] = problems(database_url=url)
    assert found.startswith(f"{P}DATABASE_URL")
    assert problem in found
    assert "hunter2" not in found


@pytest.mark.parametrize(
    "url", ["sqlite:////tmp/x.db", "sqlite+pysqlite:///x.db", "postgresql+psycopg://u@h/db"]
)
def test_supported_databases(url: str) -> None:
    assert Settings.from_env({P + "DATABASE_URL": url}).database_url == url


def test_redis_and_broker_urls() -> None:
    assert problems(redis_url="http://hunter2@x") == [
        f"{P}REDIS_URL must be redis://HOST:PORT/DB (or rediss://, unix://; "
        "redis+cluster://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...] for a Redis Cluster)"
    ]
    assert problems(broker_url="localhost") == [
        f"{P}BROKER_URL must be a URL such as redis://HOST:PORT/DB"
    ]
    ok = Settings.from_env({P + "REDIS_URL": "rediss://h:6380/0", P + "BROKER_URL": "amqp://h"})
    assert ok.broker_url == "amqp://h"


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://10.0.0.1:7000",
        "redis+cluster://:hunter2@10.0.0.1:7000,10.0.0.2:7001,[fd00::3]:7002/0",
        "rediss+cluster://user:hunter2@redis.example?ssl_cert_reqs=required",
    ],
)
def test_a_redis_cluster_with_a_broker_of_its_own(url: str) -> None:
    settings = Settings.from_env({P + "REDIS_URL": url, P + "BROKER_URL": "amqp://rabbit//"})
    assert settings.redis_cluster
    assert not settings.embedded
    assert not Settings.from_env({P + "REDIS_URL": "redis://h:6379/0"}).redis_cluster


def test_a_redis_cluster_cannot_be_the_broker() -> None:
    cluster = "redis+cluster://:hunter2@10.0.0.1:7000"
    assert problems(redis_url=cluster) == [
        f"{P}BROKER_URL must be set when {P}REDIS_URL is a Redis Cluster: Celery's broker "
        "cannot be a Redis Cluster: use a single Redis (redis://) or RabbitMQ (amqp://)"
    ]
    assert problems(redis_url=cluster, broker_url=cluster) == [
        f"{P}BROKER_URL: Celery's broker cannot be a Redis Cluster: use a single Redis "
        "(redis://) or RabbitMQ (amqp://)"
    ]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster://:hunter2@h:7000/1", "a Redis Cluster has database 0 only"),
        ("redis+cluster://:hunter2@h:70000", "name the cluster's nodes as redis+cluster://"),
        ("redis+cluster://:hunter2@h:7000,", "name the cluster's nodes as redis+cluster://"),
        ("redis+cluster://:hunter2@", "name the cluster's nodes as redis+cluster://"),
    ],
)
def test_a_bad_cluster_url_is_named_without_quoting_it(url: str, problem: str) -> None:
    [found] = problems(redis_url=url, broker_url="redis://h:6379/0")
    assert found.startswith(f"{P}REDIS_URL: {problem}")
    assert "hunter2" not in found


def test_the_log_level() -> None:
    assert Settings.from_env({P + "LOG_LEVEL": "warning"}).log_level == "warning"
    assert problems(log_level="LOUD") == [
        f"{P}LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    ]


def test_text_that_is_not_utf8() -> None:
    assert problems(database_url="sqlite:///caf\udce9.db") == [
        f"{P}DATABASE_URL is not valid UTF-8 text"
    ]


@pytest.mark.parametrize(
    ("capacity", "window", "warned"),
    [("100", "60", False), ("150", "60", True), ("100", "30", True), ("50", "60", False)],
)
def test_a_budget_beyond_hipchats_warns(capacity: str, window: str, warned: bool) -> None:
    settings = Settings.from_env(
        {P + "BUCKET_CAPACITY": capacity, P + "BUCKET_WINDOW_SECONDS": window}
    )
    warnings = settings.warnings()
    assert bool(warnings) is warned
    if warned:
        assert "allows more than HipChat's 100 calls per 60 s: expect 429s" in warnings[0]
