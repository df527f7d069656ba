//! A real PostgreSQL server for tests: Debian's `postgresql` package's
//! binaries, a fresh cluster in a temporary directory, listening on a
//! loopback port, stopped (and its files removed) when dropped.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server's superuser (trust authentication, loopback only).
pub const USER: &str = "airlock";

/// A running server.
pub struct Postgres {
    child: Option<Child>,
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
    run_as: Option<(u32, u32)>,
    /// Server settings besides the defaults (`-c name=value`).
    settings: Vec<String>,
}

/// The newest `/usr/lib/postgresql/<version>/bin` (Debian's layout), or
/// a panic saying which package to install.
fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .expect("PostgreSQL is not installed: `apt-get install postgresql` (the README's test command does)")
}

/// initdb and postgres refuse to run as root: as root, run them as the
/// `postgres` user Debian's package makes.
fn run_as() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let u = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .expect("running as root needs the `postgres` user (Debian's postgresql package makes it)");
    Some((u.uid.as_raw(), u.gid.as_raw()))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Postgres {
    /// Make a cluster and start it.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// [`Postgres::start`] serving TLS with this certificate and key (PEM)
    /// besides plain connections.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        Self::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Self {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("airlock-pg")
            .tempdir()
            .expect("temp dir");
        let run_as = run_as();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let data = dir.path().join("data");
        let out = command(&bin.join("initdb"), run_as)
            .args(["-D", &data.to_string_lossy()])
            .args(["-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut settings = Vec::new();
        if let Some((cert, key)) = tls {
            // The key must be the server's own and private to it.
            for (name, text) in [("server.crt", cert), ("server.key", key)] {
                let path = data.join(name);
                std::fs::write(&path, text).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
                if let Some((uid, gid)) = run_as {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
                }
            }
            settings.extend(
                [
                    "ssl=on",
                    "ssl_cert_file=server.crt",
                    "ssl_key_file=server.key",
                ]
                .map(String::from),
            );
        }
        let mut pg = Self {
            child: None,
            bin,
            dir,
            port: free_port(),
            run_as,
            settings,
        };
        pg.run();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Start the server (again) and wait until it accepts connections.
    /// Right after [`Postgres::kill`] the old server's backends may still
    /// hold its shared memory for a moment: a start refused for that is
    /// tried again.
    pub fn run(&mut self) {
        for _ in 0..20 {
            match self.try_run() {
                Ok(()) => return,
                Err(e) if e.contains("shared memory") || e.contains("already in use") => {
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("{e}"),
            }
        }
        panic!("postgres did not start again after 10 s");
    }

    fn try_run(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "already running");
        let child = command(&self.bin.join("postgres"), self.run_as)
            .args(["-D", &self.data().to_string_lossy()])
            .args(["-p", &self.port.to_string()])
            .args(["-k", &self.dir.path().to_string_lossy()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            // Throwaway data: no fsync, and enough connections for
            // several nodes' pools at once.
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .args(self.settings.iter().flat_map(|s| ["-c", s.as_str()]))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while postgres::Client::connect(&self.url("postgres"), postgres::NoTls).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let mut err = String::new();
                if let Some(mut e) = self.child.take().and_then(|c| c.stderr) {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!("postgres ended ({status}): {err}"));
            }
            assert!(Instant::now() < deadline, "postgres did not start in 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Stop the server at once (SIGKILL: as a crash or a lost network
    /// would look to a client).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Its children (backends) end when they see the postmaster gone;
        // the next start waits for the old shared memory to go.
        let _ = std::fs::remove_file(self.data().join("postmaster.pid"));
    }

    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// A new, empty database; its URL.
    pub fn database(&self, name: &str) -> String {
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls)
            .expect("connect to postgres");
        c.batch_execute(&format!("CREATE DATABASE {name}"))
            .expect("create database");
        self.url(name)
    }
}

fn command(bin: &Path, run_as: Option<(u32, u32)>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(bin);
    if let Some((uid, gid)) = run_as {
        c.uid(uid).gid(gid);
    }
    c
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGQUIT: immediate shutdown (the data is thrown away).
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGQUIT,
            );
            let _ = c.wait();
        }
    }
}
