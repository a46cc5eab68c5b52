#!/usr/bin/env bash
# Checks the deployment files without a Docker engine or a Kubernetes cluster:
#   docker-compose.yml        docker-compose config -q (Debian's docker-compose 1.29) and, when Go
#                             is there, the compose-spec loader that `docker compose` v2 uses;
#                             plus what the stack relies on (replicas, no host port, /ready check,
#                             stop grace > drain deadline, the input topic created)
#   deploy/Dockerfile         stage layout, --locked, one stub per [[bench]], non-root user;
#                             .dockerignore keeps what the build needs; the probe script works
#   deploy/prometheus/        promtool check config, check rules, test rules (alerts.test.yml)
#   deploy/grafana/           dashboard JSON shape, datasource uid, PromQL syntax (via promtool)
#   metric names              every metric the dashboard, the alerts and the adapter rule use is
#                             in the catalogue below (and, when readable, in src/telemetry.rs),
#                             with its labels
#   deploy/k8s/               YAML parse, kubernetes-validate --strict (offline schemas),
#                             kustomize build (when Go is there), structural and cross-file checks
#   configurations            `neurostream config` accepts deploy/neurostream.toml with the
#                             compose environment and the ConfigMap with the Secret's keys (only
#                             when a built binary exists: $NEUROSTREAM_BIN, target/{release,debug})
#
# Idempotent; on a fresh Debian machine (as root) it installs what it needs first: apt packages
# docker-compose and prometheus (for promtool), a Python venv with PyYAML and kubernetes-validate
# under ~/.cache/neurostream/deploy-venv, and, if `go` exists, compose-go and kustomize built from
# the Go module proxy into ~/.cache/neurostream/deploy-tools. Prints one line per check; exits 1 if
# any failed. Usage: bash .ci/check-deploy.sh
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
started=$(date +%s)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/neurostream"
venv="$cache/deploy-venv"
tools="$cache/deploy-tools"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

say() { echo "check-deploy: $*"; }

# ---------------------------------------------------------------------------------------------
# Installs (each skipped when already there)
# ---------------------------------------------------------------------------------------------
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

install_start=$(date +%s)
if ! command -v docker-compose >/dev/null || ! command -v promtool >/dev/null \
    || ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    t=$(date +%s)
    export DEBIAN_FRONTEND=noninteractive
    { as_root apt-get update -q && as_root apt-get install -y -q --no-install-recommends \
        docker-compose prometheus python3-venv; } > "$work/apt.log" 2>&1 \
        || { say "apt-get install failed:"; tail -n 20 "$work/apt.log"; exit 1; }
    say "installed docker-compose, prometheus (promtool), python3-venv with apt-get ($(( $(date +%s) - t )) s)"
fi

py_reqs="PyYAML==6.0.3 kubernetes-validate==1.37.0"
if [ "$(cat "$venv/.reqs" 2>/dev/null)" != "$py_reqs" ]; then
    t=$(date +%s)
    rm -rf "$venv"
    python3 -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check $py_reqs \
        && { "$venv/bin/python" -c 'import tomllib' 2>/dev/null || "$venv/bin/pip" install -q tomli; } \
        && echo "$py_reqs" > "$venv/.reqs" || { say "python venv set-up failed"; exit 1; }
    say "created $venv with $py_reqs ($(( $(date +%s) - t )) s)"
fi
py="$venv/bin/python"

compose_go_version=v2.16.2
kustomize_version=v5.7.1
have_go=false
if command -v go >/dev/null; then
    have_go=true
    if [ ! -x "$tools/compose-check-$compose_go_version" ]; then
        t=$(date +%s)
        mkdir -p "$tools/compose-check-src"
        cat > "$tools/compose-check-src/main.go" <<'EOF'
// Loads compose files the way `docker compose` v2 does (schema validation, interpolation,
// normalisation) and prints each service with its replica count.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	wd, _ := os.Getwd()
	opts, err := cli.NewProjectOptions(os.Args[1:], cli.WithOsEnv, cli.WithDotEnv, cli.WithWorkingDirectory(wd))
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		fmt.Println(err)
		os.Exit(1)
	}
	for _, name := range project.ServiceNames() {
		s := project.Services[name]
		replicas := "1"
		if s.Deploy != nil && s.Deploy.Replicas != nil {
			replicas = fmt.Sprint(*s.Deploy.Replicas)
		}
		fmt.Printf("%s=%s ", name, replicas)
	}
	fmt.Println()
}
EOF
        ( cd "$tools/compose-check-src" && rm -f go.mod go.sum \
          && go mod init compose-check >/dev/null 2>&1 \
          && go get "github.com/compose-spec/compose-go/v2@$compose_go_version" >/dev/null 2>&1 \
          && go mod tidy >/dev/null 2>&1 \
          && go build -o "$tools/compose-check-$compose_go_version" . ) \
          && say "built the compose-spec loader, compose-go $compose_go_version ($(( $(date +%s) - t )) s)" \
          || say "warning: could not build the compose-spec loader; that check is skipped"
    fi
    if [ ! -x "$tools/kustomize-$kustomize_version" ]; then
        t=$(date +%s)
        GOBIN="$tools/bin" go install "sigs.k8s.io/kustomize/kustomize/v5@$kustomize_version" >/dev/null 2>&1 \
            && mv "$tools/bin/kustomize" "$tools/kustomize-$kustomize_version" \
            && say "built kustomize $kustomize_version ($(( $(date +%s) - t )) s)" \
            || say "warning: could not build kustomize; that check is skipped"
    fi
fi
say "tools ready ($(( $(date +%s) - install_start )) s)"

# ---------------------------------------------------------------------------------------------
# The checks in Python (one file; the metric catalogue lives here and only here)
# ---------------------------------------------------------------------------------------------
cat > "$work/checks.py" <<'PYEOF'
import json, os, re, subprocess, sys, tempfile
import yaml
try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

# The metrics the service exports: name -> (kind, labels). Keep in step with src/telemetry.rs.
CATALOGUE = {
    "neurostream_build_info": ("gauge", ["version"]),
    "neurostream_messages_consumed_total": ("counter", ["topic", "partition"]),
    "neurostream_events_total": ("counter", ["topic", "partition"]),
    "neurostream_dead_letters_total": ("counter", ["topic", "reason"]),
    "neurostream_late_events_dropped_total": ("counter", ["topic"]),
    "neurostream_output_messages_total": ("counter", ["topic"]),
    "neurostream_outliers_total": ("counter", ["topic"]),
    "neurostream_drift_alerts_total": ("counter", ["topic", "severity"]),
    "neurostream_active_clusters": ("gauge", ["topic", "partition"]),
    "neurostream_consumer_lag_messages": ("gauge", ["topic", "partition"]),
    "neurostream_end_to_end_latency_seconds": ("histogram", ["topic"]),
    "neurostream_processing_latency_seconds": ("histogram", ["topic"]),
    "neurostream_sink_commit_seconds": ("histogram", []),
    "neurostream_sink_batch_rows": ("histogram", []),
    "neurostream_sink_rows_total": ("counter", ["topic"]),
    "neurostream_sink_rejected_rows_total": ("counter", ["topic"]),
    "neurostream_checkpoint_bytes": ("gauge", ["topic", "partition"]),
    "neurostream_state_keys": ("gauge", ["topic", "partition"]),
    "neurostream_state_open_windows": ("gauge", ["topic", "partition"]),
    "neurostream_batch_retrying_seconds": ("gauge", ["topic", "partition"]),
    "neurostream_retries_total": ("counter", ["stage"]),
    "neurostream_partition_pauses_total": ("counter", []),
    "neurostream_assigned_partitions": ("gauge", []),
    "neurostream_rebalances_total": ("counter", ["stage"]),
    "neurostream_revoke_deadline_misses_total": ("counter", []),
    "neurostream_producer_queue_messages": ("gauge", []),
    "neurostream_offset_duplicates_total": ("counter", ["topic"]),
    "neurostream_offsets_skipped_total": ("counter", ["topic"]),
    "neurostream_fenced_batches_total": ("counter", ["topic"]),
    "neurostream_produce_diverted_total": ("counter", ["topic", "reason"]),
}
# Values of enumerated labels, per metric.
LABEL_VALUES = {
    ("neurostream_dead_letters_total", "reason"): {
        "not_json", "invalid_field", "oversized", "empty", "missing_timestamp",
        "dimension_mismatch", "nul_character", "key_too_long", "timestamp_out_of_range",
        "future_timestamp", "late", "sink_rejected", "output_rejected"},
    ("neurostream_drift_alerts_total", "severity"): {"low", "medium", "high"},
    ("neurostream_retries_total", "stage"): {"produce", "sink", "checkpoint_load"},
    ("neurostream_rebalances_total", "stage"): {"assign", "revoke"},
    ("neurostream_produce_diverted_total", "reason"): {
        "dead_letter_truncated", "output_dead_lettered", "dead_letter_lost"},
}
# Labels Prometheus (or its service discovery) adds, and metrics it makes itself.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "le", "deployment"}
BUILTIN_METRICS = {"up": ["job", "instance"]}

REPO = os.getcwd()
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
                "and", "or", "unless"}


def fail(msg):
    print(msg)
    sys.exit(1)


def load_yaml_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def metric_base(name):
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and CATALOGUE.get(name[: -len(suffix)], ("",))[0] == "histogram":
            return name[: -len(suffix)]
    return name


def check_expr(expr, where, problems, used):
    """Metric names, matcher labels and values, and by/without labels of one PromQL expression."""
    names = set()
    for m in re.finditer(r"\b((?:neurostream_[a-z0-9_]+)|up)\b(\s*\{([^}]*)\})?", expr):
        raw, matchers = m.group(1), m.group(3)
        base = metric_base(raw)
        if base in CATALOGUE:
            labels = set(CATALOGUE[base][1]) | TARGET_LABELS
        elif base in BUILTIN_METRICS:
            labels = set(BUILTIN_METRICS[base]) | TARGET_LABELS
        else:
            problems.append(f"{where}: metric {raw} is not in the catalogue")
            continue
        if CATALOGUE.get(base, ("",))[0] == "histogram" and raw == base:
            problems.append(f"{where}: histogram {base} used without _bucket/_sum/_count")
        names.add(base)
        used.add(base)
        for lm in re.finditer(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"', matchers or ""):
            label, op, value = lm.groups()
            if label not in labels:
                problems.append(f"{where}: {base} has no label {label}")
            allowed = LABEL_VALUES.get((base, label))
            if allowed and op in ("=", "=~") and "$" not in value and value not in ("", ".*", ".+"):
                for v in value.split("|"):
                    if v not in allowed:
                        problems.append(f"{where}: {base}{{{label}}} never has the value {v!r}")
    known = set().union(*(set(CATALOGUE.get(n, (None, BUILTIN_METRICS.get(n, [])))[1]) for n in names)) | TARGET_LABELS if names else TARGET_LABELS
    for g in re.finditer(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        for label in [x.strip() for x in g.group(1).split(",") if x.strip()]:
            if label not in known:
                problems.append(f"{where}: grouping by {label}, which none of {sorted(names)} has")


def promtool_syntax(exprs, problems):
    """PromQL syntax through promtool: each expression becomes a recording rule."""
    rules = {"groups": [{"name": "syntax", "rules": [
        {"record": f"check:expr_{i}", "expr": e} for i, (_, e) in enumerate(exprs)]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump(rules, f)
    r = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
    os.unlink(f.name)
    if r.returncode != 0:
        problems.append("promtool rejects an expression:\n" + r.stdout + r.stderr)
        for where, e in exprs:
            problems.append(f"  {where}: {e}")


def grafana_subst(expr):
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")
            .replace("$__range", "1h").replace("$topic", ".*").replace("$instance", ".*"))


def telemetry_names():
    path = os.path.join(REPO, "src/telemetry.rs")
    if not os.path.exists(path):
        return None
    text = open(path).read()
    block = text[text.find("catalogue!"):] if "catalogue!" in text else text
    return set(re.findall(r'"(neurostream_[a-z0-9_]+)"', block))


# ---------------------------------------------------------------------------------------------
def cmd_metrics():
    """Every metric (and label) used by the alerts, the dashboard and the adapter rule exists."""
    problems, used, exprs = [], set(), []
    for group in yaml.safe_load(open("deploy/prometheus/alerts.yml"))["groups"]:
        for rule in group["rules"]:
            where = f"alerts.yml {rule.get('alert') or rule.get('record')}"
            check_expr(rule["expr"], where, problems, used)
    dash = json.load(open("deploy/grafana/dashboards/neurostream.json"))
    for p in dash["panels"]:
        for t in p.get("targets", []):
            where = f"dashboard panel {p['id']} {p['title']!r} {t['refId']}"
            check_expr(t["expr"], where, problems, used)
            exprs.append((where, grafana_subst(t["expr"])))
    for a in dash.get("annotations", {}).get("list", []):
        if a.get("expr"):
            check_expr(a["expr"], f"dashboard annotation {a['name']}", problems, used)
            exprs.append((f"annotation {a['name']}", grafana_subst(a["expr"])))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("definition", "")
        m = re.match(r"label_values\((?:(.*),\s*)?([a-z_]+)\)$", q)
        if m and m.group(1):
            check_expr(m.group(1), f"dashboard variable {v['name']}", problems, used)
    adapter = yaml.safe_load(open("deploy/k8s/prometheus-adapter-values.yaml"))
    for rule in adapter["rules"]["external"]:
        series = re.match(r"([a-z_:]+)", rule["seriesQuery"]).group(1)
        q = rule["metricsQuery"].replace("<<.Series>>", series).replace(
            "<<.LabelMatchers>>", 'namespace="ns",topic="events"')
        check_expr(rule["seriesQuery"], "prometheus-adapter seriesQuery", problems, used)
        check_expr(q, "prometheus-adapter metricsQuery", problems, used)
        exprs.append(("prometheus-adapter metricsQuery", q))
    promtool_syntax(exprs, problems)
    exported = telemetry_names()
    note = ""
    if exported is not None:
        missing = sorted(n for n in used if n in CATALOGUE and n not in exported)
        if missing:
            problems.append(f"used here but not exported by src/telemetry.rs: {missing}")
        drift = sorted((set(CATALOGUE) ^ exported))
        note = f"; catalogue vs src/telemetry.rs differ in {drift}" if drift else "; matches src/telemetry.rs"
    if problems:
        fail("\n".join(problems))
    unused = sorted(set(CATALOGUE) - used)
    ours = used & set(CATALOGUE)
    print(f"{len(ours)} of the {len(CATALOGUE)} catalogue metrics used (+ {', '.join(sorted(used - ours)) or 'nothing else'}), none unknown{note}"
          + (f"; unused: {', '.join(unused)}" if unused else ""))


def cmd_dashboard():
    """Dashboard JSON and provisioning shape."""
    problems = []
    dash = json.load(open("deploy/grafana/dashboards/neurostream.json"))
    ds = yaml.safe_load(open("deploy/grafana/provisioning/datasources/prometheus.yml"))
    uids = {d["uid"] for d in ds["datasources"]}
    prov = yaml.safe_load(open("deploy/grafana/provisioning/dashboards/neurostream.yml"))
    paths = {p["options"]["path"] for p in prov["providers"]}
    compose = yaml.safe_load(open("docker-compose.yml"))
    mounts = compose["services"]["grafana"]["volumes"]
    if not any(m.startswith("./deploy/grafana/dashboards:") and m.split(":")[1] in paths for m in mounts):
        problems.append(f"compose does not mount deploy/grafana/dashboards at the provider path {paths}")
    if not dash.get("uid") or not dash.get("title"):
        problems.append("dashboard needs uid and title")
    if not (36 <= dash.get("schemaVersion", 0) <= 41):
        problems.append(f"schemaVersion {dash.get('schemaVersion')} (expected ~39)")
    ids, panels = set(), dash["panels"]
    for p in panels:
        if p["id"] in ids:
            problems.append(f"duplicate panel id {p['id']}")
        ids.add(p["id"])
        g = p["gridPos"]
        if g["x"] < 0 or g["w"] <= 0 or g["x"] + g["w"] > 24 or g["h"] <= 0:
            problems.append(f"panel {p['id']} gridPos out of the 24-column grid: {g}")
        if p["type"] == "row":
            continue
        if p.get("datasource", {}).get("uid") not in uids:
            problems.append(f"panel {p['id']} datasource {p.get('datasource')} is not a provisioned uid {uids}")
        if not p.get("targets"):
            problems.append(f"panel {p['id']} {p['title']!r} has no query")
        for t in p.get("targets", []):
            if t.get("datasource", {}).get("uid") not in uids or not t.get("expr"):
                problems.append(f"panel {p['id']} target {t.get('refId')} lacks expr or datasource uid")
    # overlapping panels
    cells = {}
    for p in panels:
        g = p["gridPos"]
        for yy in range(g["y"], g["y"] + g["h"]):
            for xx in range(g["x"], g["x"] + g["w"]):
                if (xx, yy) in cells:
                    problems.append(f"panels {cells[(xx, yy)]} and {p['id']} overlap at {(xx, yy)}")
                    break
                cells[(xx, yy)] = p["id"]
    need = {
        "events/s": r"rate\(neurostream_events_total", "lag": "neurostream_consumer_lag_messages",
        "e2e p99": r"histogram_quantile\(0\.99, .*neurostream_end_to_end_latency_seconds_bucket",
        "processing quantiles": "neurostream_processing_latency_seconds_bucket",
        "DLQ by reason": r"sum by \(reason\) \(rate\(neurostream_dead_letters_total",
        "late events": "neurostream_late_events_dropped_total",
        "sink commit p95": r"histogram_quantile\(0\.95, .*neurostream_sink_commit_seconds_bucket",
        "sink batch rows": "neurostream_sink_batch_rows", "active clusters": "neurostream_active_clusters",
        "drift by severity": r"by \(severity\) \(rate\(neurostream_drift_alerts_total",
        "state keys": "neurostream_state_keys", "open windows": "neurostream_state_open_windows",
        "checkpoint bytes": "neurostream_checkpoint_bytes", "retries by stage": r"by \(stage\) \(rate\(neurostream_retries_total",
        "rebalances": "neurostream_rebalances_total", "assigned partitions": "neurostream_assigned_partitions",
    }
    all_exprs = "\n".join(t["expr"] for p in panels for t in p.get("targets", []))
    for what, pattern in need.items():
        if not re.search(pattern, all_exprs):
            problems.append(f"no panel shows {what}")
    if problems:
        fail("\n".join(problems))
    print(f"uid={dash['uid']} schemaVersion={dash['schemaVersion']} "
          f"{sum(p['type'] != 'row' for p in panels)} panels, datasource uid {sorted(uids)}")


def cmd_compose():
    """What the stack relies on, read from `docker-compose config` output (stdin)."""
    cfg = yaml.safe_load(sys.stdin)
    problems = []
    s = cfg["services"]
    ns = s.get("neurostream", {})
    toml = tomllib.load(open("deploy/neurostream.toml", "rb"))
    env = ns.get("environment", {})
    deadline = int(env.get("NEUROSTREAM__KAFKA__REVOKE_DEADLINE_MS", toml["kafka"].get("revoke_deadline_ms", 15000)))
    if int(ns.get("deploy", {}).get("replicas", 1)) < 2:
        problems.append("neurostream: deploy.replicas should be 2")
    if ns.get("ports"):
        problems.append("neurostream: a host port stops `--scale` (use expose)")
    if ns.get("container_name"):
        problems.append("neurostream: container_name stops `--scale`")
    test = " ".join(ns.get("healthcheck", {}).get("test", []))
    if "/ready" not in test:
        problems.append("neurostream: healthcheck should probe /ready")
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(ns.get("stop_grace_period", "10s")))
    grace = (int(m.group(1) or 0) * 60 + int(m.group(2) or 0)) if m else 0
    if grace * 1000 <= deadline:
        problems.append(f"neurostream: stop_grace_period {grace}s not above revoke_deadline_ms {deadline}")
    init = " ".join(map(str, s.get("kafka-init", {}).get("command", [])))
    for topic in toml["kafka"]["input_topics"]:
        if not re.search(rf"--topic {re.escape(topic)}\b.*--partitions \d+", init):
            problems.append(f"kafka-init does not create the input topic {topic} with --partitions")
    prod = s.get("producer", {}).get("command", [])
    if prod[:1] != ["produce"] or "--rate" not in prod:
        problems.append("producer should run `neurostream produce --rate …`")
    kafka_env = s["kafka"]["environment"]
    if "EXTERNAL://localhost:9094" not in kafka_env.get("KAFKA_ADVERTISED_LISTENERS", ""):
        problems.append("kafka: no EXTERNAL listener advertised on localhost:9094")
    if not any(str(v).endswith("/var/lib/kafka/data:rw") or str(v).endswith("/var/lib/kafka/data")
               for v in s["kafka"].get("volumes", [])):
        problems.append("kafka: no volume for /var/lib/kafka/data")
    prom = yaml.safe_load(open("deploy/prometheus/prometheus.yml"))
    job = [j for j in prom["scrape_configs"] if j["job_name"] == "neurostream"]
    if not job or "neurostream" not in job[0].get("dns_sd_configs", [{}])[0].get("names", []):
        problems.append("prometheus.yml: job neurostream should discover the compose service by DNS")
    for name in ("kafka", "postgres", "prometheus", "grafana", "kafka-init", "producer"):
        if name not in s:
            problems.append(f"service {name} missing")
    if problems:
        fail("\n".join(problems))
    print(f"replicas={ns['deploy']['replicas']} stop_grace_period={grace}s > "
          f"revoke deadline {deadline / 1000:g}s; input topics {toml['kafka']['input_topics']} created by kafka-init")


def cmd_dockerfile():
    """Dockerfile layout and .dockerignore."""
    import fnmatch
    problems = []
    text = open("deploy/Dockerfile").read()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    if len(froms) < 2:
        problems.append("not multi-stage")
    if not any("slim" in f for f in froms[1:]):
        problems.append("runtime stage is not debian *-slim")
    if "bookworm" not in text:
        problems.append("not built/run on bookworm")
    for need in ("--locked", "ca-certificates", "libssl3", "EXPOSE 9100", "COPY Cargo.toml Cargo.lock"):
        if need not in text:
            problems.append(f"missing {need!r}")
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("final stage runs as root")
    cargo = tomllib.load(open("Cargo.toml", "rb"))
    benches = [b["name"] for b in cargo.get("bench", [])]
    if any("path" in b for b in cargo.get("bench", [])):
        problems.append("a [[bench]] has a path: the Dockerfile's stubs assume benches/<name>.rs")
    awk = re.search(r"\$\((awk .*?Cargo\.toml)\)", text)
    if not awk:
        problems.append("no awk over Cargo.toml for the bench stubs")
    else:
        out = subprocess.run(["sh", "-c", awk.group(1)], capture_output=True, text=True).stdout.split()
        if out != benches:
            problems.append(f"stub benches {out} != Cargo.toml's {benches}")
    # .dockerignore: Docker's rules (last matching pattern wins, ! re-includes).
    patterns = [l.strip() for l in open(".dockerignore") if l.strip() and not l.startswith("#")]

    def ignored(path):
        result = False
        for p in patterns:
            neg = p.startswith("!")
            p = p[1:] if neg else p
            p = p.rstrip("/")
            parts = path.split("/")
            hit = any(fnmatch.fnmatch("/".join(parts[:i]), p) or fnmatch.fnmatch("/".join(parts[:i]), p.replace("**/", ""))
                      for i in range(1, len(parts) + 1))
            if hit:
                result = not neg
        return result
    copied = [m.group(2) for m in re.finditer(r"^COPY\s+((?:--\S+\s+)*)(.+?)\s+\S+$", text, re.M)
              if "--from" not in m.group(1)]
    for srcs in copied:
        for src in srcs.split():
            if src.startswith("--"):
                continue
            if ignored(src):
                problems.append(f".dockerignore excludes {src}, which the Dockerfile copies")
    for must_go in ("target/release/x", ".git/HEAD", "docs/operating.md", "tests/pipeline.rs"):
        if not ignored(must_go):
            problems.append(f".dockerignore lets {must_go} into the context")
    if problems:
        fail("\n".join(problems))
    print(f"stages {froms}; bench stubs {benches}; user {users[-1]}; .dockerignore keeps every COPY source")


def cmd_k8s():
    """Structural and cross-file checks of deploy/k8s."""
    problems = []
    base = "deploy/k8s"
    kust = yaml.safe_load(open(f"{base}/kustomization.yaml"))
    docs = {}
    for f in sorted(os.listdir(base)):
        if not f.endswith((".yaml", ".yml")):
            continue
        for d in load_yaml_all(f"{base}/{f}"):
            if f in ("kustomization.yaml", "prometheus-adapter-values.yaml"):
                continue
            for key in ("apiVersion", "kind"):
                if not d.get(key):
                    problems.append(f"{f}: no {key}")
            if not d.get("metadata", {}).get("name"):
                problems.append(f"{f}: no metadata.name")
            if d.get("metadata", {}).get("namespace"):
                problems.append(f"{f}: carries a namespace (the manifests are namespace-less)")
            docs[d["kind"]] = (f, d)
    for r in kust["resources"]:
        if not os.path.exists(f"{base}/{r}"):
            problems.append(f"kustomization lists missing {r}")
    if "secret.example.yaml" in kust["resources"]:
        problems.append("kustomization must not apply the example Secret")
    if "keda-scaledobject.yaml" in kust["resources"] and "hpa-prometheus-adapter.yaml" in kust["resources"]:
        problems.append("KEDA and the HPA both target the Deployment")
    cm = docs["ConfigMap"][1]
    toml = tomllib.loads(cm["data"]["neurostream.toml"])
    kafka = toml["kafka"]
    partitions = kafka.get("topic_partitions")
    deadline_ms = kafka.get("revoke_deadline_ms", 15000)
    dep = docs["Deployment"][1]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    if spec.get("replicas") is not None:
        problems.append("Deployment sets replicas (the autoscaler owns it)")
    if not all(labels.get(k) == v for k, v in spec["selector"]["matchLabels"].items()):
        problems.append("Deployment selector does not match its pod labels")
    if spec.get("strategy", {}).get("rollingUpdate", {}).get("maxSurge") not in (0, "0", "0%"):
        problems.append("rolling update should not surge (a surge pod owns no partition and never gets ready)")
    if pod.get("terminationGracePeriodSeconds", 30) * 1000 <= deadline_ms:
        problems.append("terminationGracePeriodSeconds not above revoke_deadline_ms")
    sc = pod.get("securityContext", {})
    if not sc.get("runAsNonRoot") or not sc.get("runAsUser"):
        problems.append("pod must run as a numeric non-root user")
    (c,) = [c for c in pod["containers"] if c["name"] == "neurostream"]
    csc = c.get("securityContext", {})
    if not csc.get("readOnlyRootFilesystem") or csc.get("allowPrivilegeEscalation") is not False:
        problems.append("container: readOnlyRootFilesystem and no privilege escalation")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    if ports.get("metrics") != 9100:
        problems.append("container port `metrics` should be 9100")
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready"), ("startupProbe", "/health")):
        get = c.get(probe, {}).get("httpGet")
        if not get:
            problems.append(f"{probe} missing")
            continue
        if get["path"] != path:
            problems.append(f"{probe} should GET {path}")
        if get["port"] not in ports and get["port"] not in ports.values():
            problems.append(f"{probe} port {get['port']} is no container port")
    if not c.get("resources", {}).get("requests") or not c.get("resources", {}).get("limits", {}).get("memory"):
        problems.append("resources: requests and a memory limit")
    ann = spec["template"]["metadata"].get("annotations", {})
    if ann.get("prometheus.io/scrape") != "true" or int(ann.get("prometheus.io/port", 0)) not in ports.values():
        problems.append("pod annotations prometheus.io/scrape + port of the metrics port")
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    cfg_vol = [n for n, v in vols.items() if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
    if not cfg_vol or mounts.get(cfg_vol[0]) != "/etc/neurostream":
        problems.append("the ConfigMap must be mounted at /etc/neurostream (the image reads neurostream.toml there)")
    if "/tmp" not in mounts.values():
        problems.append("a writable /tmp (emptyDir) is needed with a read-only root")
    secret_refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
    secret = docs["Secret"][1]
    if secret["metadata"]["name"] not in secret_refs:
        problems.append("envFrom does not reference the example Secret's name")
    if "NEUROSTREAM__POSTGRES__URL" not in secret.get("stringData", {}):
        problems.append("the Secret example has no NEUROSTREAM__POSTGRES__URL")
    svc = docs["Service"][1]
    if not all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()):
        problems.append("Service selector does not match the pods")
    for p in svc["spec"]["ports"]:
        if p.get("name") != "metrics" or p.get("port") != 9100 or (p["targetPort"] not in ports and p["targetPort"] not in ports.values()):
            problems.append(f"Service port {p} should be 9100 named metrics, targeting the container port")
    pdb = docs["PodDisruptionBudget"][1]
    if str(pdb["spec"].get("maxUnavailable")) != "1":
        problems.append("PDB maxUnavailable should be 1")
    if not all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items()):
        problems.append("PDB selector does not match the pods")
    so = docs["ScaledObject"][1]
    ss = so["spec"]
    if ss["scaleTargetRef"]["name"] != dep["metadata"]["name"]:
        problems.append("ScaledObject targets another Deployment")
    allowed_spec = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                    "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "advanced", "triggers", "fallback"}
    if set(ss) - allowed_spec:
        problems.append(f"ScaledObject: unknown spec keys {set(ss) - allowed_spec}")
    (trig,) = [t for t in ss["triggers"] if t["type"] == "kafka"]
    md = trig["metadata"]
    if any(not isinstance(v, str) for v in md.values()):
        problems.append("ScaledObject trigger metadata values must be strings (quote them)")
    for key, want in (("bootstrapServers", kafka["brokers"]), ("consumerGroup", kafka["group_id"])):
        if md.get(key) != want:
            problems.append(f"KEDA {key} {md.get(key)!r} != ConfigMap {want!r}")
    if md.get("topic") not in kafka["input_topics"]:
        problems.append(f"KEDA topic {md.get('topic')!r} is not an input topic")
    if "lagThreshold" not in md:
        problems.append("KEDA trigger without lagThreshold")
    if partitions and ss.get("maxReplicaCount") != partitions:
        problems.append(f"KEDA maxReplicaCount {ss.get('maxReplicaCount')} != partitions {partitions}")
    hpa = load_yaml_all(f"{base}/hpa-prometheus-adapter.yaml")[0]
    if hpa["spec"]["scaleTargetRef"]["name"] != dep["metadata"]["name"]:
        problems.append("HPA targets another Deployment")
    if partitions and hpa["spec"]["maxReplicas"] != partitions:
        problems.append(f"HPA maxReplicas {hpa['spec']['maxReplicas']} != partitions {partitions}")
    adapter = yaml.safe_load(open(f"{base}/prometheus-adapter-values.yaml"))
    names = {r["name"]["as"] for r in adapter["rules"]["external"]}
    for m in hpa["spec"]["metrics"]:
        if m["type"] == "External" and m["external"]["metric"]["name"] not in names:
            problems.append(f"HPA metric {m['external']['metric']['name']} is not served by the adapter rule {names}")
    if problems:
        fail("\n".join(problems))
    print(f"{len(docs)} manifests; probes on port metrics=9100; grace {pod['terminationGracePeriodSeconds']}s > "
          f"{deadline_ms / 1000:g}s; KEDA/HPA max {partitions} = partitions; selectors match")


def cmd_yaml():
    """Every YAML file under deploy/ and docker-compose.yml parses."""
    n = 0
    for root, _, files in os.walk("deploy"):
        for f in files:
            if f.endswith((".yml", ".yaml")):
                load_yaml_all(os.path.join(root, f))
                n += 1
    load_yaml_all("docker-compose.yml")
    json.load(open("deploy/grafana/dashboards/neurostream.json"))
    print(f"{n + 1} YAML files and the dashboard JSON parse")


def cmd_extract():
    """Writes the k8s ConfigMap's TOML and the example Secret's env for `neurostream config`."""
    out = sys.argv[2]
    cm = load_yaml_all("deploy/k8s/configmap.yaml")[0]
    open(f"{out}/k8s.toml", "w").write(cm["data"]["neurostream.toml"])
    secret = load_yaml_all("deploy/k8s/secret.example.yaml")[0]
    with open(f"{out}/k8s.env", "w") as f:
        for k, v in secret["stringData"].items():
            f.write(f"{k}={v}\n")
    cfg = yaml.safe_load(open(f"{out}/compose.yml"))
    with open(f"{out}/compose.env", "w") as f:
        for k, v in cfg["services"]["neurostream"].get("environment", {}).items():
            f.write(f"{k}={v}\n")


{"metrics": cmd_metrics, "dashboard": cmd_dashboard, "compose": cmd_compose,
 "dockerfile": cmd_dockerfile, "k8s": cmd_k8s, "yaml": cmd_yaml, "extract": cmd_extract}[sys.argv[1]]()
PYEOF

# ---------------------------------------------------------------------------------------------
# Running the checks
# ---------------------------------------------------------------------------------------------
passed=0
failed=0
skipped=0
check() { # check NAME COMMAND...: one line per check; the output only on failure (indented)
    local name="$1"; shift
    local t0 out rc dt
    t0=$(date +%s.%N)
    out="$("$@" 2>&1)"; rc=$?
    dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if [ "$rc" = 0 ]; then
        passed=$((passed + 1))
        printf 'check-deploy: ok      %-28s %5s s  %s\n' "$name" "$dt" "$(echo "$out" | tail -n 1 | cut -c1-150)"
    else
        failed=$((failed + 1))
        printf 'check-deploy: FAILED  %-28s %5s s\n' "$name" "$dt"
        echo "$out" | sed 's/^/    /'
    fi
}
skip() { skipped=$((skipped + 1)); printf 'check-deploy: skipped %-28s         %s\n' "$1" "$2"; }

check "yaml/json parse" "$py" "$work/checks.py" yaml
check "docker-compose config -q" sh -c "docker-compose -f docker-compose.yml config -q && echo \"valid for \$(docker-compose version --short)\""
docker-compose -f docker-compose.yml config > "$work/compose.yml" 2>/dev/null
check "compose: service contract" sh -c "'$py' '$work/checks.py' compose < '$work/compose.yml'"
if [ -x "$tools/compose-check-$compose_go_version" ]; then
    check "compose-go $compose_go_version load" "$tools/compose-check-$compose_go_version" docker-compose.yml
else
    skip "compose-go load" "(needs go)"
fi
check "dockerfile + .dockerignore" "$py" "$work/checks.py" dockerfile
probe_test() {
    bash -n deploy/neurostream-probe.sh || return 1
    cat > "$work/srv.py" <<'EOF'
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/health"
        body = b"ok" if ok else b"not ready: no partitions assigned yet"
        self.send_response(200 if ok else 503)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
print(s.server_port, flush=True)
s.serve_forever()
EOF
    local port pid
    coproc SRV { exec "$py" "$work/srv.py"; }
    pid=$SRV_PID
    read -r port <&"${SRV[0]}"
    local ok=0
    bash deploy/neurostream-probe.sh /health "$port" >/dev/null 2>&1 || ok=1
    bash deploy/neurostream-probe.sh /ready "$port" >/dev/null 2>&1 && ok=1
    kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    bash deploy/neurostream-probe.sh /ready "$port" >/dev/null 2>&1 && ok=1
    [ "$ok" = 0 ] && echo "200 -> 0, 503 -> 1, closed port -> 1"
    return $ok
}
check "neurostream-probe" probe_test
check "promtool check config" promtool check config deploy/prometheus/prometheus.yml
check "promtool check rules" promtool check rules deploy/prometheus/alerts.yml
check "promtool test rules" promtool test rules deploy/prometheus/alerts.test.yml
check "grafana dashboard" "$py" "$work/checks.py" dashboard
check "metric names and labels" "$py" "$work/checks.py" metrics
k8s_files=(deploy/k8s/configmap.yaml deploy/k8s/deployment.yaml deploy/k8s/service.yaml
           deploy/k8s/pdb.yaml deploy/k8s/secret.example.yaml deploy/k8s/hpa-prometheus-adapter.yaml)
check "kubernetes-validate --strict" sh -c "'$venv/bin/kubernetes-validate' --strict --quiet ${k8s_files[*]} && echo '${#k8s_files[@]} manifests valid against the Kubernetes 1.37 schemas'"
check "k8s structure + cross-refs" "$py" "$work/checks.py" k8s
if [ -x "$tools/kustomize-$kustomize_version" ]; then
    check "kustomize build" sh -c "'$tools/kustomize-$kustomize_version' build deploy/k8s > '$work/built.yaml' && '$venv/bin/kubernetes-validate' --strict --quiet '$work/built.yaml' && echo \"\$(grep -c '^kind:' '$work/built.yaml') resources rendered; built-in kinds valid\""
else
    skip "kustomize build" "(needs go)"
fi
bin="${NEUROSTREAM_BIN:-}"
for candidate in target/debug/neurostream target/release/neurostream "$(command -v neurostream 2>/dev/null)"; do
    [ -z "$bin" ] && [ -n "$candidate" ] && [ -x "$candidate" ] && bin="$candidate"
done
if [ -n "$bin" ]; then
    "$py" "$work/checks.py" extract "$work"
    run_config() { # run_config ENV_FILE TOML: `neurostream config` with those variables
        local vars=()
        while IFS= read -r line; do [ -n "$line" ] && vars+=("$line"); done < "$1"
        env "${vars[@]}" "$bin" --config "$2" config >/dev/null && echo "accepted by $bin"
    }
    check "config: compose toml + env" run_config "$work/compose.env" deploy/neurostream.toml
    check "config: k8s ConfigMap+Secret" run_config "$work/k8s.env" "$work/k8s.toml"
else
    skip "neurostream config" "(no built binary: set NEUROSTREAM_BIN or build first)"
fi

total=$((passed + failed))
if [ "$failed" = 0 ]; then
    say "all $total checks ok ($skipped skipped) in $(( $(date +%s) - started )) s"
else
    say "$failed of $total checks FAILED ($skipped skipped) in $(( $(date +%s) - started )) s"
    exit 1
fi
