"""Serving ``/metrics``: what the recording processes wrote (:class:`ProcessFiles`), and for
``hipchat-poller metrics`` what the stores hold (:class:`worker.metrics_store.StoreCollector`).

``prometheus_client`` is imported inside the functions only: the process that serves may be a
worker, which should choose its mode first (:mod:`worker.metrics_process`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from storage.errors import ValidationError
from worker.metrics_process import alive, group_pid, groups

LIVE_GAUGE = "gauge_live"


class ProcessFiles:
    """A collector of the multiprocess files under ``root``: every group of a live process
    (or only ``group``), merged as ``prometheus_client`` merges one directory, each sample
    labelled with its group (``process="worker-4242"``)."""

    def __init__(self, root: Path, group: Path | None = None) -> None:
        self.root = root
        self.group = group

    def collect(self) -> Iterable[Any]:
        from prometheus_client.metrics_core import Metric
        from prometheus_client.multiprocess import MultiProcessCollector

        merged: dict[str, Any] = {}
        for group in [self.group] if self.group is not None else groups(self.root):
            if self.group is None and not alive(group_pid(group)):
                continue  # gone: the next process to start removes it
            try:
                found = MultiProcessCollector.merge(_files(group))  # type: ignore[no-untyped-call]
            except FileNotFoundError:  # removed while we read it
                continue
            for metric in found:
                into = merged.get(metric.name)
                if into is None:
                    into = merged[metric.name] = Metric(
                        metric.name, metric.documentation, metric.type
                    )
                into.samples += [
                    s._replace(labels={**s.labels, "process": group.name}) for s in metric.samples
                ]
        return list(merged.values())


def _files(group: Path) -> list[str]:
    """The group's files, less the live gauges of processes that died without saying so (a
    prefork child killed outright, say)."""
    found = []
    for path in group.glob("*.db"):
        if path.name.startswith(LIVE_GAUGE):
            pid = path.stem.rpartition("_")[2]
            if not (pid.isdigit() and alive(int(pid))):
                continue
        found.append(str(path))
    return sorted(found)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class MetricsServer:
    """``/metrics`` over HTTP in a daemon thread. :meth:`bind` takes the port (bad input, one
    line, if it cannot); :meth:`start` serves."""

    def __init__(self, httpd: WSGIServer, host: str) -> None:
        self.httpd = httpd
        self.host = host
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @classmethod
    def bind(cls, host: str, port: int, collectors: Iterable[Any]) -> MetricsServer:
        import socket
        from socketserver import ThreadingMixIn
        from wsgiref.simple_server import make_server

        from prometheus_client import CollectorRegistry, make_wsgi_app

        registry = CollectorRegistry(auto_describe=False)
        for collector in collectors:
            registry.register(collector)
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

            class Server(ThreadingMixIn, WSGIServer):
                address_family = family
                daemon_threads = True

            httpd = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_Quiet)
        except OSError as exc:  # taken, not ours to take, or no such address
            reason = exc.strerror or str(exc)
            raise ValidationError(f"cannot listen on {host}:{port}: {reason}") from None
        return cls(httpd, host)

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
        self.httpd.server_close()
