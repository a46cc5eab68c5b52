//! A private PostgreSQL server started from the machine's binaries in a temporary directory.
//!
//! Used by `neurostream demo` and the test harness. PostgreSQL refuses to run as root, so when
//! we are root the data directory is handed to the `postgres` user and the server runs as it.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a private server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PgServerError {
    /// No `initdb`/`postgres` binaries were found.
    #[error(
        "no PostgreSQL server binaries found (looked in /usr/lib/postgresql/*/bin and PATH); \
         install them (`apt-get install -y postgresql`) or set DATABASE_URL"
    )]
    NoBinaries,
    /// Running as root and there is no unprivileged `postgres` user to run the server as.
    #[error("running as root and no `postgres` user exists to run the server as")]
    NoUser,
    /// A step failed.
    #[error("{step}: {detail}")]
    Step {
        /// What was being done.
        step: &'static str,
        /// What went wrong.
        detail: String,
    },
}

fn step(step: &'static str, detail: impl ToString) -> PgServerError {
    PgServerError::Step {
        step,
        detail: detail.to_string(),
    }
}

/// A running private server; stopped (immediate mode) and deleted on drop.
#[derive(Debug)]
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: Option<(u32, u32)>,
    child: Option<Child>,
    port: u16,
}

/// How durable the private server is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// PostgreSQL's defaults (the demo).
    Default,
    /// `fsync=off`, `synchronous_commit=off` (tests).
    Fast,
}

/// Directory of the newest installed PostgreSQL server binaries, if any.
pub fn find_binaries() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists() && p.join("postgres").exists())
        .collect();
    dirs.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(dir) = dirs.pop() {
        return Some(dir);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .find(|p| p.join("initdb").exists() && p.join("postgres").exists())
    })
}

fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres") && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn free_port() -> Result<u16, PgServerError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| step("finding a free port", e))?;
    Ok(listener
        .local_addr()
        .map_err(|e| step("finding a free port", e))?
        .port())
}

impl PgServer {
    /// Initialises a cluster in a new temporary directory and starts it on a free loopback port.
    ///
    /// # Errors
    /// [`PgServerError`] naming the step that failed.
    pub fn start(durability: Durability) -> Result<Self, PgServerError> {
        let bin = find_binaries().ok_or(PgServerError::NoBinaries)?;
        let user = if is_root() {
            Some(postgres_user().ok_or(PgServerError::NoUser)?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("neurostream-pg-")
            .tempdir()
            .map_err(|e| step("creating the data directory", e))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(|e| step("handing the data directory to postgres", e))?;
        }
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_user(&mut initdb, user);
        let out = initdb.output().map_err(|e| step("running initdb", e))?;
        if !out.status.success() {
            return Err(step("initdb", String::from_utf8_lossy(&out.stderr)));
        }
        let port = free_port()?;
        let mut server = Self {
            dir,
            bin,
            user,
            child: None,
            port,
        };
        server.spawn(durability)?;
        Ok(server)
    }

    fn spawn(&mut self, durability: Durability) -> Result<(), PgServerError> {
        let data = self.dir.path().join("data");
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(self.dir.path())
            .args(["-p", &self.port.to_string()])
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if durability == Durability::Fast {
            cmd.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        }
        as_user(&mut cmd, self.user);
        let child = cmd.spawn().map_err(|e| step("starting postgres", e))?;
        self.child = Some(child);
        self.spawn_watchdog();
        self.wait_ready(Duration::from_secs(30))
    }

    /// A server outlives a process that exits without dropping it (a static in a test binary,
    /// a killed demo). This shell stops it and removes its files once our process is gone.
    fn spawn_watchdog(&self) {
        let script = format!(
            "while [ -d /proc/{pid} ]; do sleep 1; done; \
             '{ctl}' -D '{data}' -m immediate stop >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            ctl = self.bin.join("pg_ctl").display(),
            data = self.data_dir().display(),
            dir = self.dir.path().display(),
        );
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        as_user(&mut cmd, self.user);
        // Best effort: without it, only a process that skips Drop leaves a server behind.
        let _ = cmd.spawn();
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), PgServerError> {
        let started = Instant::now();
        let socket = self.dir.path().join(format!(".s.PGSQL.{}", self.port));
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(step("postgres exited during start-up", status));
                }
            }
            if socket.exists() && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                // The socket accepts before recovery ends; pg_isready tells when queries work.
                let ready = Command::new(self.bin.join("pg_isready"))
                    .args([
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &self.port.to_string(),
                        "-U",
                        "postgres",
                    ])
                    .stdout(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(true);
                if ready {
                    return Ok(());
                }
            }
            if started.elapsed() > timeout {
                return Err(step("waiting for postgres", "not ready after 30 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for database `db` as the superuser `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Stops the server immediately (as a crash would), keeping its data.
    pub fn kill(&mut self) {
        self.stop_with("immediate");
    }

    /// Starts a stopped server again on the same port and data.
    ///
    /// # Errors
    /// [`PgServerError`] when it does not come up.
    pub fn restart(&mut self, durability: Durability) -> Result<(), PgServerError> {
        self.spawn(durability)
    }

    /// Turns TLS on: installs `cert_pem` (the server's certificate, chain allowed) and `key_pem`
    /// (its key, mode 0600 as PostgreSQL demands) in the data directory, and `client_ca_pem`
    /// (the CA that signs client certificates, for `cert` authentication) when given; replaces
    /// `pg_hba.conf` with `hba` (for example `hostssl all all 127.0.0.1/32 scram-sha-256`), and
    /// restarts.
    ///
    /// # Errors
    /// [`PgServerError`] when a file cannot be written or the server does not come back.
    pub fn enable_tls(
        &mut self,
        cert_pem: &[u8],
        key_pem: &[u8],
        client_ca_pem: Option<&[u8]>,
        hba: &str,
        durability: Durability,
    ) -> Result<(), PgServerError> {
        use std::io::Write as _;
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        self.stop_with("fast");
        let data = self.data_dir();
        let mut settings =
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n".to_string();
        let mut files = vec![
            ("server.crt", cert_pem, 0o644),
            ("server.key", key_pem, 0o600),
            ("pg_hba.conf", hba.as_bytes(), 0o600),
        ];
        if let Some(ca) = client_ca_pem {
            files.push(("client-ca.crt", ca, 0o644));
            settings.push_str("ssl_ca_file = 'client-ca.crt'\n");
        }
        for (name, bytes, mode) in files {
            let path = data.join(name);
            // Created with its final mode: a key is never readable by others, even briefly.
            let _ = std::fs::remove_file(&path);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
                .and_then(|mut f| f.write_all(bytes))
                .map_err(|e| step("writing a TLS file", e))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| step("setting a TLS file's mode", e))?;
            if let Some((uid, gid)) = self.user {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .map_err(|e| step("handing a TLS file to postgres", e))?;
            }
        }
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.auto.conf"))
            .map_err(|e| step("opening postgresql.auto.conf", e))?;
        conf.write_all(settings.as_bytes())
            .map_err(|e| step("writing postgresql.auto.conf", e))?;
        self.spawn(durability)
    }

    fn stop_with(&mut self, mode: &str) {
        if let Some(mut child) = self.child.take() {
            let mut ctl = Command::new(self.bin.join("pg_ctl"));
            ctl.arg("-D")
                .arg(self.data_dir())
                .args(["-m", mode, "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            as_user(&mut ctl, self.user);
            if !ctl.status().map(|s| s.success()).unwrap_or(false) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop_with("immediate");
    }
}

fn as_user(cmd: &mut Command, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
        cmd.env("HOME", "/tmp");
    }
}
