"""Debian's Prometheus and Pushgateway on 127.0.0.1, for tests and local runs: each is a context manager
that leaves no process behind. Standard library only, so scripts can use it too."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

PROMETHEUS = "prometheus"
PUSHGATEWAY = "prometheus-pushgateway"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _wait_ready(url: str, process: subprocess.Popen, log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            get(url, timeout=2)
            return
        except urllib.error.HTTPError as e:
            if e.code == 401:  # up, and asking for credentials
                return
            time.sleep(0.2)
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout} s:\n{log_path.read_text()}")


@contextlib.contextmanager
def _process(args: list[str], ready_url: str, workdir: Path):
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_ready(ready_url, process, log_path)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Pushgateway:
    """`prometheus-pushgateway` on 127.0.0.1, in memory only."""

    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"
        self.address = f"127.0.0.1:{port}"

    def metrics_text(self) -> str:
        """What Prometheus would scrape from it."""
        return get(f"{self.url}/metrics").decode()

    def groups(self) -> list[dict]:
        """The pushed groups: [{"labels": {...}, "metrics": {name: family}}] (its /api/v1/metrics)."""
        data = json.loads(get(f"{self.url}/api/v1/metrics"))["data"]
        return [
            {"labels": group["labels"], "metrics": {k: v for k, v in group.items() if isinstance(v, dict)}}
            for group in data
        ]


@contextlib.contextmanager
def pushgateway(workdir: Path | None = None, web_config: str = ""):
    """`web_config`: its --web.config.file's text (basic_auth_users: the readiness check then waits on a 401)."""
    with contextlib.ExitStack() as stack:
        workdir = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pushgateway-")))
        port = free_port()
        args = [
            PUSHGATEWAY,
            f"--web.listen-address=127.0.0.1:{port}",
            "--persistence.file=",
            "--log.level=warn",
        ]
        if web_config:
            (workdir / "web.yml").write_text(web_config)
            args.append(f"--web.config.file={workdir / 'web.yml'}")
        stack.enter_context(_process(args, f"http://127.0.0.1:{port}/-/ready", workdir))
        yield Pushgateway(port)


class Prometheus:
    """A running Prometheus and its HTTP API."""

    def __init__(self, port: int, workdir: Path):
        self.url = f"http://127.0.0.1:{port}"
        self.workdir = workdir

    def api(self, path: str, **params) -> dict | list:
        """GET /api/v1/<path>; returns `data`, raises with Prometheus' error message otherwise."""
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            body = get(f"{self.url}/api/v1/{path}?{query}", timeout=30)
        except urllib.error.HTTPError as exc:
            body = exc.read()
        reply = json.loads(body)
        if reply.get("status") != "success":
            raise ValueError(f"{path} {params}: {reply.get('errorType')}: {reply.get('error')}")
        return reply["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} if at is None else {"query": expr, "time": at}
        return self.api("query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def series(self, match: str, start: float, end: float) -> list[dict]:
        return self.api("series", **{"match[]": match, "start": start, "end": end})

    def wait_for(self, expr: str, timeout: float = 60.0) -> list[dict]:
        """Poll an instant query until it returns something."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expr)
            if result:
                return result
            time.sleep(0.5)
        raise TimeoutError(f"no result for {expr} after {timeout} s")


@contextlib.contextmanager
def prometheus(
    scrape_configs: list[dict],
    rule_files: list[str] = (),
    workdir: Path | None = None,
    evaluation_interval: str = "1s",
):
    """Debian's Prometheus on 127.0.0.1 with these scrape configs (and rule files); its TSDB lives in
    `workdir` (a temporary directory when not given, removed afterwards)."""
    with contextlib.ExitStack() as stack:
        workdir = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="prometheus-")))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": evaluation_interval},
            "rule_files": [str(Path(f).resolve()) for f in rule_files],
            "scrape_configs": scrape_configs,
        }
        # JSON is YAML: no YAML library needed to write the config.
        (workdir / "prometheus.yml").write_text(json.dumps(config, indent=2))
        port = free_port()
        args = [
            shutil.which(PROMETHEUS) or PROMETHEUS,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ]
        stack.enter_context(_process(args, f"http://127.0.0.1:{port}/-/ready", workdir))
        yield Prometheus(port, workdir)


def static_scrape(job: str, *addresses: str, honor_labels: bool = False) -> dict:
    """A scrape config for fixed targets ("host:port")."""
    return {
        "job_name": job,
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "honor_labels": honor_labels,
        "static_configs": [{"targets": list(addresses)}],
    }
