"""octopusd: hierarchical cross-silo federated learning daemons over MQTT and S3."""
from __future__ import annotations

__version__ = "0.1.0"
