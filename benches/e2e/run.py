#!/usr/bin/env python3
"""End-to-end benchmark: neurostream against a bare consumer, Kafka Streams and Quix Streams.

    python3 benches/e2e/run.py [--events 500000] [--dimension 8] [--keys 100] [--partitions 2]
        [--rate 10000] [--latency-seconds 30] [--systems neurostream,bare,kstreams,quix]
        [--profiles throughput,balanced,latency] [--rounds 1] [--out docs/bench]

Everything runs on this machine, through real processes: one Apache Kafka 4.3.1 broker (KRaft,
the Maven Central jars of `.ci/install-kafka.sh`, 1 GB heap) and one private PostgreSQL 15
(run as `postgres`, fsync on: durability is part of what is measured), both in a temporary
directory on free ports and stopped at the end whatever happens. Set-up is idempotent and cached
under ~/.cache/neurostream/: a venv with confluent-kafka, quixstreams and matplotlib (the script
re-executes itself in it), the Kafka jars, `target/release/neurostream` and the `bare_consumer`
example (built only while no other cargo runs), and the Kafka Streams peer jar
(`benches/e2e/kstreams`, skipped with a note when absent).

Data: one fixed data set per run, `neurostream produce` with --seed 42 --start-ts 2026-01-01
(event time advances --step-ms per event), N events of d features over K keys, event n to
partition n mod P, as fast as the producer goes (throughput profile), into a fresh topic that
every system then reads from the beginning, each in its own consumer group, writing to its own
output topics. --step-ms sets how many events a window holds, and so how many outputs each event
makes: at the default 5 ms, 100 keys and 2 partitions a 1 s window holds 1-2 events per key
(~0.6 window rows per event, each to Kafka and PostgreSQL); at 0.05 ms about 100 (~0.01).

The job: a 1 s tumbling event-time window (grace 0) per key with count/sum/mean/min/max of
`value`, final results only. neurostream additionally clusters every event (NCS, the default
algorithm) and writes every output to PostgreSQL in one transaction with its checkpoint.

Throughput phase (per system; neurostream once per profile). Measured the same way for all:
    events/s = (N - 1) / (t_N - t_1), where t_1 is when the first input record was consumed and
    t_N when the N-th input record was done:
    - bare consumer, Quix Streams: their own report (wall-clock ms of the 1st and the N-th record
      reaching the consumer loop / the step before the window);
    - Kafka Streams: its own report of the 1st and N-th record (the peer groups by the Kafka
      key, which is the JSON key: no repartition topic, so the window step runs in the same
      task right after the report's step);
    - neurostream: t_1 = the first 20 ms poll of /metrics showing a consumed message, t_N = the
      first 20 ms poll of /status whose durable next offsets (outputs acknowledged by Kafka AND
      committed to PostgreSQL with the checkpoint) sum to N: a stricter end than "consumed".
    As a cross-check each system's group progress is polled every 50 ms (committed offsets
    through the admin API; neurostream's durable offsets) and that rate, from the first progress
    to N, is in the table too ("cross-check").
    CPU-s per M events = utime+stime of the system's own process tree (/proc, sampled every
    50 ms and interpolated) between t_1 and t_N, per million events; the broker's and
    PostgreSQL's CPU is not included for anyone. Peak RSS = VmHWM summed over the process tree.
    Ratio = events/s over the bare consumer's. neurostream's /metrics at the end of each run
    (sink transactions, their mean time, backpressure pauses, checkpoint bytes) are reported.
    The output counts are checked against the closed windows computed from the data set.
    With --rounds R the phase runs R times over the same data set (fresh groups, databases and
    output topics each round; neurostream's profiles in rotated order, so none always runs
    first), and each row is its system's median run by events/s (the upper one of two middles
    when R is even), with every round's rate listed beside it: one phase on the 0.05 ms data
    lasts about 4 s, and single runs of one build spread by +-15 % on this 2-core machine.

Latency phase (per neurostream profile): a fresh input topic, the service started and ready
(/ready 200), then `neurostream produce --rate R` for --latency-seconds (latency profile
producer with `linger.ms` = --producer-linger-ms, 5 by default, the default of librdkafka and of
the Java client since Kafka 4.0: on this 2-core machine 1 ms cost the producer alone 53 % of a
core at 10,000 events/s against 23 % at 5 ms, 0 ms 63 %; its pacing per 100 ms is reported),
while a consumer in this script reads
every output topic with its headers. The windows emit `update` (an update per processing batch,
then the final), so every flush produces output. Latency of input event (p, o) = receive time
(this host's clock) of the first output message with `neurostream.source.partition` = p and
`neurostream.source.offset` >= o, minus the event's CreateTime (set by the producer when it
sends; millisecond resolution). The part up to that output's own CreateTime (when neurostream
produced it) is reported beside it. The first 2 s of sending are dropped as warm-up. When the
service falls behind the offered rate the run says so (the latencies are then queueing). The
broker floor is the same producer into a topic read by a plain consumer (send -> receive).

Output: results.md, results.json, throughput.png, latency_cdf.png under --out (--report-only
re-renders the Markdown and the plots from an existing results.json). The two binaries are
copied into the work dir at the start, so a rebuild of target/release during the run does not
mix binaries; their build time, hash and the git state are recorded. --keep keeps the work dir
(every child's log; latency-<profile>.tsv: each measured event's send time and latencies;
ns-tp-<profile>-progress.tsv: the throughput phase's 20 ms samples of CPU and durable events;
<name>-metrics.txt: the service's /metrics at the end of each run; the throughput phase's files
of round 2 and on end in -r2 and so on). Failures of one system are reported as "failed: reason"
and the others still run. The load average, the whole machine's busy cores (/proc/stat) and any cargo process
seen during each measurement are recorded: on a 2-core machine anything else running (a build,
a test) changes every number here.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import bisect
import dataclasses
import datetime as dt
import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[2]
CACHE = Path.home() / ".cache" / "neurostream"
VENV = CACHE / "bench-venv"
VENV_PACKAGES = ["confluent-kafka", "quixstreams", "matplotlib"]
NEUROSTREAM = REPO / "target" / "release" / "neurostream"
BARE = REPO / "target" / "release" / "examples" / "bare_consumer"
KSTREAMS_DIR = REPO / "benches" / "e2e" / "kstreams"
KSTREAMS_JAR = KSTREAMS_DIR / "target" / "kstreams-peer.jar"
QUIX_JOB = REPO / "benches" / "e2e" / "quix_job.py"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
SEED = 42
START_TS = 1767225600000  # 2026-01-01T00:00:00Z: the data set's first event time
WARMUP_S = 2.0
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class BenchError(Exception):
    """A step that did not happen, with what was seen instead."""


# --------------------------------------------------------------------------------------------
# Set-up (idempotent, cached under ~/.cache/neurostream)
# --------------------------------------------------------------------------------------------

def ensure_venv() -> None:
    """Creates the venv once, installs the packages once, and re-executes this script in it."""
    py = VENV / "bin" / "python"
    marker = VENV / ".bench-packages"
    if not py.exists():
        log(f"creating the venv {VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if not marker.exists() or marker.read_text().split() != VENV_PACKAGES:
        log(f"installing {' '.join(VENV_PACKAGES)} into the venv")
        subprocess.run([str(py), "-m", "pip", "install", "-q", *VENV_PACKAGES], check=True)
        marker.write_text(" ".join(VENV_PACKAGES))
    if Path(sys.prefix).resolve() != VENV.resolve():
        os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])


def cargo_running() -> bool:
    return subprocess.run(["pgrep", "-x", "cargo"], stdout=subprocess.DEVNULL).returncode == 0


def ensure_binaries(rebuild: bool) -> None:
    """`cargo build --release` of the service and the bare consumer, only while no other cargo
    runs (the machine has 2 cores and other builds share them); skipped when both are built and
    --rebuild is not given."""
    if NEUROSTREAM.exists() and BARE.exists() and not rebuild:
        log(f"using the built {NEUROSTREAM.relative_to(REPO)} and {BARE.relative_to(REPO)}")
        return
    waited = time.time()
    while cargo_running():
        if time.time() - waited > 1800:
            raise BenchError("another cargo process kept running for 30 min; not building")
        time.sleep(5)
    log("cargo build --release --bin neurostream --example bare_consumer")
    subprocess.run(["cargo", "build", "--release", "--bin", "neurostream", "--example",
                    "bare_consumer"], cwd=REPO, check=True)


def ensure_kafka_libs() -> Path:
    out = subprocess.run(["bash", str(REPO / ".ci" / "install-kafka.sh")], cwd=REPO,
                         check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    return Path(out.splitlines()[-1])


def maven_running() -> bool:
    return subprocess.run(["pgrep", "-f", "plexus.classworlds.launcher"],
                          stdout=subprocess.DEVNULL).returncode == 0


def ensure_kstreams_jar() -> Optional[str]:
    """Builds the Kafka Streams peer when the jar is missing or older than its sources (waiting
    for a Maven build already running, e.g. the peer's author's, rather than racing it in the
    same target/). Returns None when the jar is usable, else why not."""
    pom = KSTREAMS_DIR / "pom.xml"
    if not pom.exists():
        return f"{pom.relative_to(REPO)} is not there (yet)"
    waited = time.time()
    while maven_running() and time.time() - waited < 300:
        time.sleep(2)
    sources = [pom, *(p for p in (KSTREAMS_DIR / "src").rglob("*") if p.is_file())]
    newest = max(p.stat().st_mtime for p in sources)
    if not KSTREAMS_JAR.exists() or KSTREAMS_JAR.stat().st_mtime < newest:
        if maven_running():
            if KSTREAMS_JAR.exists():
                log("another Maven build of the peer is still running: using the existing jar")
                return None
            return "another Maven build is running and there is no jar yet"
        log("mvn -q -f benches/e2e/kstreams/pom.xml package")
        r = subprocess.run(["mvn", "-B", "-q", "-f", str(pom), "package", "-DskipTests"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if r.returncode != 0:
            out = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout)
            errors = [l for l in out.splitlines() if l.startswith("[ERROR]") and len(l) > 10]
            return "mvn package failed: " + (errors[0] if errors else out[-300:]).strip()
    if not KSTREAMS_JAR.exists():
        return f"{KSTREAMS_JAR.relative_to(REPO)} was not built"
    return None


# --------------------------------------------------------------------------------------------
# Child processes: each in its own process group, all killed at the end
# --------------------------------------------------------------------------------------------

class Children:
    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def spawn(self, name: str, argv: list[str], logfile: Path, env: Optional[dict] = None,
              user: Optional[str] = None, cwd: Optional[Path] = None) -> subprocess.Popen:
        out = open(logfile, "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env=env, user=user, cwd=cwd)
        out.close()
        self.procs.append((name, p))
        return p

    @staticmethod
    def stop(p: subprocess.Popen, timeout: float = 30.0, sig: int = signal.SIGTERM) -> Optional[int]:
        """SIGTERM to the process group, then SIGKILL after `timeout`; returns the exit code."""
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)  # whatever is left of the group
        except (ProcessLookupError, PermissionError):
            pass
        try:
            return p.wait(5)
        except subprocess.TimeoutExpired:
            return None

    def kill_all(self) -> None:
        for _, p in reversed(self.procs):
            if p.poll() is not None:
                continue  # reaped: its pid (and group id) may belong to someone else by now
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for _, p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass


CHILDREN = Children()


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tail(path: Path, chars: int = 800) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return text[-chars:].strip()


class LogEvents:
    """The JSON-object lines a child prints to its log, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos, self.partial = path, 0, b""
        self.events: list[dict] = []

    def poll(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
                self.pos += len(chunk)
        except OSError:
            return self.events
        lines = (self.partial + chunk).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            line = line.strip()
            if line.startswith(b"{"):
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    pass
        return self.events


def wait_for(what: str, check: Callable[[], object], timeout: float, interval: float = 0.1,
             alive: Optional[subprocess.Popen] = None, why: Callable[[], str] = lambda: "") -> object:
    """Polls `check` until it returns something truthy; raises naming what did not happen."""
    deadline = time.time() + timeout
    while True:
        got = check()
        if got:
            return got
        if alive is not None and alive.poll() is not None:
            raise BenchError(f"{what}: the process exited with {alive.returncode}; {why()}")
        if time.time() > deadline:
            raise BenchError(f"{what} within {timeout:.0f} s; {why()}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# Infrastructure: Apache Kafka (KRaft) and PostgreSQL
# --------------------------------------------------------------------------------------------

LOG4J2 = """status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
"""

# With --broker-request-log: every request the broker completes, with where its time went
# (queue for a request thread, local work, response queue, send), to kafka/request.log.
REQUEST_LOG4J2 = """appender.req.type = File
appender.req.name = REQ
appender.req.fileName = {path}
appender.req.layout.type = PatternLayout
appender.req.layout.pattern = [%d] %m%n
logger.req.name = kafka.request.logger
logger.req.level = DEBUG
logger.req.additivity = false
logger.req.appenderRef.req.ref = REQ
"""


class KafkaBroker:
    """One combined broker+controller JVM on loopback."""

    def __init__(self, root: Path, libs: Path, request_log: bool = False) -> None:
        self.dir = root / "kafka"
        self.request_log = request_log
        (self.dir / "data").mkdir(parents=True)
        self.libs = libs
        self.port, self.cport = free_ports(2)
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.log = self.dir / "server.log"
        self.proc: Optional[subprocess.Popen] = None

    def java(self, opts: list[str]) -> list[str]:
        return ["java", *opts, f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
                "-cp", f"{self.libs}/*"]

    def start(self) -> None:
        log4j2 = LOG4J2
        if self.request_log:
            log4j2 += REQUEST_LOG4J2.format(path=self.dir / "request.log")
        (self.dir / "log4j2.properties").write_text(log4j2)
        props = self.dir / "server.properties"
        props.write_text(f"""process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{self.cport}
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.cport}
advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={self.dir / 'data'}
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.ms=-1
""")
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        fmt = subprocess.run(
            self.java(["-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"])
            + ["kafka.tools.StorageTool", "format", "--config", str(props), "--cluster-id",
               cluster_id], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
        if fmt.returncode != 0:
            raise BenchError(f"kafka storage format failed: {fmt.stdout[-600:]}")
        self.proc = CHILDREN.spawn("kafka", self.java(["-Xms1g", "-Xmx1g", f"-Xlog:gc:file={self.dir / 'gc.log'}:utctime"]) + ["kafka.Kafka", str(props)],
                                   self.log)
        from confluent_kafka.admin import AdminClient
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})

        def answers():
            try:
                return bool(admin.list_topics(timeout=1).brokers)
            except Exception:  # noqa: BLE001 - not up yet
                return False

        wait_for("the Kafka broker never answered metadata", answers, 120, 0.5, self.proc,
                 lambda: "log tail: " + tail(self.log))

    def stop(self) -> None:
        if self.proc is not None:
            Children.stop(self.proc, 20)


class Postgres:
    """A private PostgreSQL 15 as the `postgres` user (initdb refuses root), fsync on."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "pg"
        self.dir.mkdir()
        self.port = free_ports(1)[0]
        self.log = self.dir / "postgres.log"
        self.proc: Optional[subprocess.Popen] = None
        self.user = "postgres" if os.geteuid() == 0 else None

    def start(self) -> None:
        if not (PG_BIN / "initdb").exists():
            raise BenchError(f"no PostgreSQL 15 binaries in {PG_BIN} (apt-get install -y postgresql-15)")
        if self.user:
            shutil.chown(self.dir, self.user, self.user)
            self.log.touch()
            shutil.chown(self.log, self.user, self.user)
        r = subprocess.run([str(PG_BIN / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres",
                            "--auth=trust", "-E", "UTF8"], user=self.user, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=120)
        if r.returncode != 0:
            raise BenchError(f"initdb failed: {r.stdout[-600:]}")
        self.proc = CHILDREN.spawn("postgres", [
            str(PG_BIN / "postgres"), "-D", str(self.dir / "data"), "-k", str(self.dir),
            "-p", str(self.port), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"],
            self.log, user=self.user)

        def ready():
            return subprocess.run([str(PG_BIN / "pg_isready"), "-q", "-h", "127.0.0.1", "-p",
                                   str(self.port)]).returncode == 0

        wait_for("PostgreSQL never accepted connections", ready, 60, 0.2, self.proc,
                 lambda: "log tail: " + tail(self.log))

    def create_database(self, name: str) -> str:
        r = subprocess.run([str(PG_BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                            "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qc",
                            f'CREATE DATABASE "{name}"'], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=60)
        if r.returncode != 0:
            raise BenchError(f"CREATE DATABASE {name} failed: {r.stdout.strip()}")
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc is not None:
            Children.stop(self.proc, 20, signal.SIGINT)  # SIGINT: PostgreSQL's fast shutdown


# --------------------------------------------------------------------------------------------
# Kafka helpers (confluent-kafka)
# --------------------------------------------------------------------------------------------

class Kafka:
    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka.admin import AdminClient
        self.bootstrap = bootstrap
        self.admin = AdminClient({"bootstrap.servers": bootstrap, "log.connection.close": False,
                                  "log_level": 2})

    def create_topics(self, names: list[str], partitions: int) -> None:
        from confluent_kafka.admin import NewTopic
        futures = self.admin.create_topics([NewTopic(n, partitions, 1) for n in names],
                                           operation_timeout=30)
        for name, f in futures.items():
            f.result(timeout=60)
        wait_for(f"topics {names} never showed in metadata",
                 lambda: all(n in self.admin.list_topics(timeout=5).topics for n in names), 30)

    def committed(self, group: str, topic: str, partitions: int) -> int:
        """The sum of the group's committed offsets on `topic` (0 where none)."""
        from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
        req = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in range(partitions)])
        res = self.admin.list_consumer_group_offsets([req], request_timeout=5)
        total = 0
        for f in res.values():
            for tp in f.result(timeout=5).topic_partitions:
                total += max(tp.offset, 0)
        return total

    def high_watermarks(self, topic: str) -> dict[int, int]:
        from confluent_kafka import Consumer, TopicPartition
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:8]}"})
        try:
            parts = c.list_topics(topic, timeout=10).topics[topic].partitions
            return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        finally:
            c.close()

    def message_counts(self, topics: list[str]) -> dict[str, int]:
        """Messages in each topic (sum of the partitions' high minus low watermarks)."""
        from confluent_kafka import Consumer, TopicPartition
        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"probe-{uuid.uuid4().hex[:8]}"})
        try:
            md = c.list_topics(timeout=10).topics
            counts = {}
            for t in topics:
                if t not in md:
                    continue
                n = 0
                for p in md[t].partitions:
                    lo, hi = c.get_watermark_offsets(TopicPartition(t, p), timeout=10)
                    n += hi - lo
                counts[t] = n
            return counts
        finally:
            c.close()


# --------------------------------------------------------------------------------------------
# Sampling a process tree: CPU (utime+stime), VmHWM, and a progress function
# --------------------------------------------------------------------------------------------

def tree_pids(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def proc_cpu_hwm(pid: int) -> Optional[tuple[float, int]]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        hwm = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
        return cpu, hwm
    except (OSError, IndexError, ValueError):
        return None


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat, idle and iowait
    excluded)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Sampler(threading.Thread):
    """Every `interval` s: the tree's CPU seconds and VmHWM, and `progress()`; every second,
    whether any cargo process runs."""

    def __init__(self, pid: int, progress: Optional[Callable[[], Optional[int]]] = None,
                 interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.progress, self.interval = pid, progress, interval
        self.cpu_by_pid: dict[int, float] = {}
        self.hwm_by_pid: dict[int, int] = {}
        self.samples: list[tuple[float, float, Optional[int]]] = []  # (t, cpu_s, progress)
        self.machine: list[tuple[float, float]] = []  # (t, machine busy CPU-s)
        self.cargo_seen = False
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        last_cargo = 0.0
        while not self._stop_event.is_set():
            t = time.time()
            for p in tree_pids(self.pid):
                got = proc_cpu_hwm(p)
                if got:
                    self.cpu_by_pid[p] = got[0]
                    self.hwm_by_pid[p] = max(self.hwm_by_pid.get(p, 0), got[1])
            prog = None
            if self.progress is not None:
                try:
                    prog = self.progress()
                except Exception as e:  # noqa: BLE001 - a failed poll is a missing sample
                    if len(self.errors) < 5:
                        self.errors.append(str(e))
            self.samples.append((t, sum(self.cpu_by_pid.values()), prog))
            self.machine.append((t, machine_busy_s()))
            if t - last_cargo >= 1.0:
                last_cargo = t
                self.cargo_seen |= cargo_running()
            self._stop_event.wait(max(0.0, self.interval - (time.time() - t)))

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)

    def last_progress(self) -> Optional[int]:
        for _, _, p in reversed(self.samples):
            if p is not None:
                return p
        return None

    def machine_at(self, t: float) -> float:
        """Cumulative busy CPU seconds of the whole machine at time t."""
        return self.cpu_at(t, [(x[0], x[1], None) for x in self.machine])

    def cpu_at(self, t: float, samples: Optional[list] = None) -> float:
        """Cumulative CPU seconds of the tree at time t (linear between samples)."""
        s = self.samples if samples is None else samples
        if not s:
            return 0.0
        i = bisect.bisect_left([x[0] for x in s], t)
        if i <= 0:
            return s[0][1]
        if i >= len(s):
            return s[-1][1]
        (t0, c0, _), (t1, c1, _) = s[i - 1], s[i]
        return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)

    def peak_rss_mb(self) -> float:
        return sum(self.hwm_by_pid.values()) / 1024

    def observed_span(self, n: int) -> Optional[tuple[float, int, float]]:
        """(t at first progress > 0, progress then, t at first progress >= n)."""
        first = None
        for t, _, p in self.samples:
            if p is None:
                continue
            if first is None and p > 0:
                first = (t, p)
            if p >= n and first is not None:
                return first[0], first[1], t
        return None


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ThroughputResult:
    system: str
    profile: str = ""
    status: str = "ok"
    events: int = 0
    events_per_s: Optional[float] = None
    basis: str = ""
    seconds: Optional[float] = None
    cpu_s_per_m: Optional[float] = None
    peak_rss_mb: Optional[float] = None
    ratio_to_bare: Optional[float] = None
    own_cores: Optional[float] = None  # the system's CPU over the span, in cores
    machine_busy_cores: Optional[float] = None  # the whole machine's (everything: broker, PG, others)
    observed_events_per_s: Optional[float] = None
    rounds: list = dataclasses.field(default_factory=list)  # events/s of every round (None: failed)
    outputs: dict = dataclasses.field(default_factory=dict)
    internals: dict = dataclasses.field(default_factory=dict)  # neurostream's /metrics at the end
    cargo_overlap: bool = False
    load_before: list = dataclasses.field(default_factory=list)
    load_after: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.system} ({self.profile})" if self.profile else self.system


@dataclasses.dataclass
class LatencyResult:
    name: str
    status: str = "ok"
    rate: int = 0
    sent: int = 0
    measured: int = 0
    uncovered: int = 0
    p50_ms: Optional[float] = None
    p95_ms: Optional[float] = None
    p99_ms: Optional[float] = None
    max_ms: Optional[float] = None
    mean_ms: Optional[float] = None
    send_rate_max_100ms: Optional[float] = None
    send_rate_min_100ms: Optional[float] = None
    outputs_received: int = 0
    drain_s: Optional[float] = None  # last event sent -> its output received
    machine_busy_cores: Optional[float] = None  # the whole machine's CPU while sending
    # send -> the covering output's own CreateTime (when neurostream produced it)
    p50_to_output_created_ms: Optional[float] = None
    p99_to_output_created_ms: Optional[float] = None
    internals: dict = dataclasses.field(default_factory=dict)  # neurostream's /metrics at the end
    cargo_overlap: bool = False
    load_before: list = dataclasses.field(default_factory=list)
    load_after: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    cdf: list = dataclasses.field(default_factory=list, repr=False)  # sorted latencies (ms), thinned


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    root: Path
    kafka: Kafka
    pg: Postgres
    run_id: str
    input_topic: str = ""
    suffix: str = ""  # of the throughput phase's file names: "-r2" in the second round


def neurostream_config(ctx: Context, path: Path, *, profile: str, group: str, input_topic: str,
                       prefix: str, db_url: str, http_port: int, emit: str) -> Path:
    topics = "\n".join(f'{t} = "{prefix}.{t}"'
                       for t in ("clusters", "drift", "outliers", "windows", "status", "dlq"))
    path.write_text(f"""profile = "{profile}"

[kafka]
brokers = "{ctx.kafka.bootstrap}"
group_id = "{group}"
input_topics = ["{input_topic}"]
create_topics = true
topic_partitions = {ctx.args.partitions}
topic_replication_factor = 1

[kafka.topics]
{topics}

[postgres]
url = "{db_url}"

[http]
address = "127.0.0.1:{http_port}"

[log]
level = "info"

[processing]
dimension = {ctx.args.dimension}

[processing.clustering]
enabled = true

[[processing.windows]]
kind = "tumbling"
size_ms = 1000
grace_ms = 0
emit = "{emit}"
""")
    return path


def output_topic_names(prefix: str) -> list[str]:
    return [f"{prefix}.{t}" for t in ("clusters", "drift", "outliers", "windows", "status", "dlq")]


def produce_config(ctx: Context, path: Path, profile: str, topic: str,
                   linger_ms: Optional[int] = None) -> Path:
    linger = "" if linger_ms is None else f"linger_ms = {linger_ms}\n"
    path.write_text(f'profile = "{profile}"\n[kafka]\nbrokers = "{ctx.kafka.bootstrap}"\n{linger}'
                    f'input_topics = ["{topic}"]\n[log]\nlevel = "warn"\n')
    return path


def service_env(ctx: Context) -> Optional[dict]:
    """The service's environment: this one plus --service-env (settings to try, e.g.
    NEUROSTREAM__KAFKA__FETCH_MIN_BYTES=65536; the load generator does not get them)."""
    if not ctx.args.service_env:
        return None
    env = dict(os.environ)
    for item in ctx.args.service_env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--service-env wants KEY=VALUE, not {item!r}")
        env[key] = value
    return env


def produce(ctx: Context, topic: str, events: int, rate: int, profile: str, start_ts: Optional[int],
            name: str, linger_ms: Optional[int] = None,
            step_ms: Optional[float] = None) -> subprocess.Popen:
    cfg = produce_config(ctx, ctx.root / f"produce-{name}.toml", profile, topic, linger_ms)
    argv = [str(NEUROSTREAM), "--config", str(cfg), "produce", "--topic", topic,
            "--events", str(events), "--rate", str(rate), "--seed", str(SEED),
            "--dimension", str(ctx.args.dimension), "--keys", str(ctx.args.keys),
            "--partitions", str(ctx.args.partitions)]
    if start_ts is not None:
        argv += ["--start-ts", str(start_ts)]
    if step_ms is not None:
        argv += ["--step-ms", str(step_ms)]
    return CHILDREN.spawn(f"produce-{name}", argv, ctx.root / f"produce-{name}.log")


def make_data_set(ctx: Context) -> dict:
    a = ctx.args
    ctx.input_topic = f"bench-{ctx.run_id}-input"
    ctx.kafka.create_topics([ctx.input_topic], a.partitions)
    log(f"producing {a.events} events (d={a.dimension}, {a.keys} keys, {a.partitions} partitions) "
        f"to {ctx.input_topic}")
    t0 = time.time()
    p = produce(ctx, ctx.input_topic, a.events, 0, "throughput", START_TS, "dataset",
                step_ms=a.step_ms)
    rc = p.wait(timeout=max(600, a.events / 1000))
    took = time.time() - t0
    if rc != 0:
        raise BenchError(f"producing the data set failed ({rc}): {tail(ctx.root / 'produce-dataset.log')}")
    n = ctx.kafka.message_counts([ctx.input_topic]).get(ctx.input_topic, 0)
    if n != a.events:
        raise BenchError(f"the input topic holds {n} messages, not {a.events}")
    log(f"data set ready: {n} messages in {took:.1f} s")
    return {"topic": ctx.input_topic, "events": n, "produce_seconds": round(took, 2),
            **expected_windows(ctx, n)}


def expected_windows(ctx: Context, n: int) -> dict:
    """What the job should emit, computed from the data set itself (the sanity check of the
    output counts): 1 s windows per (input partition, key) that close, in offset order, when the
    partition's stream time (largest event time so far) reaches their end (grace 0); an event
    whose window has already closed is late and dropped (the generator jitters event times)."""
    from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING
    c = Consumer({"bootstrap.servers": ctx.kafka.bootstrap, "group.id": f"check-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False})
    c.assign([TopicPartition(ctx.input_topic, p, OFFSET_BEGINNING) for p in range(ctx.args.partitions)])
    windows: dict[int, set] = {}
    stream_time: dict[int, int] = {}
    seen, late, deadline = 0, 0, time.time() + 120
    while seen < n and time.time() < deadline:
        for m in c.consume(num_messages=10000, timeout=0.5):
            if m.error():
                continue
            seen += 1
            e, p = json.loads(m.value()), m.partition()
            ts = int(e["ts"])
            st = stream_time.get(p, -(1 << 62))
            if (ts // 1000 + 1) * 1000 <= st:
                late += 1
                continue
            windows.setdefault(p, set()).add((e.get("key", ""), ts // 1000))
            stream_time[p] = max(st, ts)
    c.close()
    closed = sum(1 for p, ws in windows.items() for _, start in ws if (start + 1) * 1000 <= stream_time[p])
    return {"expected_closed_windows": closed, "expected_late_events": late, "checked_events": seen}


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def status_partitions(body: str) -> list[dict]:
    """Every per-partition object of a /status answer (anything with a `next_offset`)."""
    found = []

    def walk(v):
        if isinstance(v, dict):
            if "next_offset" in v:
                found.append(v)
            else:
                for x in v.values():
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    try:
        walk(json.loads(body))
    except ValueError:
        pass
    return found


def durable_offsets(port: int) -> Optional[int]:
    code, body = http_get(port, "/status", 1.0)
    if code != 200:
        return None
    return sum(max(int(p.get("next_offset") or 0), 0) for p in status_partitions(body))


def consumed_in(body: str) -> int:
    """neurostream_messages_consumed_total summed over partitions."""
    total = 0
    for line in body.splitlines():
        if line.startswith("neurostream_messages_consumed_total"):
            try:
                total += int(float(line.rsplit(" ", 1)[1]))
            except ValueError:
                pass
    return total


def worker_time_us(body: str) -> dict[str, float]:
    """neurostream_worker_time_microseconds_total per state, summed over partitions."""
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("neurostream_worker_time_microseconds_total{"):
            state = re.search(r'state="([a-z_]+)"', line)
            try:
                value = float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
            if state:
                out[state.group(1)] = out.get(state.group(1), 0.0) + value
    return out


def service_internals(port: int, since: Optional[dict[str, float]] = None,
                      keep: Optional[Path] = None) -> dict:
    """Where neurostream's time went, from its /metrics: sink transactions (outputs + checkpoint
    in one PostgreSQL transaction), rows, backpressure pauses, checkpoint size, late drops, and
    the workers' time per state since `since` (a [`worker_time_us`] taken earlier). The whole
    /metrics text is written to `keep` (kept with --keep)."""
    code, body = http_get(port, "/metrics", 5.0)
    if code != 200:
        return {}
    if keep is not None:
        keep.write_text(body)
    sums: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("neurostream_") and " " in line:
            name = line.split("{", 1)[0].split(" ", 1)[0]
            try:
                sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    worker_us = {k: v - (since or {}).get(k, 0.0) for k, v in worker_time_us(body).items()}
    total_us = sum(worker_us.values())
    tx = sums.get("neurostream_sink_commit_seconds_count", 0.0)
    return {
        "sink_transactions": int(tx),
        "sink_seconds": round(sums.get("neurostream_sink_commit_seconds_sum", 0.0), 3),
        "sink_ms_per_transaction": round(sums.get("neurostream_sink_commit_seconds_sum", 0.0) / tx * 1000, 1) if tx else None,
        "sink_rows": int(sums.get("neurostream_sink_batch_rows_sum", 0.0)),
        "partition_pauses": int(sums.get("neurostream_partition_pauses_total", 0.0)),
        "checkpoint_bytes": int(sums.get("neurostream_checkpoint_bytes", 0.0)),
        "late_events_dropped": int(sums.get("neurostream_late_events_dropped_total", 0.0)),
        "output_messages": int(sums.get("neurostream_output_messages_total", 0.0)),
        # Share of the partition workers' time per state, summed over partitions.
        "worker_time": {k: round(v / total_us, 3) for k, v in sorted(worker_us.items())} if total_us else {},
    }


def worker_split(shares: dict) -> str:
    if not shares:
        return "-"
    return " / ".join(f"{shares.get(k, 0.0) * 100:.0f} %" for k in ("busy", "idle", "waiting_kafka", "waiting_postgres"))


def finish_result(res: ThroughputResult, sampler: Sampler, n: int, t1: float, tn: float) -> None:
    res.events = n
    res.seconds = round(tn - t1, 3)
    res.events_per_s = (n - 1) / max(tn - t1, 1e-6)
    cpu = sampler.cpu_at(tn) - sampler.cpu_at(t1)
    res.cpu_s_per_m = cpu / n * 1e6
    span = max(tn - t1, 1e-6)
    res.own_cores = round(cpu / span, 2)
    res.machine_busy_cores = round((sampler.machine_at(tn) - sampler.machine_at(t1)) / span, 2)
    res.peak_rss_mb = sampler.peak_rss_mb()
    obs = sampler.observed_span(n)
    if obs and obs[1] < n:  # else all N became visible in one poll: too fast to observe
        ta, pa, tb = obs
        res.observed_events_per_s = (n - pa) / max(tb - ta, 1e-6)
    res.cargo_overlap = sampler.cargo_seen


def run_throughput_neurostream(ctx: Context, profile: str) -> ThroughputResult:
    a, res = ctx.args, ThroughputResult("neurostream", profile, load_before=load_average())
    name = f"ns-tp-{profile}{ctx.suffix}"
    prefix = f"bench-{ctx.run_id}-{name}"
    db = ctx.pg.create_database(f"bench_{ctx.run_id}_{profile}")
    port = free_ports(1)[0]
    cfg = neurostream_config(ctx, ctx.root / f"{name}.toml", profile=profile,
                             group=f"bench-{ctx.run_id}-{name}", input_topic=ctx.input_topic,
                             prefix=prefix, db_url=db, http_port=port, emit="final")
    logfile = ctx.root / f"{name}.log"
    proc = CHILDREN.spawn(name, [str(NEUROSTREAM), "--config", str(cfg), "run"], logfile,
                          env=service_env(ctx))
    first_consumed: list[float] = []
    time_at_first: dict[str, float] = {}

    def progress():
        if not first_consumed:
            code, body = http_get(port, "/metrics", 1.0)
            if code == 200 and consumed_in(body):
                first_consumed.append(time.time())
                time_at_first.update(worker_time_us(body))
        return durable_offsets(port)

    sampler = Sampler(proc.pid, progress, interval=0.02)
    sampler.start()
    try:
        deadline_no_progress = 120.0
        last, last_change = -1, time.time()
        while True:
            p = sampler.last_progress()
            if p is not None and p >= a.events:
                break
            if p != last:
                last, last_change = p, time.time()
            if proc.poll() is not None:
                raise BenchError(f"neurostream/{profile} exited with {proc.returncode} at durable "
                                 f"offset {p}: {tail(logfile, 600)}")
            if time.time() - last_change > deadline_no_progress:
                raise BenchError(f"neurostream/{profile} made no progress for {deadline_no_progress:.0f} s "
                                 f"(durable offsets {p} of {a.events}); last /status: "
                                 f"{http_get(port, '/status')[1][:500]}")
            time.sleep(0.05)
        tn = next(t for t, _, pr in sampler.samples if pr is not None and pr >= a.events)
        if not first_consumed:
            raise BenchError("neurostream never showed a consumed message in /metrics")
        if tn - first_consumed[0] < 0.25:  # a few 20 ms polls: the rate would be noise
            raise BenchError(f"too short to measure: all {a.events} events were durable "
                             f"{tn - first_consumed[0]:.3f} s after the first was seen consumed; "
                             "use more --events")
        finish_result(res, sampler, a.events, first_consumed[0], tn)
        with open(ctx.root / f"{name}-progress.tsv", "w") as f:  # kept with --keep
            f.write("seconds_since_first_consumed\tcpu_s\tdurable_events\n")
            for t, cpu, pr in sampler.samples:
                f.write(f"{t - first_consumed[0]:.3f}\t{cpu:.3f}\t{'' if pr is None else pr}\n")
        res.basis = "1st consumed (/metrics) -> N durable (/status), 20 ms polls"
        res.internals = service_internals(port, since=time_at_first,
                                          keep=ctx.root / f"{name}-metrics.txt")
    finally:
        sampler.stop()
        rc = Children.stop(proc, 40)
        if rc not in (0, None) and res.status == "ok":
            res.notes.append(f"exit code {rc} after SIGTERM")
        res.load_after = load_average()
    res.outputs = ctx.kafka.message_counts(output_topic_names(prefix))
    return res


def run_throughput_self_reporting(ctx: Context, system: str, argv: list[str], group: str,
                                  env: Optional[dict] = None, exits: bool = False,
                                  internal_prefix: Optional[str] = None) -> ThroughputResult:
    """A system that prints `{"event":"consumed","n":N,"first_ms":..,"last_ms":..}`; its group's
    committed offsets are polled as the cross-check. With `internal_prefix` (Kafka Streams), the
    system's progress counts as N only once its group has also committed every record of its
    repartition topics (`<prefix>...-repartition`): the window step runs downstream of them, and
    the N-th input record is only done when the last repartitioned record is."""
    a, res = ctx.args, ThroughputResult(system, load_before=load_average())
    logfile = ctx.root / f"{system}{ctx.suffix}.log"
    proc = CHILDREN.spawn(system, argv, logfile, env=env)

    def progress() -> int:
        done = ctx.kafka.committed(group, ctx.input_topic, a.partitions)
        if internal_prefix is None or done < a.events:
            return done
        md = ctx.kafka.admin.list_topics(timeout=5).topics
        for t, meta in md.items():
            if t.startswith(internal_prefix) and t.endswith("-repartition"):
                n = len(meta.partitions)
                ends = sum(ctx.kafka.high_watermarks(t).values())
                if ctx.kafka.committed(group, t, n) < ends:
                    return a.events - 1
        return done

    sampler = Sampler(proc.pid, progress)
    sampler.start()
    try:
        events = LogEvents(logfile)

        def consumed():
            for e in events.poll():
                if e.get("event") == "consumed":
                    return e
                if e.get("event") == "error":
                    raise BenchError(f"{system}: {e.get('error')}")
            return None

        timeout = max(300.0, a.events / 1000)
        report = wait_for(f"{system} did not report consuming {a.events} records", consumed,
                          timeout, 0.1, None if exits else proc,
                          lambda: f"committed offsets {sampler.last_progress()}; log tail: {tail(logfile, 500)}")
        if int(report["n"]) != a.events:
            raise BenchError(f"{system} reported {report['n']} records, not {a.events}")
        # The committed offsets reach N shortly after (they are the cross-check): wait a little.
        try:
            wait_for("committed offsets", lambda: (sampler.last_progress() or 0) >= a.events, 40, 0.1)
        except BenchError:
            res.notes.append(f"committed offsets reached only {sampler.last_progress()} within 40 s "
                             "of the report")
        t1, tn = report["first_ms"] / 1000, report["last_ms"] / 1000
        res.basis = "own report: 1st -> N-th record consumed"
        if internal_prefix is not None:
            done = wait_for(f"{system} did not finish its repartitioned records",
                            lambda: sampler.observed_span(a.events), 120, 0.1,
                            why=lambda: f"progress {sampler.last_progress()}")
            tn = max(tn, done[2])
            res.basis = ("own report of the 1st record -> N input records and every repartitioned "
                         "record committed (50 ms polls)")
        finish_result(res, sampler, a.events, t1, tn)
    finally:
        sampler.stop()
        Children.stop(proc, 20)
        res.load_after = load_average()
    return res


def run_throughput_bare(ctx: Context) -> ThroughputResult:
    group = f"bench-{ctx.run_id}-bare"
    argv = [str(BARE), "--brokers", ctx.kafka.bootstrap, "--topic", ctx.input_topic, "--group", group,
            "--expected", str(ctx.args.events), "--fetch-wait-max-ms", "100"]
    return run_throughput_self_reporting(ctx, "bare", argv, group, exits=True)


def run_throughput_kstreams(ctx: Context) -> ThroughputResult:
    why = ensure_kstreams_jar()
    if why:
        return ThroughputResult("kstreams", status=f"skipped: {why}")
    app_id = f"bench-{ctx.run_id}-kstreams"
    output = f"{app_id}-output"
    ctx.kafka.create_topics([output], ctx.args.partitions)
    argv = ["java", "-Xmx512m", "-jar", str(KSTREAMS_JAR), "--brokers", ctx.kafka.bootstrap,
            "--input", ctx.input_topic, "--output", output, "--app-id", app_id, "--grace-ms", "0",
            "--threads", str(min(2, ctx.args.partitions)), "--expected", str(ctx.args.events),
            # Group by the Kafka key (which `neurostream produce` sets to the JSON key): no
            # repartition topic, stream time per input partition, the same windows as
            # neurostream's. Re-keying by the JSON field would mix both partitions' stream times
            # in one task and drop about half the events as late with grace 0.
            "--no-repartition"]
    env = dict(os.environ, TMPDIR=str(ctx.root))
    res = run_throughput_self_reporting(ctx, "kstreams", argv, app_id, env=env)
    res.outputs = ctx.kafka.message_counts([output])
    return res


def run_throughput_quix(ctx: Context) -> ThroughputResult:
    group = f"bench-{ctx.run_id}-quix"
    output = f"{group}-output"
    ctx.kafka.create_topics([output], ctx.args.partitions)
    state = ctx.root / f"quix-state{ctx.suffix}"
    argv = [str(VENV / "bin" / "python"), str(QUIX_JOB), "--brokers", ctx.kafka.bootstrap,
            "--input", ctx.input_topic, "--output", output, "--group", group,
            "--state-dir", str(state), "--expected", str(ctx.args.events)]
    res = run_throughput_self_reporting(ctx, "quix", argv, group)
    res.outputs = ctx.kafka.message_counts([output])
    return res


class OutputReader(threading.Thread):
    """Reads topics from the beginning, recording (receive time, headers' source partition and
    offset) per message, or (receive time, partition, offset, CreateTime) with `raw`."""

    def __init__(self, bootstrap: str, topics: list[str], partitions: dict[str, int], raw: bool) -> None:
        super().__init__(daemon=True)
        from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                                  "enable.auto.commit": False, "fetch.wait.max.ms": 5,
                                  "fetch.min.bytes": 1, "enable.partition.eof": False})
        self.consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING)
                              for t in topics for p in range(partitions[t])])
        self.raw = raw
        self.records: list[tuple] = []
        self.errors: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        records = self.records
        while not self._stop_event.is_set():
            # poll() returns as soon as one message is there; consume(timeout=0) then takes what
            # else has arrived (consume() with a timeout would wait for the whole batch).
            first = self.consumer.poll(0.05)
            if first is None:
                continue
            msgs = [first, *self.consumer.consume(num_messages=5000, timeout=0)]
            now = time.time()
            for m in msgs:
                if m.error():
                    if len(self.errors) < 5:
                        self.errors.append(str(m.error()))
                    continue
                if self.raw:
                    records.append((now, m.partition(), m.offset(), m.timestamp()[1]))
                    continue
                sp = so = None
                for k, v in m.headers() or ():
                    if k == "neurostream.source.partition":
                        sp = int(v)
                    elif k == "neurostream.source.offset":
                        so = int(v)
                if sp is not None and so is not None:
                    records.append((now, sp, so, m.timestamp()[1]))
        self.consumer.close()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(15)


def read_input_times(bootstrap: str, topic: str, partitions: int, expected: int) -> list[tuple]:
    """(partition, offset, CreateTime ms) of every message of `topic`."""
    reader = OutputReader(bootstrap, [topic], {topic: partitions}, raw=True)
    reader.start()
    try:
        wait_for(f"reading back the {expected} input messages of {topic}",
                 lambda: len(reader.records) >= expected, 120, 0.1,
                 why=lambda: f"got {len(reader.records)}")
    finally:
        reader.stop()
    return [(p, o, ts) for _, p, o, ts in reader.records]


def dump_series(path: Path, rows: list[tuple]) -> None:
    """With --keep: every measured event's send time, partition, offset and latencies (ms)."""
    with path.open("w") as f:
        f.write("sent_ms\tpartition\toffset\tlatency_ms\tto_output_created_ms\n")
        f.writelines("\t".join(map(str, r)) + "\n" for r in sorted(rows))


def summarize_latency(res: LatencyResult, lat_ms: list[float]) -> None:
    lat_ms.sort()
    res.measured = len(lat_ms)
    if not lat_ms:
        raise BenchError("no latency samples after the warm-up")
    res.p50_ms, res.p95_ms = percentile(lat_ms, 0.50), percentile(lat_ms, 0.95)
    res.p99_ms, res.max_ms = percentile(lat_ms, 0.99), lat_ms[-1]
    res.mean_ms = sum(lat_ms) / len(lat_ms)
    step = max(1, len(lat_ms) // 2000)
    res.cdf = [round(x, 3) for x in lat_ms[::step]] + [round(lat_ms[-1], 3)]


def send_pacing(res: LatencyResult, inputs: list[tuple]) -> None:
    """Checks how steady the producer was: messages per 100 ms, warm-up excluded."""
    if not inputs:
        return
    t0 = min(ts for _, _, ts in inputs)
    t_end = max(ts for _, _, ts in inputs)
    buckets: dict[int, int] = {}
    for _, _, ts in inputs:
        if ts >= t0 + WARMUP_S * 1000:
            buckets[(ts - t0) // 100] = buckets.get((ts - t0) // 100, 0) + 1
    full = [v for k, v in buckets.items() if (k + 1) * 100 + t0 <= t_end]
    if full:
        res.send_rate_max_100ms = max(full) * 10.0
        res.send_rate_min_100ms = min(full) * 10.0


def produce_steady(ctx: Context, topic: str, name: str) -> int:
    a = ctx.args
    events = a.rate * a.latency_seconds
    p = produce(ctx, topic, events, a.rate, "latency", None, name, a.producer_linger_ms)
    try:
        rc = p.wait(timeout=a.latency_seconds * 3 + 60)
    except subprocess.TimeoutExpired:
        Children.stop(p, 5)
        raise BenchError(f"{name}: the producer did not finish {events} events at {a.rate}/s")
    if rc != 0:
        raise BenchError(f"{name}: the producer failed ({rc}): {tail(ctx.root / f'produce-{name}.log')}")
    return events


def run_latency_floor(ctx: Context) -> LatencyResult:
    a, res = ctx.args, LatencyResult("broker floor", rate=ctx.args.rate, load_before=load_average())
    topic = f"bench-{ctx.run_id}-lat-floor"
    ctx.kafka.create_topics([topic], a.partitions)
    reader = OutputReader(ctx.kafka.bootstrap, [topic], {topic: a.partitions}, raw=True)
    reader.start()
    time.sleep(1.0)
    res.cargo_overlap = cargo_running()
    try:
        m0, w0 = machine_busy_s(), time.time()
        res.sent = produce_steady(ctx, topic, "floor")
        res.machine_busy_cores = round((machine_busy_s() - m0) / (time.time() - w0), 2)
        wait_for("the plain consumer did not receive every message", lambda: len(reader.records) >= res.sent,
                 30, 0.1, why=lambda: f"got {len(reader.records)} of {res.sent}")
    finally:
        reader.stop()
        res.cargo_overlap |= cargo_running()
        res.load_after = load_average()
    recs = reader.records
    inputs = [(p, o, ts) for _, p, o, ts in recs]
    send_pacing(res, inputs)
    t0 = min(ts for _, _, ts in inputs) + WARMUP_S * 1000
    series = [(ts, p, o, round(now * 1000 - ts, 2), "") for now, p, o, ts in recs if ts >= t0]
    if a.keep:
        dump_series(ctx.root / "latency-floor.tsv", series)
    summarize_latency(res, [r[3] for r in series])
    return res


def run_latency_neurostream(ctx: Context, profile: str) -> LatencyResult:
    a = ctx.args
    res = LatencyResult(f"neurostream ({profile})", rate=a.rate, load_before=load_average())
    name = f"ns-lat-{profile}"
    topic = f"bench-{ctx.run_id}-{name}-input"
    prefix = f"bench-{ctx.run_id}-{name}"
    ctx.kafka.create_topics([topic], a.partitions)
    db = ctx.pg.create_database(f"bench_{ctx.run_id}_lat_{profile}")
    port = free_ports(1)[0]
    cfg = neurostream_config(ctx, ctx.root / f"{name}.toml", profile=profile,
                             group=f"bench-{ctx.run_id}-{name}", input_topic=topic, prefix=prefix,
                             db_url=db, http_port=port, emit="update")
    logfile = ctx.root / f"{name}.log"
    proc = CHILDREN.spawn(name, [str(NEUROSTREAM), "--config", str(cfg), "run"], logfile,
                          env=service_env(ctx))
    reader = None
    try:
        wait_for(f"neurostream/{profile} never became ready", lambda: http_get(port, "/ready")[0] == 200,
                 90, 0.2, proc, lambda: f"last /ready: {http_get(port, '/ready')[1][:300]}; last /status: "
                 f"{http_get(port, '/status')[1][:300]}; log tail: {tail(logfile, 400)}")
        outs = output_topic_names(prefix)
        wait_for("the output topics were not created", lambda: len(ctx.kafka.message_counts(outs)) == len(outs), 30, 0.5)
        md = ctx.kafka.admin.list_topics(timeout=10).topics
        reader = OutputReader(ctx.kafka.bootstrap, outs, {t: len(md[t].partitions) for t in outs}, raw=False)
        reader.start()
        time.sleep(1.0)
        res.cargo_overlap = cargo_running()
        m0, w0 = machine_busy_s(), time.time()
        res.sent = produce_steady(ctx, topic, name)
        res.machine_busy_cores = round((machine_busy_s() - m0) / (time.time() - w0), 2)
        ends = ctx.kafka.high_watermarks(topic)

        def covered():
            last: dict[int, int] = {}
            for _, p, o, _ in list(reader.records):
                last[p] = max(last.get(p, -1), o)
            return all(last.get(p, -1) >= end - 1 for p, end in ends.items() if end > 0)

        try:
            wait_for(f"neurostream/{profile}'s outputs never covered the last input offsets", covered, 60, 0.2,
                     proc, lambda: f"last /status: {http_get(port, '/status')[1][:400]}")
        except BenchError as e:
            res.notes.append(str(e))
        res.internals = service_internals(port, keep=ctx.root / f"{name}-metrics.txt")
    finally:
        if reader is not None:
            reader.stop()
        res.cargo_overlap |= cargo_running()
        Children.stop(proc, 40)
        res.load_after = load_average()
    outputs = reader.records
    res.outputs_received = len(outputs)
    inputs = read_input_times(ctx.kafka.bootstrap, topic, a.partitions, res.sent)
    send_pacing(res, inputs)
    # Per source partition: receive times in order and the running maximum of source offsets.
    by_part: dict[int, tuple[list[float], list[int], list[int]]] = {}
    for now, p, o, out_ts in sorted(outputs):
        times, runmax, stamps = by_part.setdefault(p, ([], [], []))
        times.append(now)
        runmax.append(max(o, runmax[-1]) if runmax else o)
        stamps.append(out_ts)
    t0 = min(ts for _, _, ts in inputs) + WARMUP_S * 1000
    lat, inside, series = [], [], []
    for p, o, ts in inputs:
        if ts < t0:
            continue
        times, runmax, stamps = by_part.get(p, ([], [], []))
        i = bisect.bisect_left(runmax, o)
        if i >= len(runmax):
            res.uncovered += 1
            continue
        lat.append(times[i] * 1000 - ts)
        inside.append(stamps[i] - ts)
        series.append((ts, p, o, round(lat[-1], 2), inside[-1]))
    if a.keep:
        dump_series(ctx.root / f"latency-{profile}.tsv", series)
    summarize_latency(res, lat)
    inside.sort()
    res.p50_to_output_created_ms = percentile(inside, 0.50)
    res.p99_to_output_created_ms = percentile(inside, 0.99)
    last_sent = max(ts for _, _, ts in inputs) / 1000
    last_out = max((t for t, _, _, _ in outputs), default=last_sent)
    res.drain_s = round(last_out - last_sent, 3)
    if res.drain_s > 1.0:
        span = last_out - min(ts for _, _, ts in inputs) / 1000
        res.notes.append(f"did not keep up with {a.rate:,} events/s: the last event was covered "
                         f"{res.drain_s:.1f} s after it was sent (about {res.sent / span:,.0f} events/s "
                         "processed), so these latencies are mostly queueing")
    if res.uncovered:
        res.notes.append(f"{res.uncovered} events never covered by an output")
    return res


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "/")[:300]


def fmt(v, spec=",.0f", none="-"):
    return none if v is None else format(v, spec)


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    except (OSError, IndexError):
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "mem_total": mem,
            "kernel": os.uname().release, "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def write_report(out: Path, command: str, params: dict, machine: dict, dataset: dict,
                 tp: list[ThroughputResult], lat: list[LatencyResult], env: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    bare = next((r for r in tp if r.system == "bare" and r.events_per_s), None)
    for r in tp:
        if bare and r.events_per_s:
            r.ratio_to_bare = r.events_per_s / bare.events_per_s
    payload = {"command": command, "parameters": params, "machine": machine, "dataset": dataset,
               "environment": env, "throughput": [dataclasses.asdict(r) for r in tp],
               "latency": [dataclasses.asdict(r) for r in lat]}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")

    L = ["# End-to-end benchmark", "",
         f"Produced by `{command}` on {machine['date_utc']} ({machine['nproc']} cores, "
         f"{machine['cpu_model']}, {machine['mem_total']} RAM). Definitions: the docstring of "
         "`benches/e2e/run.py`; raw numbers: `results.json`.", "",
         f"Parameters: {params['events']:,} events, d = {params['dimension']}, {params['keys']} keys, "
         f"{params['partitions']} partitions, event time {params.get('step_ms', 5.0):g} ms apart, "
         "1 s tumbling windows per key (grace 0) with "
         f"count/sum/mean/min/max of `value`; latency at {params['rate']:,} events/s for "
         f"{params['latency_seconds']} s (first {WARMUP_S:.0f} s dropped). One Apache Kafka 4.3.1 broker "
         "(KRaft, 1 GB heap) and PostgreSQL 15 (fsync on) on the same machine.", "",
         "## Throughput (same broker, same input topic, own consumer group each)", ""]
    rounds = max((len(r.rounds) for r in tp), default=0) > 1
    profiles = [r for r in tp if r.system == "neurostream" and len(r.rounds) > 1]
    if rounds:
        L += [f"Each row is the median of {params.get('rounds', 1)} rounds by events/s (see "
              "--rounds in the docstring); its other columns are that run's. Every round's rate "
              "is in the last column, in the order the rounds ran.", ""]
    L += ["| system / profile | events/s | ratio to bare | CPU-s per M events | peak RSS MB | cores used: own / whole machine | basis | cross-check events/s (group progress, 50 ms polls) |"
          + (" events/s of each round |" if rounds else ""),
          "|---|---:|---:|---:|---:|---:|---|---:|" + ("---|" if rounds else "")]
    for r in tp:
        each = " " + ", ".join(fmt(v) for v in r.rounds) + " |" if rounds else ""
        if r.status != "ok":
            L.append(f"| {r.label} | {cell(r.status)} | | | | | | |" + (" |" if rounds else ""))
            continue
        L.append(f"| {r.label} | {fmt(r.events_per_s)} | {fmt(r.ratio_to_bare, '.2f')} | "
                 f"{fmt(r.cpu_s_per_m, '.1f')} | {fmt(r.peak_rss_mb, '.0f')} | "
                 f"{fmt(r.own_cores, '.2f')} / {fmt(r.machine_busy_cores, '.2f')} | {r.basis} | "
                 f"{fmt(r.observed_events_per_s)} |" + each)
    if len(profiles) > 1:
        # Profiles of one round ran minutes apart at most: their ratio cancels the machine's
        # slow and fast spells that a median over rounds keeps.
        pairs = []
        for a, b in zip(profiles, profiles[1:]):
            ratios = [x / y if x and y else None for x, y in zip(a.rounds, b.rounds)]
            wins = sum(1 for q in ratios if q is not None and q > 1)
            pairs.append(f"{a.profile} / {b.profile} = " + ", ".join(fmt(q, ".2f") for q in ratios)
                         + f" ({wins} of {len(ratios)} rounds above 1)")
        L += ["", "neurostream's profiles compared within each round (they ran back to back, so a "
              "ratio cancels the machine's slow and fast spells that the medians keep): "
              + "; ".join(pairs) + "."]
    L += ["", "Events/s = (N - 1) / (t_N - t_1): t_1 = the first input record consumed, t_N = the N-th "
          "record done (neurostream: its outputs acknowledged by Kafka and committed to PostgreSQL "
          "with the checkpoint, from `/status`; the bare consumer and Quix: their own report of the "
          "N-th record consumed by the loop / the step before the window; Kafka Streams: its own "
          "report of the N-th record reaching the topology, which groups by the Kafka key and "
          "aggregates in the same task). CPU = utime + stime of the system's own process tree "
          "between t_1 and t_N (not the broker's nor PostgreSQL's: neurostream's state goes to "
          "PostgreSQL, Kafka Streams' and Quix's to changelog topics on the broker); peak RSS = "
          "VmHWM summed over the process tree. Cores used: the system's own CPU over the span, and "
          "the whole machine's (/proc/stat: the system, the broker, PostgreSQL, this script and "
          f"anything else running; the machine has {machine['nproc']} cores). neurostream also "
          "clusters every event (NCS) and writes PostgreSQL; the peers only window.", ""]
    outs = [r for r in tp if r.outputs]
    if outs:
        L += [f"Expected closed windows, computed from the data set: "
              f"{dataset.get('expected_closed_windows', 0):,} per (input partition, key), with "
              f"{dataset.get('expected_late_events', 0):,} late events dropped (the generator "
              "jitters event times; grace 0). Every system windows per input partition (Kafka "
              "Streams groups by the Kafka key, which is the JSON key, with no repartition "
              "topic).", "",
              "Output messages per system (sanity check): " + "; ".join(
            f"{r.label}: " + ", ".join(f"{t.rsplit('.', 1)[-1] if r.system == 'neurostream' else 'windows'} {n:,}"
                                       for t, n in r.outputs.items() if n) for r in outs), ""]
    L += ["## Latency (event sent -> first output covering it, same host clock)", "",
          "| profile | p50 ms | p95 ms | p99 ms | max ms | p50 / p99 ms to the output's CreateTime | events measured | outputs received | send rate per 100 ms (min-max /s) | machine busy cores |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in lat:
        if r.status != "ok":
            L.append(f"| {r.name} | {cell(r.status)} | | | | | | | | |")
            continue
        L.append(f"| {r.name} | {fmt(r.p50_ms, '.1f')} | {fmt(r.p95_ms, '.1f')} | {fmt(r.p99_ms, '.1f')} | "
                 f"{fmt(r.max_ms, '.1f')} | {fmt(r.p50_to_output_created_ms, '.0f')} / "
                 f"{fmt(r.p99_to_output_created_ms, '.0f')} | {r.measured:,} | {r.outputs_received:,} | "
                 f"{fmt(r.send_rate_min_100ms)}-{fmt(r.send_rate_max_100ms)} | {fmt(r.machine_busy_cores, '.2f')} |")
    L += ["", "Latency of input event (p, o) = receive time of the first output message (any output "
          "topic) with `neurostream.source.partition` = p and `neurostream.source.offset` >= o, minus "
          "the event's CreateTime (set by `neurostream produce --rate` when it sends; ms resolution). "
          "Windows emit `update` here (an update per processing batch, then the final), so every "
          "flush produces output. The broker floor is the same producer into a topic read by a plain "
          "consumer. The column \"to the output's CreateTime\" is the part of that latency until "
          "neurostream produced the covering output (the rest is the output's way through the broker "
          "to the reader). Outputs go to Kafka before the batch's PostgreSQL transaction (which "
          "follows their acknowledgement), so the transaction is not inside this latency itself; "
          "a flush's delivery runs while the worker processes the next batch, whose flush waits "
          "for those acknowledgements before its own outputs go.", ""]
    rows = [(f"throughput, {r.profile}", r.internals) for r in tp if r.internals] + \
           [(f"latency, {r.name.split('(')[-1].rstrip(')')}", r.internals) for r in lat if r.internals]
    if rows:
        L += ["### Inside neurostream (its /metrics at the end of each run)", "",
              "| phase, profile | sink transactions | ms per transaction | rows per transaction | backpressure pauses | checkpoint bytes (all partitions) | late events dropped | worker time: busy / idle / waiting Kafka / waiting PostgreSQL |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name, m in rows:
            per = m["sink_rows"] / m["sink_transactions"] if m.get("sink_transactions") else None
            L.append(f"| {name} | {m.get('sink_transactions', 0):,} | {fmt(m.get('sink_ms_per_transaction'), '.1f')} | "
                     f"{fmt(per)} | {m.get('partition_pauses', 0):,} | {m.get('checkpoint_bytes', 0):,} | "
                     f"{m.get('late_events_dropped', 0):,} | {worker_split(m.get('worker_time') or {})} |")
        L += ["", "A sink transaction carries the outputs of the flushes since the last one and the "
              "partition's checkpoint (a delta of what changed, or a new base) to PostgreSQL after those "
              "outputs are acknowledged by Kafka; a pause is a partition paused because its worker's "
              "queue (`kafka.partition_queue_capacity`) was full. Worker time is "
              "`neurostream_worker_time_microseconds_total` summed over partitions: in the throughput "
              "phase from the first consumed message to the last durable one, in the latency phase "
              "over the whole run.", ""]
    notes = [f"{r.label}: {n}" for r in tp for n in r.notes] + [f"{r.name}: {n}" for r in lat for n in r.notes]
    overlap = [r.label for r in tp if r.cargo_overlap] + [r.name for r in lat if r.cargo_overlap]
    L += ["## Machine use during the run", "",
          f"Load average before / after the run: {env['load_before']} / {env['load_after']}. "
          f"cargo running before / after: {env['cargo_before']} / {env['cargo_after']}.",
          ("Measurements that overlapped a cargo process (another engineer's build or tests): "
           + ", ".join(overlap) + ".") if overlap else "No cargo process was seen during any measurement.", ""]
    if notes:
        L += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    b = env.get("binaries") or {}
    if b:
        ns = b.get("neurostream", {})
        L += [f"Binary: `target/release/neurostream` built {ns.get('built')} (sha256 {ns.get('sha256')}…) "
              f"from git {b.get('git_head')}" + (f" with uncommitted changes in {len(b['src_modified'])} "
                                                 "file(s) under src/" if b.get("src_modified") else "") + ".", ""]
    L += ["## Plots", "", "![throughput](throughput.png)", "", "![latency CDF](latency_cdf.png)", ""]
    (out / "results.md").write_text("\n".join(L))
    plot(out, tp, lat)


def plot(out: Path, tp: list[ThroughputResult], lat: list[LatencyResult]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in tp if r.status == "ok" and r.events_per_s]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if ok:
        colors = {"neurostream": "#1f77b4", "bare": "#7f7f7f", "kstreams": "#d62728", "quix": "#2ca02c"}
        bars = ax.bar([r.label for r in ok], [r.events_per_s / 1000 for r in ok],
                      color=[colors.get(r.system, "#9467bd") for r in ok])
        for b, r in zip(bars, ok):
            ax.annotate(f"{r.events_per_s / 1000:,.0f}k", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=9)
    ax.set_yscale("log")  # the bare consumer is one to two orders of magnitude above the rest
    ax.set_ylabel("events/s (thousands, log scale)")
    ax.set_title("Sustained end-to-end throughput, same broker and data")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in lat:
        if r.status != "ok" or not r.cdf:
            continue
        ys = [i / (len(r.cdf) - 1) if len(r.cdf) > 1 else 1.0 for i in range(len(r.cdf))]
        xs = [max(x, 0.1) for x in r.cdf]
        if r.name == "broker floor":
            ax.plot(xs, ys, color="black", linestyle="--", label=f"broker floor (p99 {r.p99_ms:.1f} ms)")
        else:
            ax.plot(xs, ys, label=f"{r.name} (p99 {r.p99_ms:.1f} ms)")
    ax.set_xscale("log")
    ax.set_xlabel("event -> output latency (ms, log scale)")
    ax.set_ylabel("fraction of events")
    ax.set_title("Latency CDF at a steady offered rate")
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(loc="lower right", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no latency measurement in this run", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="neurostream end-to-end benchmark (see the module docstring)")
    p.add_argument("--events", type=int, default=500_000)
    p.add_argument("--dimension", type=int, default=8)
    p.add_argument("--keys", type=int, default=100)
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--step-ms", type=float, default=None,
                   help="event-time step between the data set's events, 5 ms when not given "
                        "(see the docstring's Data)")
    p.add_argument("--rate", type=int, default=10_000)
    p.add_argument("--latency-seconds", type=int, default=30)
    p.add_argument("--producer-linger-ms", type=int, default=5,
                   help="linger.ms of the latency phase's producer (the same for the floor)")
    p.add_argument("--systems", default="neurostream,bare,kstreams,quix")
    p.add_argument("--profiles", default="throughput,balanced,latency")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the throughput phase this many times; each row is the median run")
    p.add_argument("--out", default="docs/bench")
    p.add_argument("--rebuild", action="store_true", help="run cargo build even when the binaries exist")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    p.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the service only (repeatable): a setting "
                        "to measure, e.g. NEUROSTREAM__POSTGRES__LINGER_MS=10")
    p.add_argument("--broker-request-log", action="store_true",
                   help="the broker logs every request it completes with its timings to "
                        "kafka/request.log (a diagnosis aid: it costs the broker CPU)")
    p.add_argument("--report-only", action="store_true",
                   help="only re-render results.md and the plots from --out/results.json")
    return p.parse_args()


def guarded(results: list, make_failed: Callable[[str], object], fn: Callable[[], object]) -> None:
    """Runs one measurement; a failure becomes a "failed: reason" row and the run goes on."""
    try:
        results.append(fn())
    except Exception as e:  # noqa: BLE001 - reported in the table
        reason = str(e).replace("\n", " ").replace("|", "/")[:400]
        log(f"FAILED: {reason}")
        results.append(make_failed(f"failed: {reason}"))


def snapshot_binaries(root: Path) -> dict:
    """Copies the service and the bare consumer into the work dir, so that one run uses one
    binary even when someone rebuilds target/release meanwhile; returns what was copied."""
    global NEUROSTREAM, BARE
    import hashlib
    info = {}
    (root / "bin").mkdir()
    for attr in ("NEUROSTREAM", "BARE"):
        src = globals()[attr]
        dst = root / "bin" / src.name
        shutil.copy2(src, dst)
        info[src.name] = {"built": dt.datetime.fromtimestamp(src.stat().st_mtime, dt.timezone.utc)
                          .isoformat(timespec="seconds"),
                          "sha256": hashlib.sha256(dst.read_bytes()).hexdigest()[:16]}
        globals()[attr] = dst
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True).stdout.strip()
    info["git_head"] = git("rev-parse", "--short", "HEAD")
    info["src_modified"] = git("status", "--short", "--", "src", "Cargo.toml").splitlines()
    return info


def report_only(out: Path) -> int:
    """Re-renders results.md and the plots of an earlier run from its results.json."""
    data = json.loads((out / "results.json").read_text())
    names = lambda cls: {f.name for f in dataclasses.fields(cls)}
    tp = [ThroughputResult(**{k: v for k, v in r.items() if k in names(ThroughputResult)})
          for r in data["throughput"]]
    lat = [LatencyResult(**{k: v for k, v in r.items() if k in names(LatencyResult)})
           for r in data["latency"]]
    write_report(out, data["command"], data["parameters"], data["machine"], data["dataset"], tp,
                 lat, data["environment"])
    log(f"re-rendered {out}/results.md and the plots from results.json")
    return 0


def throughput_round(ctx: Context, systems: list[str], profiles: list[str]) -> list[ThroughputResult]:
    """One pass of the throughput phase over every system (neurostream once per profile)."""
    tp: list[ThroughputResult] = []
    if "bare" in systems:
        log("  bare consumer")
        guarded(tp, lambda s: ThroughputResult("bare", status=s), lambda: run_throughput_bare(ctx))
    if "neurostream" in systems:
        for prof in profiles:
            log(f"  neurostream ({prof})")
            guarded(tp, lambda s, prof=prof: ThroughputResult("neurostream", prof, status=s),
                    lambda prof=prof: run_throughput_neurostream(ctx, prof))
    if "kstreams" in systems:
        log("  Kafka Streams")
        guarded(tp, lambda s: ThroughputResult("kstreams", status=s), lambda: run_throughput_kstreams(ctx))
    if "quix" in systems:
        log("  Quix Streams")
        guarded(tp, lambda s: ThroughputResult("quix", status=s), lambda: run_throughput_quix(ctx))
    for r in tp:
        log(f"    {r.label}: {r.status} {fmt(r.events_per_s)} events/s")
    return tp


def median_runs(runs: list[ThroughputResult]) -> list[ThroughputResult]:
    """Per system (and profile): the median run by events/s among those that finished, with
    every finished round's rate in `rounds`; a system none of whose rounds finished keeps its
    first failure. Systems in the order of their first run."""
    labels: list[str] = []
    for r in runs:
        if r.label not in labels:
            labels.append(r.label)
    picked = []
    for label in labels:
        mine = [r for r in runs if r.label == label]
        ok = [r for r in mine if r.status == "ok" and r.events_per_s]
        if not ok:
            picked.append(mine[0])
            continue
        median = sorted(ok, key=lambda r: r.events_per_s)[len(ok) // 2]
        median.rounds = [r.events_per_s if r in ok else None for r in mine]
        if len(ok) < len(mine):
            median.notes.append(f"{len(mine) - len(ok)} of {len(mine)} rounds failed: "
                                + "; ".join(r.status for r in mine if r not in ok))
        picked.append(median)
    return picked


def main() -> int:
    args = parse_args()
    ensure_venv()
    # The readers keep a tuple per message (hundreds of thousands): a full pass of the cyclic
    # collector over them would stall a reader thread and show up as latency. A precaution: it
    # made no measurable difference to the broker floor here.
    gc.disable()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    profiles = [s.strip() for s in args.profiles.split(",") if s.strip()]
    command = " ".join(["python3 benches/e2e/run.py", *sys.argv[1:]])
    out = (REPO / args.out).resolve() if not os.path.isabs(args.out) else Path(args.out)
    if args.report_only:
        return report_only(out)
    env = {"load_before": load_average(), "cargo_before": cargo_running(), "binaries": {}}

    ensure_binaries(args.rebuild)
    libs = ensure_kafka_libs()
    root = Path(tempfile.mkdtemp(prefix="neurostream-e2e-"))
    os.chmod(root, 0o755)
    atexit.register(CHILDREN.kill_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, f: sys.exit(128 + s))
    log(f"work dir {root}")
    env["binaries"] = snapshot_binaries(root)
    broker, pg = KafkaBroker(root, libs, args.broker_request_log), Postgres(root)
    tp: list[ThroughputResult] = []
    lat: list[LatencyResult] = []
    dataset: dict = {}
    runs: list[ThroughputResult] = []  # every round's
    failed = False
    try:
        broker.start()
        log(f"Kafka at {broker.bootstrap}")
        pg.start()
        log(f"PostgreSQL at 127.0.0.1:{pg.port}")
        ctx = Context(args, root, Kafka(broker.bootstrap), pg, time.strftime("%H%M%S"))
        dataset = make_data_set(ctx)

        log("throughput phase")
        base_id = ctx.run_id
        for rnd in range(args.rounds):
            if args.rounds > 1:
                ctx.run_id = f"{base_id}r{rnd + 1}"
                ctx.suffix = f"-r{rnd + 1}" if rnd else ""
                log(f"  round {rnd + 1} of {args.rounds}")
            runs += throughput_round(ctx, systems, profiles[rnd % len(profiles):] + profiles[:rnd % len(profiles)])
        ctx.run_id, ctx.suffix = base_id, ""
        tp = median_runs(runs)
        for r in tp:
            log(f"  {r.label}: {r.status} {fmt(r.events_per_s)} events/s, "
                f"{fmt(r.cpu_s_per_m, '.1f')} CPU-s/M, {fmt(r.peak_rss_mb, '.0f')} MB")

        if "neurostream" in systems and args.latency_seconds > 0:
            log("latency phase")
            log("  broker floor")
            guarded(lat, lambda s: LatencyResult("broker floor", status=s), lambda: run_latency_floor(ctx))
            for prof in profiles:
                log(f"  neurostream ({prof})")
                guarded(lat, lambda s, prof=prof: LatencyResult(f"neurostream ({prof})", status=s),
                        lambda prof=prof: run_latency_neurostream(ctx, prof))
            for r in lat:
                log(f"  {r.name}: {r.status} p50 {fmt(r.p50_ms, '.1f')} p99 {fmt(r.p99_ms, '.1f')} "
                    f"max {fmt(r.max_ms, '.1f')} ms")
    except Exception as e:  # noqa: BLE001 - set-up failures end the run, with what was measured
        failed = True
        log(f"ERROR: {e}")
    finally:
        pg.stop()
        broker.stop()
        CHILDREN.kill_all()
        if runs and not tp:  # the phase was cut short: what it measured
            tp = median_runs(runs)
        env.update(load_after=load_average(), cargo_after=cargo_running())
        params = {k: getattr(args, k) for k in ("events", "dimension", "keys", "partitions", "step_ms", "rate",
                                                  "latency_seconds", "systems", "profiles", "rounds")}
        params["step_ms"] = params["step_ms"] or 5.0
        if tp or lat:
            write_report(out, command, params, machine_info(), dataset, tp, lat, env)
            log(f"wrote {out}/results.md, results.json, throughput.png, latency_cdf.png")
        if args.keep or failed:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
