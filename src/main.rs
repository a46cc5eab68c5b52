//! The `neurostream` binary: a thin command-line layer over the library.

use std::io::{BufReader, BufWriter};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use neurostream::config::{self, Profile};
use neurostream::store::Store;
use neurostream::telemetry::{self, Progress};
use neurostream::{app, demo, http, offline, tools};

/// mimalloc instead of glibc's malloc: the service allocates per message (payloads, keys,
/// outputs, COPY rows) from several threads, and glibc's allocator took about a fifth of the
/// service's CPU in the end-to-end benchmark's profile. The `override` feature makes it the
/// process's `malloc` too: librdkafka allocates every produced message and header on a tokio
/// thread and its delivery-report thread frees them, a cross-thread pattern that took 15 % of
/// the service's CPU in glibc (`_int_malloc`, `_int_free`); 5.5-6.0 -> 4.6-4.9 CPU-s per million
/// events in the end-to-end benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Transparent huge pages off for this process. mimalloc asks for them on its arenas
/// (`MADV_HUGEPAGE`), and with the traffic between librdkafka's threads and the workers (memory
/// allocated on one thread and freed on another, purged and taken again) the kernel zeroed whole
/// 2 MiB pages over and over: `clear_page_erms` was 5-10 % of the machine in the end-to-end
/// benchmark's profile (0.1 % with this). Set before anything else allocates much; it holds for
/// every later page fault of the process, whatever the system's THP mode (`always` included).
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) takes integers only and changes a flag of the
    // process's memory map; no memory of ours is read or written. Refusal (an old kernel) only
    // leaves huge pages on.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

#[derive(Parser)]
#[command(
    name = "neurostream",
    version,
    about = "Kafka-native online clustering and event-time windows"
)]
struct Cli {
    /// Configuration file (TOML); environment variables NEUROSTREAM__SECTION__KEY override it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service against the configured broker and database.
    Run,
    /// Run the whole pipeline on this machine: embedded broker, private PostgreSQL, generator.
    Demo {
        /// Events to generate.
        #[arg(long, default_value_t = 200_000)]
        events: u64,
        /// Input partitions.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..=256))]
        partitions: i32,
        /// Kafka client and sink profile.
        #[arg(long, value_enum, default_value = "balanced")]
        profile: ProfileArg,
        /// Use this database instead of starting a private server.
        #[arg(long, env = "DATABASE_URL")]
        database_url: Option<String>,
    },
    /// The per-partition processor offline: JSON-lines events (or an Avro object container
    /// file) in, JSON-lines outputs out.
    Process {
        /// Input file (default: stdin).
        #[arg(long)]
        input: Option<PathBuf>,
        /// Output file (default: stdout).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Coalesce window updates (`emit = update|both`) over this many lines.
        #[arg(long, default_value_t = offline::UPDATE_BATCH_LINES)]
        update_every: u64,
        /// Clustering algorithm (overrides the configuration).
        #[arg(long, value_parser = ["ncs", "ncs-v8"])]
        algorithm: Option<String>,
        /// NCS preset: real_time_low_latency, high_accuracy_research, large_scale_production,
        /// streaming_iot (overrides the configuration's preset).
        #[arg(long)]
        preset: Option<String>,
        /// Add one `assignment` line per clustered event, in input order.
        #[arg(long)]
        assignments: bool,
    },
    /// Publish synthetic clustered events (or a JSON-lines file) to an input topic.
    Produce {
        /// Topic (default: the first input topic).
        #[arg(long)]
        topic: Option<String>,
        /// Events to send.
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        /// Events per second (0: as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Send this JSON-lines file instead of synthetic events.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Make one synthetic message in this many malformed (0: none).
        #[arg(long, default_value_t = 0)]
        malformed_every: u64,
        /// `json`, or `avro`: the Confluent wire format with the event schema registered under
        /// `<topic>-value` (needs schema_registry.url); malformed lines are sent as they are.
        #[arg(long, value_parser = ["json", "avro"], default_value = "json")]
        format: String,
        /// Seed of the synthetic stream.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Event time of the first synthetic event, epoch ms (default: now).
        #[arg(long)]
        start_ts: Option<i64>,
        /// Feature dimension of the synthetic events.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
        dimension: u64,
        /// Distinct keys of the synthetic events.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..))]
        keys: u64,
        /// Gaussian blobs of the synthetic events.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        clusters: u64,
        /// Event-time step between consecutive synthetic events, in milliseconds (0.001 to
        /// 3,600,000; fractions put several events in one millisecond: with 0.05 and 100 keys a
        /// 1 s window holds ~200 events per key).
        #[arg(long, default_value = "5", value_parser = parse_step_us)]
        step_ms: i64,
        /// Send event n to partition n mod P (default: partitioned by key).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
        partitions: Option<i32>,
    },
    /// Print output topics' messages as JSON lines.
    Tail {
        /// Topics (default: every output topic).
        #[arg(long)]
        topic: Vec<String>,
        /// Start from the beginning instead of new messages only.
        #[arg(long)]
        from_beginning: bool,
        /// Stop after this many messages.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Apply the database migrations and exit.
    Migrate,
    /// Print the effective configuration, secrets masked, with the source of every value.
    Config,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ProfileArg {
    Throughput,
    Balanced,
    Latency,
}

impl From<ProfileArg> for Profile {
    fn from(p: ProfileArg) -> Self {
        match p {
            ProfileArg::Throughput => Profile::Throughput,
            ProfileArg::Balanced => Profile::Balanced,
            ProfileArg::Latency => Profile::Latency,
        }
    }
}

fn main() -> ExitCode {
    no_transparent_huge_pages();
    // apache-avro (tail, container files) reserves memory by the counts a datum claims: bound
    // it (the service's own decoder needs no such bound).
    let _ = apache_avro::max_allocation_bytes(64 << 20);
    let cli = Cli::parse();
    let loaded = match config::load(cli.config.as_deref()) {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_logging(&loaded.config.log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime builds on any supported OS");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run => run(loaded.config).await,
            Command::Demo {
                events,
                partitions,
                profile,
                database_url,
            } => demo::run(demo::DemoOptions {
                events,
                partitions,
                profile: profile.into(),
                database_url,
                progress_line: true,
            })
            .await
            .map(|_| ()),
            Command::Process {
                input,
                output,
                update_every,
                algorithm,
                preset,
                assignments,
            } => {
                let mut config = loaded.config.clone();
                let clustering = &mut config.processing.clustering;
                if let Some(a) = algorithm {
                    clustering.algorithm = serde_json::from_value(serde_json::Value::String(a))?;
                }
                if let Some(p) = preset {
                    clustering.preset = Some(
                        serde_json::from_value(serde_json::Value::String(p.clone()))
                            .map_err(|_| anyhow::anyhow!("unknown preset `{p}`"))?,
                    );
                }
                let options = offline::OfflineOptions {
                    update_every,
                    assignments,
                };
                process(&config, input, output, options)
            }
            Command::Produce {
                topic,
                events,
                rate,
                file,
                malformed_every,
                format,
                seed,
                start_ts,
                dimension,
                keys,
                clusters,
                step_ms,
                partitions,
            } => {
                let topic = topic.unwrap_or_else(|| loaded.config.kafka.input_topics[0].clone());
                let opts = tools::ProduceOptions {
                    topic,
                    events,
                    rate,
                    file,
                    malformed_every,
                    synthetic: tools::SyntheticOptions {
                        seed,
                        start_ms: start_ts,
                        dimension: dimension as usize,
                        keys: keys as usize,
                        clusters: clusters as usize,
                        step_us: step_ms,
                    },
                    partitions,
                    avro: format == "avro",
                };
                tools::produce(&loaded.config, opts).await.map(|_| ())
            }
            Command::Tail {
                topic,
                from_beginning,
                limit,
            } => {
                let topics = if topic.is_empty() {
                    let t = &loaded.config.kafka.topics;
                    t.all().iter().map(|s| s.to_string()).collect()
                } else {
                    topic
                };
                let config = loaded.config.clone();
                tokio::task::spawn_blocking(move || {
                    tools::tail(&config, &topics, from_beginning, limit)
                })
                .await?
            }
            Command::Migrate => migrate(&loaded.config).await,
            Command::Config => {
                print!("{}", loaded.config.describe(&loaded.figment));
                Ok(())
            }
        }
    });
    // NB: a blocked librdkafka call (brokers unreachable at shutdown) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", chain(&err));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: many errors (sqlx's, ours) already
/// quote their source in their own message.
fn chain(err: &anyhow::Error) -> String {
    let mut out = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

async fn run(config: config::Config) -> anyhow::Result<()> {
    // An unset URL is reported before anything listens.
    config
        .postgres
        .connect_options()
        .map_err(|e| anyhow::anyhow!(e))?;
    let progress = Arc::new(Progress::default());
    let shutdown = CancellationToken::new();
    // The port first: a taken port is a start-up error, reported before waiting on anything.
    if let Some(addr) = config.http.address {
        let listener = http::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on http.address {addr}: {e}"))?;
        let handle = http::install_recorder()?;
        http::spawn_upkeep(handle.clone(), shutdown.clone());
        let (progress, shutdown) = (progress.clone(), shutdown.clone());
        let limits = http::Limits {
            stall_timeout: Duration::from_millis(config.http.stall_timeout_ms),
            ready_max_lag: config.http.ready_max_lag,
        };
        tokio::spawn(async move {
            if let Err(err) = http::serve(listener, handle, progress, limits, shutdown).await {
                tracing::error!(%addr, error = %err, "HTTP endpoints failed");
            }
        });
    }
    let store = Store::Postgres(app::open_postgres(&config, Duration::from_secs(60)).await?);
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received: draining partitions (a second signal exits at once)");
            shutdown.cancel();
            wait_for_signal().await;
            eprintln!("second signal: exiting without draining (the checkpoints stay consistent)");
            std::process::exit(130);
        });
    }
    app::run(Arc::new(config), store, progress, shutdown).await?;
    Ok(())
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler works on unix");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn migrate(config: &config::Config) -> anyhow::Result<()> {
    let mut config = config.clone();
    config.postgres.migrate_on_start = true;
    app::open_postgres(&config, Duration::from_secs(30)).await?;
    println!("migrations applied");
    Ok(())
}

fn process(
    config: &config::Config,
    input: Option<PathBuf>,
    output: Option<PathBuf>,
    options: offline::OfflineOptions,
) -> anyhow::Result<()> {
    let mut reader: Box<dyn std::io::BufRead> = match input {
        Some(path) => {
            Box::new(BufReader::new(std::fs::File::open(&path).map_err(|e| {
                anyhow::anyhow!("cannot open input {}: {e}", path.display())
            })?))
        }
        None => Box::new(BufReader::new(std::io::stdin().lock())),
    };
    let writer: Box<dyn std::io::Write> = match output {
        Some(path) => Box::new(BufWriter::new(std::fs::File::create(&path).map_err(
            |e| anyhow::anyhow!("cannot create output {}: {e}", path.display()),
        )?)),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    // An Avro object container file (magic `Obj` 1) carries its writer schema; anything else is
    // JSON lines.
    let container = reader.fill_buf()?.starts_with(b"Obj\x01");
    let stats = if container {
        offline::process_avro_container(config, options, reader, writer, std::io::stderr().lock())?
    } else {
        offline::process_lines(config, options, reader, writer, std::io::stderr().lock())?
    };
    eprintln!(
        "processed {} lines: {} rejected, {} outputs",
        stats.lines, stats.rejected, stats.outputs
    );
    Ok(())
}

/// `--step-ms` in whole microseconds: 0.001 ms to one hour.
fn parse_step_us(s: &str) -> Result<i64, String> {
    let ms: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of milliseconds"))?;
    if !(0.001..=3_600_000.0).contains(&ms) {
        return Err(format!("{s} ms is outside 0.001..=3600000"));
    }
    Ok((ms * 1_000.0).round() as i64)
}
