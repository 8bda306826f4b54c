"""Render the Grafana dashboard of one run to a PNG from a Prometheus HTTP API (Grafana cannot run here).

It runs the dashboard JSON's own PromQL (helm/finetune-job/dashboards/finetune-job.json), with the
dashboard variables filled in, the way Grafana does for the time range [start, end]: stat panels show
their instant query at `end`, time series panels their range query; the panels are laid out on the
dashboard's own grid.

    python scripts/render_dashboard.py --prometheus http://127.0.0.1:9090 --run-id RUN \\
        --start 1700000000 --end 1700000600 --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parents[1] / "helm" / "finetune-job" / "dashboards" / "finetune-job.json"


def expand(expr: str, run_id: str, rate_interval: str) -> str:
    """A dashboard expression as Grafana sends it: its variables substituted."""
    variables = {"run_id": run_id, "__rate_interval": rate_interval, "datasource": "prometheus"}
    for name, value in variables.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    if "$" in expr:
        raise ValueError(f"unknown variable left in {expr!r}")
    return expr


def panels(dashboard_path: Path = DASHBOARD) -> list[dict]:
    return json.loads(dashboard_path.read_text())["panels"]


def _api(prometheus: str, path: str, **params) -> list[dict]:
    query = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{prometheus.rstrip('/')}/api/v1/{path}?{query}", timeout=60) as r:
        reply = json.loads(r.read())
    if reply["status"] != "success":
        raise ValueError(f"{params['query']}: {reply.get('error')}")
    return reply["data"]["result"]


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    """[{metric, values: [[t, "v"], ...]}] as Grafana's range queries get them."""
    return _api(prometheus, "query_range", query=expr, start=start, end=end, step=step)


def query(prometheus: str, expr: str, at: float) -> list[dict]:
    """An instant query, in query_range's shape (one point per series)."""
    results = _api(prometheus, "query", query=expr, time=at)
    return [{"metric": r["metric"], "values": [r["value"]]} for r in results]


def legend(fmt: str, labels: dict[str, str]) -> str:
    if not fmt or fmt == "__auto":
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def _fmt(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "-"
    if unit == "s":
        if value >= 3600:
            return f"{value / 3600:.1f} h"
        return f"{value / 60:.1f} min" if value >= 60 else f"{value:.1f} s"
    if unit == "percentunit":
        return f"{value:.0%}"
    if unit in ("bytes", "Bps"):
        for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
            if abs(value) < 1024 or prefix == "Ti":
                return f"{value:.3g} {prefix}B" + ("/s" if unit == "Bps" else "")
            value /= 1024
    return f"{value:.4g}"


def render(
    prometheus: str,
    run_id: str,
    start: float,
    end: float,
    out: Path,
    *,
    rate_interval: str = "1m",
    dashboard_path: Path = DASHBOARD,
) -> Path:
    """Query every panel for [start, end] and write the PNG; returns `out`."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["axes.formatter.useoffset"] = False  # Grafana shows plain values, e.g. 1.0986
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    step = max(1.0, (end - start) / 400)
    all_panels = panels(dashboard_path)
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in all_panels)
    fig = plt.figure(figsize=(20, rows * 0.5 + 1))
    grid = fig.add_gridspec(rows, 24, hspace=4.0, wspace=1.5)
    begin, finish = (datetime.fromtimestamp(t, timezone.utc) for t in (start, end))
    fig.suptitle(
        f"finetune-job  ·  run {run_id}  ·  {begin:%Y-%m-%d %H:%M:%S} to {finish:%H:%M:%S} UTC"
        "  (rendered from Prometheus)",
        fontsize=13,
        y=0.995,
    )
    for panel in all_panels:
        g = panel["gridPos"]
        ax = fig.add_subplot(grid[g["y"] : g["y"] + g["h"], g["x"] : g["x"] + g["w"]])
        ax.set_title(panel["title"], fontsize=10, loc="left")
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        unit = defaults.get("unit", "")
        series = []
        for target in panel["targets"]:
            expr = expand(target["expr"], run_id, rate_interval)
            if target.get("instant"):
                results = query(prometheus, expr, end)
            else:
                results = query_range(prometheus, expr, start, end, step)
            for result in results:
                points = [(float(t), float(v)) for t, v in result["values"]]
                series.append((legend(target.get("legendFormat", ""), result["metric"]), points))
        if panel["type"] == "stat":
            _stat(ax, panel, series, unit)
        else:
            _timeseries(ax, series, unit, defaults, (begin, finish), mdates)
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return out


def _stat(ax, panel: dict, series: list, unit: str) -> None:
    ax.set_axis_off()
    mode = panel.get("options", {}).get("textMode", "value")
    lines = []
    for name, points in series:
        finite = [v for _, v in points if math.isfinite(v)]
        if mode == "name":
            lines.append(name)
        elif finite:
            value = _fmt(finite[-1], unit)
            lines.append(f"{name} {value}" if mode == "value_and_name" else value)
    text = "  ".join(lines) or "No data"
    ax.text(
        0.5,
        0.4,
        text,
        ha="center",
        va="center",
        fontsize=16 if len(text) < 14 else 11,
        weight="bold",
        transform=ax.transAxes,
        color="#333" if text != "No data" else "#999",
    )


def _timeseries(ax, series: list, unit: str, defaults: dict, xlim: tuple, mdates) -> None:
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    shown = 0
    for name, points in series:
        flat_zero = all(not math.isfinite(v) or v == 0 for _, v in points)
        if not points or (flat_zero and len(series) > 4):
            continue  # e.g. one all-zero line per S3 operation: draw only the ones with errors
        xs = [datetime.fromtimestamp(t, timezone.utc) for t, _ in points]
        ys = [v if math.isfinite(v) else float("nan") for _, v in points]
        ax.plot(xs, ys, label=name, linewidth=1.5)
        shown += 1
    if not shown:
        ax.text(
            0.5,
            0.5,
            "No data" if not series else "0",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="#999",
        )
    else:
        ax.legend(fontsize=7, loc="best")
    ax.set_xlim(*xlim)
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=2, maxticks=5))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    if unit == "percentunit":
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    elif unit in ("bytes", "Bps", "s"):
        ax.yaxis.set_major_formatter(lambda v, _: _fmt(v, unit))
    if "min" in defaults or "max" in defaults:
        ax.set_ylim(defaults.get("min"), defaults.get("max"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--start", type=float, help="Unix time (default: end - 1 h)")
    parser.add_argument("--end", type=float, help="Unix time (default: now)")
    parser.add_argument("--rate-interval", default="1m", help="what $__rate_interval becomes (default 1m)")
    parser.add_argument("--out", type=Path, default=Path("dashboard.png"))
    args = parser.parse_args()
    end = args.end or time.time()
    start = args.start or end - 3600
    print(render(args.prometheus, args.run_id, start, end, args.out, rate_interval=args.rate_interval))


if __name__ == "__main__":
    main()
