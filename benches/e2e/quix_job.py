"""The Quix Streams peer of the end-to-end benchmark (`benches/e2e/run.py` starts it).

The same job as neurostream's and the Kafka Streams peer's: per message key (the producer keys
every event by its JSON `key`), a 1 s tumbling event-time window (event time from the JSON `ts`,
grace 0) with count, sum, mean, min and max of `value`, emitted once per window when it closes
(`final()`), written as JSON to the output topic. Quix's defaults otherwise (at-least-once,
RocksDB state with changelog topics), `auto_offset_reset="earliest"` and a 100 ms commit interval
so that the harness can measure it from the group's committed offsets.

    python quix_job.py --brokers B --input T --output O --group G --state-dir DIR [--expected N]

Prints JSON lines: `{"event":"running",...}` once the dataframe is built and, when `--expected`
is given, `{"event":"consumed","n":N,"first_ms":..,"last_ms":..}` after the N-th input record
(wall-clock epoch milliseconds of the first and the N-th record reaching the window step). Runs
until SIGTERM.
"""

import argparse
import json
import sys
import time

from quixstreams import Application
from quixstreams.dataframe.windows import Count, Max, Mean, Min, Sum


def event_time(value, headers, timestamp, timestamp_type) -> int:
    """Event time in epoch milliseconds: the event's numeric `ts`, else the Kafka timestamp."""
    ts = value.get("ts") if isinstance(value, dict) else None
    return int(ts) if isinstance(ts, (int, float)) else timestamp


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--commit-interval", type=float, default=0.1)
    parser.add_argument("--expected", type=int, default=0)
    args = parser.parse_args()

    app = Application(
        broker_address=args.brokers,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        commit_interval=args.commit_interval,
        state_dir=args.state_dir,
        loglevel="WARNING",
    )
    source = app.topic(args.input, value_deserializer="json", timestamp_extractor=event_time)
    sink = app.topic(args.output, value_serializer="json")

    seen = {"n": 0, "first_ms": 0}

    def count_input(value):
        seen["n"] += 1
        if seen["n"] == 1:
            seen["first_ms"] = int(time.time() * 1000)
        if seen["n"] == args.expected:
            print(json.dumps({"event": "consumed", "n": seen["n"], "first_ms": seen["first_ms"],
                              "last_ms": int(time.time() * 1000)}), flush=True)

    sdf = app.dataframe(source)
    if args.expected > 0:
        sdf = sdf.update(count_input)
    sdf = (
        sdf.tumbling_window(duration_ms=1000, grace_ms=0)
        .agg(count=Count(), sum=Sum("value"), mean=Mean("value"), min=Min("value"),
             max=Max("value"))
        .final()
    )
    sdf = sdf.to_topic(sink)
    print(json.dumps({"event": "running", "input": args.input, "output": args.output,
                      "group": args.group}), flush=True)
    app.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
