"""Prometheus metrics of kata-ipud, on an optional loopback HTTP endpoint.

Names follow Prometheus conventions (``kata_ipu_`` prefix, base units, ``_total`` counters)
and carry no per-container or per-digest labels, so cardinality stays fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_PREPARE_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


@dataclass
class Metrics:
    registry: CollectorRegistry
    prepare_seconds: Histogram
    pull_bytes: Counter
    builds: Counter
    volumes: Gauge
    pool_bytes: Gauge
    images: Gauge
    spares: Gauge

    @classmethod
    def create(cls) -> Metrics:
        reg = CollectorRegistry()
        return cls(
            registry=reg,
            prepare_seconds=Histogram(
                "kata_ipu_prepare_seconds", "Time to prepare a container rootfs",
                ["result", "path"], buckets=_PREPARE_BUCKETS, registry=reg),
            pull_bytes=Counter("kata_ipu_pull_bytes_total",
                               "Compressed bytes fetched from registries", registry=reg),
            builds=Counter("kata_ipu_base_builds_total", "Base block images built",
                           ["result"], registry=reg),
            volumes=Gauge("kata_ipu_volumes", "Prepared rootfs volumes", registry=reg),
            pool_bytes=Gauge("kata_ipu_pool_bytes", "Bytes used in the block pool",
                             registry=reg),
            images=Gauge("kata_ipu_images", "Images in the store", registry=reg),
            spares=Gauge("kata_ipu_warm_spares", "Idle exported spare clones (warm pool)",
                         registry=reg),
        )

    def serve(self, address: str) -> None:
        """Expose ``/metrics`` on ``HOST:PORT`` (the config insists on loopback)."""
        host, _, port = address.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
