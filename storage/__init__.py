"""Persistent state: SQLAlchemy models, Alembic migrations, token encryption, repositories.

One module per noun (``connections``, ``subscriptions``, ``watermarks``, ``rooms``,
``outbox``); each exposes plain functions that take a ``Session`` first. ``db`` owns the
engine, the session scope, migrations, and the translation of SQLAlchemy errors into
:mod:`storage.errors`. See docs/storage.md.
"""
