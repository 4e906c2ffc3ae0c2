"""The exception tree: grouping by what the caller must do, and pickling across processes."""

from __future__ import annotations

import pickle

import pytest

from storage import errors


@pytest.mark.parametrize(
    ("error", "group"),
    [
        (errors.RateLimited("429", 7.5, flood_control=True), errors.RetryLater),
        (errors.BucketEmpty("empty", 0.25), errors.RetryLater),
        (errors.ServerError("503", 503), errors.RetryLater),
        (errors.TransportError("reset"), errors.RetryLater),
        (errors.MalformedResponse("bad json"), errors.RetryLater),
        (errors.StorageUnavailable("redis down", 2.0), errors.RetryLater),
        (errors.AuthFailed("401", 401), errors.NeedsAttention),
        (errors.Forbidden("403", 403), errors.NeedsAttention),
        (errors.NotFound("404", 404), errors.NeedsAttention),
        (errors.BadRequest("400"), errors.InvalidInput),
        (errors.ValidationError("bad", ["one", "two"]), errors.InvalidInput),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else v.__name__,
)
def test_each_error_pickles_with_its_attributes_and_group(
    error: errors.HipChatPollerError, group: type[Exception]
) -> None:
    # Celery pickles a task's exception into its retry message and its result.
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.__dict__ == error.__dict__
    assert isinstance(copy, group)
    assert isinstance(copy, errors.HipChatPollerError)


def test_retry_after_is_never_negative() -> None:
    assert errors.RetryLater("x", -3).retry_after == 0.0
    assert errors.RateLimited("x", 12).retry_after == 12.0
    assert errors.RateLimited("x", 12, flood_control=True).flood_control is True


def test_validation_error_lists_every_problem() -> None:
    assert errors.ValidationError("only").errors == ["only"]
    assert errors.ValidationError("summary", ["a", "b"]).errors == ["a", "b"]
