#!/usr/bin/env bash
# Installs Apache Kafka 4.3.1 (broker, KRaft storage tool, kafka-tools) as plain jars from Maven
# Central into one libs/ directory, for tests/common/kafka.rs, and prints that directory:
#
#     libs="$(bash .ci/install-kafka.sh)"   # a failure stops a `set -e` script here,
#     export NEUROSTREAM_KAFKA_LIBS="$libs"  # but not inside `export X="$(...)"`
#
# Why jars from Maven: no Docker and no download site here, only package registries; the broker
# runs as `java -cp 'libs/*' kafka.Kafka server.properties` (KRaft, no ZooKeeper).
#
# Destination: ${NEUROSTREAM_KAFKA_HOME:-$HOME/.cache/neurostream/kafka-4.3.1}/libs. Idempotent: a
# marker holding the pom's checksum makes a second run a no-op, and a changed pom reinstalls.
# Needs java 17+ and mvn (both on this machine kind; installed with apt-get if missing, as root).
#
# Measured on the 2-core CI machine kind (Java 17, Maven 3.8.7, 2026-11):
#   download on an empty ~/.m2 (dependency plugin + 47 jars): 19-22 s; later runs (marker): 0.01 s
#   libs/: 47 jars, 44 MB (Kafka Connect, which kafka-tools drags in, excluded); ~/.m2: 57 MB
#   start to ready (every broker answers metadata listing all brokers), storage format included:
#     1 node 3-4.5 s, 3 nodes 6.5-8 s alone; 9-15 s when the 1- and 3-node tests start together
#   restart of a killed node 2.5-5 s; new partition leader 3-5 s after SIGKILL of the old one
#   RSS per broker JVM (-Xms32m -Xmx256m, serial GC, C1 only): 270-300 MB, ~77 threads;
#   a ConsumerGroupCommand run: ~100 MB, 1.2-1.5 s
#   tests/kafka_harness.rs (1-node and 3-node tests in parallel): 21-31 s
set -euo pipefail

KAFKA_VERSION=4.3.1
here="$(cd "$(dirname "$0")" && pwd)"
pom="$here/kafka/pom.xml"
dir="${NEUROSTREAM_KAFKA_HOME:-$HOME/.cache/neurostream/kafka-$KAFKA_VERSION}"
marker="$dir/.installed"

say() { echo "install-kafka: $*" >&2; }

want="$(sha256sum "$pom" | cut -d' ' -f1)"
if [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ] && ls "$dir"/libs/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null 2>&1; then
    echo "$dir/libs"
    exit 0
fi

if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing a JDK and Maven with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >&2
        apt-get install -y -q openjdk-17-jre-headless maven >&2
    else
        say "java and mvn are needed (e.g. apt-get install openjdk-17-jre-headless maven)"
        exit 1
    fi
fi

say "resolving Apache Kafka $KAFKA_VERSION from Maven Central into $dir/libs"
started=$(date +%s)
mkdir -p "$dir"
# Copy into a fresh directory and move it into place at the end, so an interrupted run never
# leaves a libs/ that looks complete.
tmp="$dir/libs.tmp.$$"
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT
# Maven's own output goes to stderr, so stdout is only the path. Debian's Maven 3.8.7 prints
# bare colour resets even with -B -q: stripped. (pipefail keeps Maven's exit status.)
mvn -B -q -f "$pom" dependency:copy-dependencies -DoutputDirectory="$tmp" 2>&1 \
    | sed -e 's/\x1b\[[0-9;]*m//g' -e '/^[[:space:]]*$/d' >&2
if ! ls "$tmp"/kafka_2.13-"$KAFKA_VERSION".jar "$tmp"/kafka-tools-"$KAFKA_VERSION".jar >/dev/null 2>&1; then
    say "Maven finished but the Kafka jars are missing from $tmp"
    exit 1
fi
rm -rf "$dir/libs"
mv "$tmp" "$dir/libs"

# For running a broker or a tool by hand:
#   java -Dlog4j2.configurationFile=$dir/log4j2.properties -cp "$dir/libs/*" kafka.Kafka server.properties
# (tests/common/kafka.rs writes the same configuration next to each test cluster.)
cat > "$dir/log4j2.properties" <<'LOG4J2'
# Kafka at WARN, to stdout: at INFO a broker writes hundreds of lines at start-up alone.
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
LOG4J2

echo "$want" > "$marker"
say "$(ls "$dir/libs" | wc -l) jars, $(du -sh "$dir/libs" | cut -f1), in $(( $(date +%s) - started )) s"
echo "$dir/libs"
