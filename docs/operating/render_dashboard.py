#!/usr/bin/env python3
"""Draws the Grafana dashboard's main panels from recorded /metrics scrapes.

Grafana cannot run on the machines this project is built on (no Docker engine), so the picture in
the README is drawn here from a real run's metrics with the same queries the dashboard uses
(rates over counters, histogram_quantile over buckets):

    NS_SCRAPE_DIR=/tmp/scrapes cargo test --test operate -- --ignored record_scrapes
    python3 docs/operating/render_dashboard.py /tmp/scrapes docs/operating/dashboard.png

Needs matplotlib (pip install matplotlib).
"""

import re
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})? (\S+)$')


def parse(text):
    """(name, frozenset(labels)) -> value for every sample line."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = LINE.match(line)
        if not m:
            continue
        labels = frozenset(
            tuple(kv.split("=", 1)) for kv in re.findall(r'[a-zA-Z_]+="[^"]*"', m.group(3) or "")
        )
        labels = frozenset((k, v.strip('"')) for k, v in labels)
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def series(scrapes, name, by=None, where=None):
    """Per label value of `by` (or one series), the summed values of `name` in each scrape."""
    per_scrape = []
    for s in scrapes:
        acc = defaultdict(float)
        for (n, labels), v in s.items():
            if n != name:
                continue
            d = dict(labels)
            if where and any(d.get(k) != val for k, val in where.items()):
                continue
            acc[d.get(by, "") if by else ""] += v
        per_scrape.append(acc)
    keys = set().union(*per_scrape) if per_scrape else set()
    if not by:
        keys.add("")
    return {key: [acc.get(key, 0.0) for acc in per_scrape] for key in keys}


def rate(values, step=1.0, window=5):
    """Per-second increase over a trailing window, as PromQL's rate()."""
    out = []
    for i, _ in enumerate(values):
        j = max(0, i - window)
        out.append((values[i] - values[j]) / (step * (i - j)) if i > j else 0.0)
    return out


def quantile(scrapes, name, q, window=5):
    """histogram_quantile(q, rate(name_bucket[window])) per scrape, in the metric's unit."""
    buckets = []
    for s in scrapes:
        per_le = defaultdict(float)
        for (n, labels), v in s.items():
            if n == name + "_bucket":
                per_le[dict(labels)["le"]] += v
        buckets.append(per_le)
    out = []
    for i, b in enumerate(buckets):
        j = max(0, i - window)
        delta = sorted(
            ((float("inf") if le == "+Inf" else float(le)), b[le] - buckets[j].get(le, 0.0))
            for le in b
        )
        total = delta[-1][1] if delta else 0.0
        if total <= 0:
            out.append(float("nan"))
            continue
        rank, prev_le, prev_c = q * total, 0.0, 0.0
        value = float("nan")
        for le, c in delta:
            if c >= rank:
                if le == float("inf"):
                    value = prev_le
                else:
                    value = prev_le + (le - prev_le) * ((rank - prev_c) / max(c - prev_c, 1e-12))
                break
            prev_le, prev_c = le, c
        out.append(value)
    return out


def main(scrape_dir, png):
    files = sorted(Path(scrape_dir).glob("*.prom"))
    scrapes = [parse(f.read_text()) for f in files]
    t = list(range(len(scrapes)))
    fig, axes = plt.subplots(3, 3, figsize=(15, 10))
    fig.suptitle("neurostream: dashboard panels from a real run (mock broker, PostgreSQL, 800 events/s, 4 partitions)")

    ax = axes[0][0]
    for p, v in sorted(series(scrapes, "neurostream_events_total", by="partition").items()):
        ax.plot(t, rate(v), label=f"partition {p}")
    ax.set_title("events/s per partition")
    ax.legend(fontsize=7)

    ax = axes[0][1]
    for p, v in sorted(series(scrapes, "neurostream_consumer_lag_messages", by="partition").items()):
        ax.plot(t, v, label=f"partition {p}")
    ax.set_title("consumer lag (messages)")
    ax.legend(fontsize=7)

    ax = axes[0][2]
    for q in (0.5, 0.95, 0.99):
        ax.plot(t, [x * 1e3 for x in quantile(scrapes, "neurostream_end_to_end_latency_seconds", q)], label=f"p{int(q * 100)}")
    ax.set_title("end-to-end latency (ms)")
    ax.legend(fontsize=7)

    ax = axes[1][0]
    for q in (0.5, 0.99):
        ax.plot(t, [x * 1e6 for x in quantile(scrapes, "neurostream_processing_latency_seconds", q)], label=f"p{int(q * 100)}")
    ax.set_title("processing time per message (µs)")
    ax.legend(fontsize=7)

    ax = axes[1][1]
    for reason, v in sorted(series(scrapes, "neurostream_dead_letters_total", by="reason").items()):
        if max(v, default=0) > 0:
            ax.plot(t, rate(v), label=reason)
    ax.set_title("dead letters/s by kind")
    ax.legend(fontsize=7)

    ax = axes[1][2]
    ax.plot(t, [x * 1e3 for x in quantile(scrapes, "neurostream_sink_commit_seconds", 0.95)], label="commit p95 (ms)")
    ax.plot(t, quantile(scrapes, "neurostream_sink_batch_rows", 0.5), label="batch rows p50")
    ax.set_title("sink")
    ax.legend(fontsize=7)

    ax = axes[2][0]
    for p, v in sorted(series(scrapes, "neurostream_active_clusters", by="partition").items()):
        ax.plot(t, v, label=f"partition {p}")
    ax.set_title("active clusters")
    ax.legend(fontsize=7)

    ax = axes[2][1]
    for sev, v in sorted(series(scrapes, "neurostream_drift_alerts_total", by="severity").items()):
        ax.plot(t, v, label=sev)
    ax.set_title("drift alerts (total) by severity")
    ax.legend(fontsize=7)

    ax = axes[2][2]
    ax.plot(t, series(scrapes, "neurostream_state_keys")[""], label="keys")
    ax.plot(t, series(scrapes, "neurostream_state_open_windows")[""], label="open windows")
    ax2 = ax.twinx()
    ax2.plot(t, [x / 1024 for x in series(scrapes, "neurostream_checkpoint_bytes")[""]], "k--", label="checkpoints (KiB)")
    ax.set_title("state size (sum over partitions)")
    ax.legend(fontsize=7, loc="upper left")
    ax2.legend(fontsize=7, loc="lower right")

    for row in axes:
        for ax in row:
            ax.set_xlabel("seconds", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    print(f"wrote {png} from {len(scrapes)} scrapes")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
