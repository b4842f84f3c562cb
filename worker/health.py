"""`python -m worker.health`: exit 0 if this host's worker announced itself in Redis recently
(the container healthcheck; the same signal /readyz uses)."""

from __future__ import annotations

import socket
import sys

from app.core.settings import get_settings
from app.core.workers import live_workers


def main() -> int:
    hostname = socket.gethostname()
    workers = live_workers(get_settings())
    return 0 if any(name.split("@", 1)[-1] == hostname for name in workers) else 1


if __name__ == "__main__":
    sys.exit(main())
