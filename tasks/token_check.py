"""What a connection's token can do, asked of HipChat with one cheap call.

``GET /v2/room?auth_test=true`` (:meth:`HipChatClient.auth_test`) runs HipChat's token and
scope checks for listing rooms and stops there (202): no room list is built or paged. The
call passes the connection's budget like every other.

=========================  =====================================================
HipChat answers             :func:`check_token`
=========================  =====================================================
202                         returns (the token is valid and has ``view_group``)
401                         :class:`AuthFailed`: invalid, expired or revoked
403                         :class:`Forbidden`: valid, but lacks the scope
404                         :class:`NotFound`: the base URL is not a HipChat API
5xx, timeout, refused       :class:`RetryLater` as the client raised it
=========================  =====================================================
"""

from __future__ import annotations

from storage.errors import AuthFailed, Forbidden, NotFound
from tasks.runtime import Runtime

VALID = "the token is valid (HipChat accepted it for GET /v2/room, scope view_group)"


def check_token(rt: Runtime, connection_id: int, base_url: str, token: str) -> str:
    """Return :data:`VALID`, or raise what is wrong (see the module docstring). No message
    quotes the token."""
    with rt.client(connection_id, base_url, token) as client:
        try:
            accepted = client.auth_test()
        except Forbidden as exc:
            raise Forbidden(f"the token is valid but lacks a scope: {exc}", 403) from exc
        except NotFound as exc:
            raise NotFound(f"{base_url} does not look like a HipChat API: {exc}", 404) from exc
    if not accepted:
        raise AuthFailed("HipChat refused the token (401): it is invalid, expired or revoked", 401)
    return VALID
