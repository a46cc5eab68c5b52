//! Apache Kafka itself, in KRaft mode, for the integration tests: one or three real broker JVMs on
//! loopback, started from the Maven Central jars that `.ci/install-kafka.sh` puts in one `libs/`
//! directory (no Docker and no download site here, only package registries).
//!
//! Each node is a combined broker+controller (`process.roles=broker,controller`): one node is a
//! complete cluster, three nodes form one three-voter controller quorum, so a node can be killed
//! and the other two still elect a controller and partition leaders. The quorum is static
//! (`controller.quorum.voters`), so every node is formatted alike and a killed node restarts from
//! its own log dir with no re-registration step.
//!
//! Committed offsets are read with Kafka's own `ConsumerGroupCommand` (the class behind
//! `kafka-consumer-groups.sh`), so the tests check them the way an operator would, not through
//! the client under test.
//!
//! The calls that wait (`start`, `restart`, `leader_of`, `committed_offsets`) block the calling
//! thread: call them from a `#[tokio::test(flavor = "multi_thread")]` test, or the tasks of a
//! single-threaded runtime stand still meanwhile.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// The Kafka release that `.ci/install-kafka.sh` installs (`.ci/kafka/pom.xml`).
pub const KAFKA_VERSION: &str = "4.3.1";

/// How long a node may take from `java` to answering metadata: 3-8 s here, 10-15 s while other
/// JVMs start on the same 2 cores; the margin is for a loaded CI machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Maximum heap per broker JVM. The tests move a few MB; 256 MiB leaves room for replication
/// and log recovery, and three brokers stay under 1 GiB of RSS (~270-300 MB each, most of it
/// metaspace, code and thread stacks rather than heap).
const BROKER_HEAP: &str = "-Xmx256m";

/// The main class of `kafka-consumer-groups.sh` in Kafka 4.x (it moved out of `kafka.admin`).
const CONSUMER_GROUP_COMMAND: &str = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand";

/// Broker log4j2 configuration: WARN and above to the JVM's stdout, which goes to the node's
/// `server.log`. At INFO a broker writes hundreds of lines at start-up alone; the WARN lines are
/// the ones a failing test needs (they are in the log tail of every panic here).
const LOG4J2_PROPERTIES: &str = "\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
";

/// One row of `kafka-consumer-groups --describe`: `(topic, partition, committed offset,
/// log-end offset, lag)`; `None` where the tool prints `-`.
pub type OffsetRow = (String, i32, Option<i64>, i64, Option<i64>);

/// The `libs/` directory holding Kafka's jars: `NEUROSTREAM_KAFKA_LIBS` if set, else
/// `$NEUROSTREAM_KAFKA_HOME/libs`, else `$HOME/.cache/neurostream/kafka-4.3.1/libs` (where
/// `.ci/install-kafka.sh` puts them). `None` when that directory holds no `kafka_2.13-*.jar`.
pub fn kafka_libs() -> Option<PathBuf> {
    let libs = if let Some(p) = std::env::var_os("NEUROSTREAM_KAFKA_LIBS") {
        PathBuf::from(p)
    } else if let Some(home) = std::env::var_os("NEUROSTREAM_KAFKA_HOME") {
        PathBuf::from(home).join("libs")
    } else {
        PathBuf::from(std::env::var_os("HOME")?)
            .join(".cache/neurostream")
            .join(format!("kafka-{KAFKA_VERSION}"))
            .join("libs")
    };
    // The install script moves a complete libs/ into place in one rename, so the broker jar
    // being there means the rest is too.
    let has_broker = fs::read_dir(&libs).ok()?.flatten().any(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name.starts_with("kafka_2.13-") && name.ends_with(".jar")
    });
    has_broker.then_some(libs)
}

/// One KRaft node: a combined broker+controller JVM.
struct Node {
    id: i32,
    /// The PLAINTEXT listener, for clients and replication.
    port: u16,
    /// The CONTROLLER listener, for the Raft quorum.
    controller_port: u16,
    /// `server.properties`, `server.log`, `pid` and the `data/` log dir.
    dir: PathBuf,
    /// `None` once killed.
    child: Option<Child>,
}

impl Node {
    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }
}

/// A private Apache Kafka cluster of 1 or more KRaft nodes on loopback, in a fresh temp dir.
///
/// Dropping it kills every JVM and removes the temp dir (kept, and its path printed, when the
/// drop happens during a panic, so the broker logs can be read).
pub struct KafkaCluster {
    /// The secured listeners of a [`KafkaCluster::start_secured`] cluster.
    secured: Option<SecuredListeners>,
    libs: PathBuf,
    root: PathBuf,
    nodes: Vec<Node>,
    /// Kills the JVMs if this test process ends without dropping the cluster (kept in a
    /// `static`, aborted, killed): see [`spawn_watchdog`].
    watchdog: Option<Child>,
}

impl KafkaCluster {
    /// Starts a cluster of `nodes` KRaft nodes, each a broker and a controller (1 node: a whole
    /// cluster; 3 nodes: a three-voter quorum that survives one loss), and blocks until every
    /// broker answers a metadata request listing all the brokers.
    ///
    /// Panics when the jars are not installed (see [`KafkaCluster::start_or_skip`]), when a
    /// node cannot be formatted or started, or with the tail of its log when a node is not ready
    /// within 60 s.
    pub fn start(nodes: usize) -> KafkaCluster {
        Self::start_with(nodes, None)
    }

    /// A one-node cluster with two secured listeners beside its PLAINTEXT one (which the
    /// harness's own admin calls keep using): `SASL_SSL` (SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN
    /// for user `user`/`password`, the SCRAM credentials created by Kafka's own storage tool at
    /// format time) and `SSL` requiring a client certificate (mutual TLS). `keystore` holds the
    /// broker's PKCS#8 key followed by its certificate, `truststore` the CA certificate that
    /// signs client certificates (PEM files: see `tls::Pki`).
    pub fn start_secured(
        keystore: &Path,
        truststore: &Path,
        user: &str,
        password: &str,
    ) -> KafkaCluster {
        Self::start_with(
            1,
            Some(Secured {
                keystore: keystore.to_path_buf(),
                truststore: truststore.to_path_buf(),
                user: user.to_string(),
                password: password.to_string(),
            }),
        )
    }

    /// The `SASL_SSL` listener's address (a [`KafkaCluster::start_secured`] cluster).
    pub fn sasl_ssl_bootstrap(&self) -> String {
        let s = self.secured.as_ref().expect("a secured cluster");
        format!("127.0.0.1:{}", s.sasl_ssl_port)
    }

    /// The mutual-TLS `SSL` listener's address (a [`KafkaCluster::start_secured`] cluster).
    pub fn ssl_bootstrap(&self) -> String {
        let s = self.secured.as_ref().expect("a secured cluster");
        format!("127.0.0.1:{}", s.ssl_port)
    }

    fn start_with(nodes: usize, secured: Option<Secured>) -> KafkaCluster {
        assert!(nodes >= 1, "a Kafka cluster needs at least one node");
        assert!(
            secured.is_none() || nodes == 1,
            "secured listeners are for one-node clusters"
        );
        let libs = kafka_libs().unwrap_or_else(|| {
            panic!("Apache Kafka jars not installed: run .ci/install-kafka.sh or set NEUROSTREAM_KAFKA_LIBS")
        });
        let started = Instant::now();
        let root = unique_temp_dir();
        fs::write(root.join("log4j2.properties"), LOG4J2_PROPERTIES)
            .unwrap_or_else(|e| panic!("cannot write to {}: {e}", root.display()));

        // All 2N ports are bound at once, so no two listeners get the same one, then released;
        // the window until the brokers bind them is the usual free-port race, not worth a retry
        // loop in tests.
        let ports = free_ports(2 * nodes + 2);
        let listeners = secured.map(|settings| SecuredListeners {
            sasl_ssl_port: ports[2 * nodes],
            ssl_port: ports[2 * nodes + 1],
            settings,
        });
        let mut cluster = KafkaCluster {
            secured: listeners,
            libs,
            root,
            nodes: (0..nodes)
                .map(|i| Node {
                    id: i as i32 + 1,
                    port: ports[2 * i],
                    controller_port: ports[2 * i + 1],
                    dir: PathBuf::new(),
                    child: None,
                })
                .collect(),
            watchdog: None,
        };
        cluster.watchdog = spawn_watchdog(&cluster.root);

        let voters = cluster
            .nodes
            .iter()
            .map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        for i in 0..nodes {
            let dir = cluster.root.join(format!("node-{}", cluster.nodes[i].id));
            fs::create_dir_all(dir.join("data"))
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
            let mut props = server_properties(&cluster.nodes[i], &dir, &voters, nodes);
            if let Some(secured) = &cluster.secured {
                props = secured.apply(&props, cluster.nodes[i].port);
            }
            fs::write(dir.join("server.properties"), props).unwrap_or_else(|e| {
                panic!("cannot write {}/server.properties: {e}", dir.display())
            });
            cluster.nodes[i].dir = dir;
        }

        // Format every log dir with the same cluster id, the nodes in parallel: each format is
        // a JVM start of its own (~1.3 s). With static voters the plain format is the right one
        // (`--standalone`/`--initial-controllers` are for a dynamic quorum and refuse
        // `controller.quorum.voters`).
        let cluster_id = random_cluster_id();
        let formats: Vec<(i32, Child)> = cluster
            .nodes
            .iter()
            .map(|n| {
                let mut cmd = cluster.java(&cluster.tool_jvm_opts());
                cmd.arg("kafka.tools.StorageTool")
                    .arg("format")
                    .arg("--config")
                    .arg(n.dir.join("server.properties"))
                    .arg("--cluster-id")
                    .arg(&cluster_id)
                    .args(cluster.secured.iter().flat_map(|s| s.scram_args()))
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let child = cmd
                    .spawn()
                    .unwrap_or_else(|e| panic!("cannot run java (is a JDK 17+ on PATH?): {e}"));
                (n.id, child)
            })
            .collect();
        for (id, child) in formats {
            let out = child
                .wait_with_output()
                .unwrap_or_else(|e| panic!("waiting for the storage format of node {id}: {e}"));
            assert!(
                out.status.success(),
                "kafka-storage format failed for node {id} ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        for i in 0..nodes {
            cluster.spawn_node(i);
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        for i in 0..nodes {
            cluster.wait_ready(i, deadline);
        }
        eprintln!(
            "kafka: {nodes} KRaft node(s) ready in {:.1} s at {} ({})",
            started.elapsed().as_secs_f64(),
            cluster.bootstrap(),
            cluster.root.display()
        );
        cluster
    }

    /// [`KafkaCluster::start`] when the jars are installed. Without them: panics if
    /// `NEUROSTREAM_REQUIRE_KAFKA` is set (CI must not pass by skipping), else prints
    /// `SKIPPED: Apache Kafka jars not installed (run .ci/install-kafka.sh)` and returns `None`.
    pub fn start_or_skip(nodes: usize) -> Option<KafkaCluster> {
        if kafka_libs().is_some() {
            return Some(KafkaCluster::start(nodes));
        }
        if std::env::var_os("NEUROSTREAM_REQUIRE_KAFKA").is_some() {
            panic!(
                "NEUROSTREAM_REQUIRE_KAFKA is set but the Apache Kafka jars are not installed: \
                 run .ci/install-kafka.sh, or set NEUROSTREAM_KAFKA_LIBS to its libs directory"
            );
        }
        println!("SKIPPED: Apache Kafka jars not installed (run .ci/install-kafka.sh)");
        None
    }

    /// The client bootstrap list of every node, killed ones included:
    /// `127.0.0.1:p1,127.0.0.1:p2,...`. Clients find the live ones themselves.
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node ids (= broker ids), `1..=N`.
    pub fn node_ids(&self) -> Vec<i32> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Creates `name` with `partitions` partitions of `replication` replicas, and waits until
    /// every running broker's metadata shows a leader for each partition: a client bootstrapped
    /// on any node can use the topic as soon as this returns. Panics on failure.
    pub async fn create_topic(&self, name: &str, partitions: i32, replication: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.live_bootstrap())
            .set("broker.address.family", "v4")
            .create()
            .unwrap_or_else(|e| panic!("cannot create a Kafka admin client: {e}"));
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replication));
        let opts = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(30)))
            .request_timeout(Some(Duration::from_secs(30)));
        let results = admin
            .create_topics([&topic], &opts)
            .await
            .unwrap_or_else(|e| panic!("CreateTopics {name} failed: {e}"));
        for r in results {
            if let Err((t, code)) = r {
                panic!("CreateTopics {t} failed: {code}");
            }
        }
        // CreateTopics returns once the controller committed the topic; the brokers learn it
        // from the metadata log a moment later, each on its own.
        let ports: Vec<(i32, u16)> = self.live_nodes().map(|n| (n.id, n.port)).collect();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            for (id, port) in ports {
                let probe = probe_client(&format!("127.0.0.1:{port}"));
                loop {
                    let last = match probe.fetch_metadata(Some(&name), Duration::from_secs(2)) {
                        Ok(md) => match md.topics().iter().find(|t| t.name() == name) {
                            Some(t)
                                if t.error().is_none()
                                    && t.partitions().len() == partitions as usize
                                    && t.partitions().iter().all(|p| p.leader() >= 0) =>
                            {
                                break
                            }
                            Some(t) => format!("{:?}", t.error()),
                            None => "absent".to_string(),
                        },
                        Err(e) => e.to_string(),
                    };
                    assert!(
                        Instant::now() < deadline,
                        "topic {name} has no leaders on node {id} after 30 s: {last}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    }

    /// The node id leading `topic`'s `partition` in the cluster metadata, read from a running
    /// node; `-1` while there is no leader. A killed leader is still named until the controller
    /// fences it (`broker.session.timeout.ms`, 3 s here): poll until the answer changes. Panics
    /// when the metadata cannot be read within 10 s or lacks that partition.
    pub fn leader_of(&self, topic: &str, partition: i32) -> i32 {
        let probe = probe_client(&self.live_bootstrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let err = match probe.fetch_metadata(Some(topic), Duration::from_secs(3)) {
                Ok(md) => {
                    let t = md.topics().iter().find(|t| t.name() == topic);
                    match t.and_then(|t| t.partitions().iter().find(|p| p.id() == partition)) {
                        Some(p) => return p.leader(),
                        None => format!("no partition {topic}/{partition} in the metadata"),
                    }
                }
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "leader of {topic}/{partition}: {err}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILLs node `node_id`'s JVM (a crash: no controlled shutdown, no leader hand-over)
    /// and reaps it. Its ports and log dir stay reserved for [`KafkaCluster::restart`].
    pub fn kill(&mut self, node_id: i32) {
        let i = self.index_of(node_id);
        let node = &mut self.nodes[i];
        let mut child = node
            .child
            .take()
            .unwrap_or_else(|| panic!("Kafka node {node_id} is not running"));
        // Child::kill is SIGKILL on Unix.
        let _ = child.kill();
        let _ = child.wait();
        let _ = fs::remove_file(node.dir.join("pid"));
    }

    /// Starts killed node `node_id` again on the same ports and log dir (it recovers its logs
    /// and catches up from the others), and blocks until it answers metadata listing every
    /// running broker. Panics with its log tail after 60 s.
    pub fn restart(&mut self, node_id: i32) {
        let i = self.index_of(node_id);
        assert!(
            self.nodes[i].child.is_none(),
            "Kafka node {node_id} is still running: kill it first"
        );
        let started = Instant::now();
        self.spawn_node(i);
        self.wait_ready(i, started + READY_TIMEOUT);
        eprintln!(
            "kafka: node {node_id} restarted, ready in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }

    /// `(topic, partition, committed offset, log-end offset, lag)` for every partition of
    /// `group`, as Kafka's own `kafka-consumer-groups --describe --group` reports them
    /// (`ConsumerGroupCommand` run from the same jars), sorted by topic and partition.
    ///
    /// `None` is the tool's `-` (no committed offset, so no lag); a log-end offset the tool does
    /// not know is `-1`. Empty when the group does not exist, or is rebalancing (the tool then
    /// prints no table): poll if the group may be between generations. Blocks for the tool's
    /// JVM (~1.5 s); panics when the tool fails for another reason.
    pub fn committed_offsets(&self, group: &str) -> Vec<OffsetRow> {
        // A coordinator moving after a kill answers COORDINATOR_NOT_AVAILABLE for a moment;
        // the tool gives up at once, so try a few times.
        let mut last = String::new();
        for attempt in 0..5 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_secs(1));
            }
            let out = self
                .java(&self.tool_jvm_opts())
                .arg(CONSUMER_GROUP_COMMAND)
                .arg("--bootstrap-server")
                .arg(self.live_bootstrap())
                .arg("--describe")
                .arg("--group")
                .arg(group)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run java for {CONSUMER_GROUP_COMMAND}: {e}"));
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            // The tool exits 0 even when it failed; its verdict is an `Error:` line.
            let error = stdout
                .lines()
                .chain(stderr.lines())
                .find(|l| l.starts_with("Error:"));
            match error {
                None if out.status.success() => return parse_group_table(&stdout, group),
                Some(e) if e.contains("GroupIdNotFoundException") => return Vec::new(),
                _ => last = format!("exit {}\n{stdout}{stderr}", out.status),
            }
        }
        panic!("{CONSUMER_GROUP_COMMAND} --describe --group {group} failed: {last}");
    }

    /// The bootstrap list of the nodes that are running.
    fn live_bootstrap(&self) -> String {
        self.live_nodes()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn live_nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.child.is_some())
    }

    fn index_of(&self, node_id: i32) -> usize {
        self.nodes
            .iter()
            .position(|n| n.id == node_id)
            .unwrap_or_else(|| panic!("no Kafka node {node_id} (nodes are {:?})", self.node_ids()))
    }

    /// `java` (from `JAVA_HOME` if set, like Kafka's scripts) with Kafka's jars and our log4j2
    /// configuration.
    fn java(&self, opts: &[&str]) -> Command {
        let java = std::env::var_os("JAVA_HOME")
            .map(|h| PathBuf::from(h).join("bin/java"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("java"));
        let mut cmd = Command::new(java);
        cmd.args(opts)
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.root.join("log4j2.properties").display()
            ))
            // `java` expands a trailing `/*` itself: every jar in the directory.
            .arg("-cp")
            .arg(format!("{}/*", self.libs.display()));
        cmd
    }

    /// JVM options for the short-lived tools (storage format, consumer groups): C1 only and
    /// the serial GC start fastest and use one core, which is what a 1-second tool needs.
    fn tool_jvm_opts(&self) -> Vec<&'static str> {
        vec![
            "-Xmx128m",
            "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC",
            "-XX:-UsePerfData",
        ]
    }

    /// Starts node `i`'s JVM, its stdout and stderr appended to its `server.log`.
    fn spawn_node(&mut self, i: usize) {
        let node = &self.nodes[i];
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.log_path())
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", node.log_path().display()));
        let log2 = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone a log file handle: {e}"));
        let mut cmd = self.java(&[
            BROKER_HEAP,
            // A small initial heap: the default (1/64 of RAM, here all 256 MiB) is committed
            // and touched up front, ~60 MB more RSS per broker for nothing.
            "-Xms32m",
            // Test brokers serve a few MB on a 2-core machine: the serial GC adds no GC
            // threads, and C1-only JIT saves a second of CPU at start with no visible cost
            // at these rates.
            "-XX:+UseSerialGC",
            "-XX:TieredStopAtLevel=1",
            // No /tmp/hsperfdata_* files left behind by killed JVMs.
            "-XX:-UsePerfData",
            "-Djava.awt.headless=true",
        ]);
        cmd.arg("kafka.Kafka")
            .arg(node.dir.join("server.properties"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run java (is a JDK 17+ on PATH?): {e}"));
        // For the watchdog: what to kill if this test process dies without dropping us.
        let _ = fs::write(node.dir.join("pid"), child.id().to_string());
        self.nodes[i].child = Some(child);
    }

    /// Blocks until node `i` answers a metadata request that lists itself and every other
    /// running broker (so it is unfenced and has caught up with the metadata log), or panics
    /// with the tail of its log at `deadline` or when its JVM exits.
    fn wait_ready(&mut self, i: usize, deadline: Instant) {
        let live: Vec<i32> = self.live_nodes().map(|n| n.id).collect();
        let (id, port) = (self.nodes[i].id, self.nodes[i].port);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut probe: Option<BaseConsumer> = None;
        let mut last = "listener not open yet".to_string();
        loop {
            if let Some(status) = self.nodes[i]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.nodes[i].child = None;
                panic!(
                    "Kafka node {id} exited during start-up ({status}); tail of {}:\n{}",
                    self.nodes[i].log_path().display(),
                    log_tail(&self.nodes[i].log_path())
                );
            }
            // A plain connect first: librdkafka would log and back off on refused connections,
            // for up to 10 s per retry by default.
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                let probe = probe.get_or_insert_with(|| probe_client(&format!("127.0.0.1:{port}")));
                match probe.fetch_metadata(None, Duration::from_secs(2)) {
                    Ok(md) => {
                        let brokers: Vec<i32> = md.brokers().iter().map(|b| b.id()).collect();
                        if live.iter().all(|id| brokers.contains(id)) {
                            return;
                        }
                        last = format!("metadata lists brokers {brokers:?}, waiting for {live:?}");
                    }
                    Err(e) => last = format!("metadata request: {e}"),
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "Kafka node {id} (127.0.0.1:{port}) not ready within {} s ({last}); tail of {}:\n{}",
                    READY_TIMEOUT.as_secs(),
                    self.nodes[i].log_path().display(),
                    log_tail(&self.nodes[i].log_path())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        if std::thread::panicking() {
            eprintln!("kafka: broker logs kept in {}", self.root.display());
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

/// What a secured cluster is given: PEM files and the SASL user.
struct Secured {
    /// The broker's private key (PKCS#8) followed by its certificate, one PEM file.
    keystore: PathBuf,
    /// The CA certificate that signs brokers and clients.
    truststore: PathBuf,
    user: String,
    password: String,
}

/// The secured listeners' ports and settings.
struct SecuredListeners {
    sasl_ssl_port: u16,
    ssl_port: u16,
    settings: Secured,
}

impl SecuredListeners {
    /// `server.properties` with the secured listeners added to the plain ones.
    fn apply(&self, props: &str, plain_port: u16) -> String {
        let s = &self.settings;
        let (sasl, ssl) = (self.sasl_ssl_port, self.ssl_port);
        let mut out = String::new();
        for line in props.lines() {
            let line = match line.split_once('=') {
                Some(("listeners", v)) => {
                    format!("listeners={v},SASL_SSL://127.0.0.1:{sasl},SSL://127.0.0.1:{ssl}")
                }
                Some(("advertised.listeners", _)) => format!(
                    "advertised.listeners=PLAINTEXT://127.0.0.1:{plain_port},\
                     SASL_SSL://127.0.0.1:{sasl},SSL://127.0.0.1:{ssl}"
                ),
                Some(("listener.security.protocol.map", v)) => {
                    format!("listener.security.protocol.map={v},SASL_SSL:SASL_SSL,SSL:SSL")
                }
                _ => line.to_string(),
            };
            out.push_str(&line);
            out.push('\n');
        }
        let (user, password) = (&s.user, &s.password);
        out.push_str(&format!(
            "\
# TLS on both secured listeners: PEM key + certificate chain, PEM CA (no JKS, no keytool).
ssl.keystore.type=PEM
ssl.keystore.location={keystore}
ssl.truststore.type=PEM
ssl.truststore.location={truststore}
listener.name.ssl.ssl.client.auth=required
listener.name.sasl_ssl.ssl.client.auth=none
sasl.enabled.mechanisms=SCRAM-SHA-512,SCRAM-SHA-256,PLAIN
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_{user}=\"{password}\";
",
            keystore = s.keystore.display(),
            truststore = s.truststore.display(),
        ));
        out
    }

    /// The storage tool's arguments creating the SCRAM credentials (Kafka's own tooling).
    fn scram_args(&self) -> Vec<String> {
        let s = &self.settings;
        ["SCRAM-SHA-512", "SCRAM-SHA-256"]
            .iter()
            .flat_map(|m| {
                [
                    "--add-scram".to_string(),
                    format!("{m}=[name={},password={}]", s.user, s.password),
                ]
            })
            .collect()
    }
}

/// One node's `server.properties`: a combined broker+controller with test-sized settings.
fn server_properties(node: &Node, dir: &Path, voters: &str, nodes: usize) -> String {
    let rf = nodes.min(3);
    // With 3 replicas, acks=all writes need 2 in sync: one node may die and writes go on,
    // and an acknowledged write is on two nodes. A single node can only ever have one.
    let min_isr = if nodes >= 3 { 2 } else { 1 };
    format!(
        "\
process.roles=broker,controller
node.id={id}
controller.quorum.voters={voters}
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data}
num.partitions=1
default.replication.factor={rf}
min.insync.replicas={min_isr}
auto.create.topics.enable=false
offsets.topic.replication.factor={rf}
offsets.topic.num.partitions=3
transaction.state.log.replication.factor={rf}
transaction.state.log.min.isr={min_isr}
transaction.state.log.num.partitions=3
share.coordinator.state.topic.replication.factor={rf}
share.coordinator.state.topic.min.isr={min_isr}
share.coordinator.state.topic.num.partitions=1
group.initial.rebalance.delay.ms=0
# NB: the tests produce with synthetic timestamps (1970). Time-based retention (7 days) would
# delete those segments at the broker's first retention check, 30 s after start, and a lagging
# consumer would jump to the new log start (the service reports it as skipped offsets).
log.retention.ms=-1
# A killed broker is fenced, and its partitions get new leaders, after this session timeout
# (default 9 s): 3 s keeps the failover tests short.
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
# 2 cores: fewer threads than the defaults (3 network, 8 I/O) per broker.
num.network.threads=2
num.io.threads=2
num.replica.fetchers=1
num.recovery.threads.per.data.dir=1
background.threads=2
",
        id = node.id,
        port = node.port,
        cport = node.controller_port,
        data = dir.join("data").display(),
    )
}

/// A metadata-only client bootstrapped on `bootstrap`, retrying refused connections quickly.
fn probe_client(bootstrap: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .set("reconnect.backoff.ms", "50")
        .set("reconnect.backoff.max.ms", "500")
        .create()
        .unwrap_or_else(|e| panic!("cannot create a Kafka metadata client: {e}"))
}

/// Parses `ConsumerGroupCommand --describe`'s table:
///
/// ```text
/// GROUP  TOPIC  PARTITION  CURRENT-OFFSET  LOG-END-OFFSET  LAG  CONSUMER-ID  HOST  CLIENT-ID
/// g      t      0          37              50              13   -            -     -
/// ```
///
/// Columns are found by their header names; only the first six are read, which hold no spaces
/// (the client id, last, may).
pub(crate) fn parse_group_table(stdout: &str, group: &str) -> Vec<OffsetRow> {
    let mut lines = stdout
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("GROUP "));
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let cols: Vec<&str> = header.split_whitespace().collect();
    let col = |name: &str| {
        cols.iter()
            .position(|c| *c == name)
            .unwrap_or_else(|| panic!("no {name} column in the consumer-groups table:\n{stdout}"))
    };
    let (c_topic, c_part, c_cur, c_end, c_lag) = (
        col("TOPIC"),
        col("PARTITION"),
        col("CURRENT-OFFSET"),
        col("LOG-END-OFFSET"),
        col("LAG"),
    );
    let offset = |s: &str| -> Option<i64> {
        (s != "-").then(|| {
            s.parse()
                .unwrap_or_else(|e| panic!("offset {s:?}: {e}\n{stdout}"))
        })
    };
    let mut rows: Vec<_> = lines
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.split_whitespace().next() == Some(group))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() > c_lag, "short consumer-groups row {l:?}");
            (
                f[c_topic].to_string(),
                f[c_part]
                    .parse::<i32>()
                    .unwrap_or_else(|e| panic!("partition {:?}: {e}\n{stdout}", f[c_part])),
                offset(f[c_cur]),
                offset(f[c_end]).unwrap_or(-1),
                offset(f[c_lag]),
            )
        })
        .collect();
    rows.sort();
    rows
}

/// The last 60 lines of a node's log, for panic messages.
fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        text = String::from_utf8_lossy(&buf).into_owned();
    }
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(60)..].join("\n");
    if tail.is_empty() {
        "(empty log)".to_string()
    } else {
        tail
    }
}

/// `n` distinct free loopback ports: all bound at once (so distinct), then released.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| {
            TcpListener::bind("127.0.0.1:0")
                .unwrap_or_else(|e| panic!("cannot bind a loopback port: {e}"))
        })
        .collect();
    listeners
        .iter()
        .map(|l| {
            l.local_addr()
                .unwrap_or_else(|e| panic!("local_addr of a bound socket: {e}"))
                .port()
        })
        .collect()
}

/// A fresh directory under the system temp dir, unique to this process and call.
fn unique_temp_dir() -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "neurostream-kafka-{}-{}-{}",
        std::process::id(),
        random_u64() % 1_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// A random cluster id in Kafka's format: 16 bytes, URL-safe base64 without padding (22
/// characters), like `kafka-storage random-uuid` prints, without a JVM start for it.
pub(crate) fn random_cluster_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&random_u64().to_le_bytes());
    bytes[8..].copy_from_slice(&random_u64().to_le_bytes());
    // A leading `-` would read as an option to the storage tool (Kafka's own generator
    // avoids it too): keep the first 6 bits below 62.
    bytes[0] &= 0x7f;
    let mut out = String::with_capacity(22);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for b in bytes {
        acc = (acc << 8) | b as u32;
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            out.push(ALPHABET[((acc >> bits) & 63) as usize] as char);
        }
    }
    // 128 bits = 21 characters and 2 bits, padded with zero bits like Java's encoder.
    out.push(ALPHABET[((acc << (6 - bits)) & 63) as usize] as char);
    out
}

/// 64 random bits from std's per-process random hasher keys, mixed with the clock.
fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// A `sh` loop that SIGKILLs the cluster's JVMs once this test process is gone. `Drop` does it
/// normally, but a cluster kept in a `static` is never dropped, and an aborted or killed test
/// binary drops nothing: without this, brokers would outlive `cargo test` and hold ports and
/// memory. It polls every second, and exits when `Drop` removes the cluster's directory (or
/// kills it, to keep the logs after a panic); after killing the JVMs it removes that directory.
fn spawn_watchdog(root: &Path) -> Option<Child> {
    let script = r#"
while kill -0 "$1" 2>/dev/null && [ -d "$2" ]; do sleep 1; done
for f in "$2"/node-*/pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null; done
rm -rf "$2"
exit 0
"#;
    let child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("kafka-watchdog")
        .arg(std::process::id().to_string())
        .arg(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(c) => Some(c),
        Err(e) => {
            // Not fatal: only the clean-up after an abnormal exit is lost.
            eprintln!("kafka: no watchdog ({e}); brokers may outlive an aborted test");
            None
        }
    }
}
