"""An S3 server (moto) on 127.0.0.1 in its own process, for the benchmarks.

    python bench/s3server.py      # prints its endpoint URL, serves until stdin closes

A process of its own, like a real storage server: the benchmark's clients do not share its
interpreter lock, so parallel GETs are measured against a server that can keep up with them as far as
the machine allows.
"""

from __future__ import annotations

import logging
import sys

from moto.server import ThreadedMotoServer


def main() -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    print(f"http://{host}:{port}", flush=True)
    try:
        sys.stdin.read()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
