//! `airlock`: the command-line edge. Parses arguments, calls the library,
//! prints JSON or text. `anyhow` lives only here.

use airlock::callsite::{CallSite, CallSiteError, VmSettings, WasmBytes};
use airlock::policy::report::static_report;
use airlock::policy::{Policy, PolicyError};
use airlock::weights::Weights;
use airlock_guest::{CallResult, EngineConfig, Runner};
use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A static musl build allocates with mimalloc, as the in-VM init does
/// (musl's own allocator returns freed buffers to the kernel at once): the
/// two walls then differ in isolation, not in allocators.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "airlock",
    version,
    about = "Run untrusted agent tools in a Wasm-in-microVM sandbox"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show a component's tools (with JSON Schemas), imports and capability classes.
    Inspect {
        /// The component (.wasm).
        component: PathBuf,
        /// A WIT package (file or directory) to take doc comments from.
        #[arg(long)]
        wit: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run one tool call and print the result, metering and audit events as JSON.
    Run {
        /// The component (.wasm).
        component: PathBuf,
        /// Policy file (TOML). Without it nothing is granted.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Tool name (see `airlock inspect`).
        #[arg(long, required_unless_present = "calls", conflicts_with = "calls")]
        tool: Option<String>,
        /// Arguments as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
        /// Several calls, one after the other (each in a fresh microVM, the
        /// component compiled once): a JSON file holding an array of
        /// `{"tool": ..., "args": {...}}`. Prints `{"calls": [outcome, ...]}`.
        #[arg(long)]
        calls: Option<PathBuf>,
        /// Where the call runs: in a KVM microVM (default), or in this
        /// process's Wasm sandbox only (development).
        #[arg(long, value_enum, default_value_t = Isolation::Vm)]
        isolation: Isolation,
        #[command(flatten)]
        guest: GuestArgs,
        /// `DIR:IMAGE` — in the microVM, read-only grants inside DIR are
        /// served from IMAGE (made by `airlock weights pack DIR IMAGE`),
        /// shared with every VM over virtio-pmem.
        #[arg(long)]
        weights: Option<String>,
    },
    /// Model weights for microVMs.
    Weights {
        #[command(subcommand)]
        cmd: WeightsCmd,
    },
    /// Boot the guest in a microVM on this host's KVM and report how it ended.
    Vm {
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// Policy tools.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Run the HTTP service (API, MCP endpoint, registry, audit log).
    Serve {
        /// Config file (TOML; see docs/service.md).
        #[arg(long)]
        config: PathBuf,
        /// Listen address (overrides the config), e.g. 127.0.0.1:0 for any free port.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Data directory (overrides the config).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Only check the config (secrets it names read, files it names
        /// present), print what it says as JSON, and exit: nothing is
        /// opened or served.
        #[arg(long)]
        check: bool,
    },
    /// Audit-log tools.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Make an ed25519 key pair: `<out>.sec` (the secret key, mode 0600,
    /// wasmsign2's format) and `<out>.pub`; prints the public key as
    /// `ed25519:<hex>` for a tenant's `trusted_keys`.
    Keygen {
        /// Path prefix of the two files.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a component (writes it with its signature section) or, with
    /// --policy, a policy for one tenant's component (prints the detached
    /// signature to send as the `Airlock-Signature` header).
    Sign {
        /// The secret key file.
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        what: SignTarget,
        /// Where to write the signed component.
        #[arg(long, required_unless_present = "policy")]
        out: Option<PathBuf>,
    },
    /// Check a component's or policy's signature against a public key
    /// (`ed25519:<hex>` or a key file); exit 1 when it does not verify.
    Verify {
        /// The public key.
        #[arg(long)]
        key: String,
        #[command(flatten)]
        what: SignTarget,
        /// The policy's detached signature.
        #[arg(long, requires = "policy")]
        signature: Option<String>,
    },
}

/// What `sign` and `verify` work on.
#[derive(clap::Args)]
struct SignTarget {
    /// The component (.wasm).
    #[arg(required_unless_present = "policy", conflicts_with = "policy")]
    component: Option<PathBuf>,
    /// A policy file (TOML) instead.
    #[arg(long, requires_all = ["tenant", "for_component"])]
    policy: Option<PathBuf>,
    /// The tenant the policy is for.
    #[arg(long)]
    tenant: Option<String>,
    /// The component name (in the service) the policy is for.
    #[arg(long = "for")]
    for_component: Option<String>,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the hash chain of the audit log (exit 1 when broken): a data
    /// directory's, or the one the service's config names (its PostgreSQL
    /// database in cluster mode).
    Verify {
        /// The service's data directory (with --config: instead of the
        /// file's `data_dir`).
        #[arg(long, required_unless_present = "config")]
        data_dir: Option<PathBuf>,
        /// The service's config file (`[storage]`, `data_dir`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// A head recorded earlier (`seq:hash`), to detect removal of the newest records.
        #[arg(long)]
        anchor: Option<String>,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Validate a policy; with --component, also print the static capability report.
    Check {
        /// Policy file (TOML).
        policy: PathBuf,
        /// Component to compare the policy with.
        #[arg(long)]
        component: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum WeightsCmd {
    /// Pack a directory into a read-only erofs image for virtio-pmem.
    Pack {
        /// The weights directory.
        dir: PathBuf,
        /// The image to write.
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Boot kernel + initramfs, run until the guest powers off (or the
    /// timeout), print the exit, wall time and console as JSON.
    Boot {
        #[command(flatten)]
        vm: VmRunArgs,
        /// Test hook: the jailed VMM attacks its jail instead of booting
        /// (keeper-gone, memory, tasks).
        #[arg(long, hide = true)]
        jail_selftest: Option<airlock_vmm::jail::Selftest>,
        /// Test hook: the report lists each thread's capabilities (a jail
        /// with shares).
        #[arg(long, hide = true)]
        report_threads: bool,
    },
    /// Boot like `vm boot` until the guest reaches boot stage `--at`, save
    /// the VM into DIR (its state file and memory image) and end there
    /// (`"exit": "snapshot"`).
    Snapshot {
        /// Where to write the snapshot.
        dir: PathBuf,
        /// The boot stage to save at (the agent listens at `listening`).
        #[arg(long, default_value = "listening")]
        at: String,
        #[command(flatten)]
        vm: VmRunArgs,
    },
    /// Start the VM `vm snapshot` saved in DIR and run it like `vm boot`;
    /// refused unless the VMM, kernel, initramfs, weights, memory, vCPUs
    /// and command line are the ones it was made with.
    Restore {
        /// The snapshot.
        dir: PathBuf,
        #[command(flatten)]
        vm: VmRunArgs,
    },
    /// Boot `count` rounds of `parallel` VMs and report how each ended plus
    /// this process's fds, threads and RSS before and after (leak check).
    Soak(SoakArgs),
    /// Boot one microVM per `--args` at once, wait until every one is
    /// ready, then make one call in each, concurrently; print each outcome.
    Multi(MultiArgs),
    /// Boot benchmark: this VMM vs QEMU `-M microvm` booting the same
    /// kernel and initramfs, alternating; prints every sample, the median
    /// ratio and the VMM's own memory overhead.
    BenchBoot {
        #[command(flatten)]
        image: BootImage,
        /// QEMU binary.
        #[arg(long, default_value = "qemu-system-x86_64")]
        qemu: PathBuf,
        /// Our VMM binary (default: `airlock-vmm` next to this program).
        #[arg(long)]
        vmm: Option<PathBuf>,
        /// Compare with this `airlock-vmm` build instead of QEMU (an A/B
        /// of two VMM builds in one run).
        #[arg(long)]
        reference_vmm: Option<PathBuf>,
        /// Rounds (each boots both once).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Guest memory, MiB.
        #[arg(long, default_value_t = 256)]
        memory_mib: u32,
        /// Run our VMM in its jail, as the daemon does: auto (when root),
        /// on, off.
        #[arg(long, default_value = "auto")]
        jail: airlock::callsite::JailMode,
    },
}

#[derive(clap::Args)]
struct MultiArgs {
    /// The component (.wasm) every VM loads.
    component: PathBuf,
    /// Tool to call.
    #[arg(long)]
    tool: String,
    /// JSON arguments, one per VM (repeat the flag).
    #[arg(long = "args", required = true)]
    args: Vec<String>,
    /// Policy file (TOML) every call runs under. Without it nothing is
    /// granted.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// `DIR:IMAGE`, as for `airlock run`.
    #[arg(long)]
    weights: Option<String>,
    #[command(flatten)]
    guest: GuestArgs,
}

impl SignTarget {
    /// The tenant and component a policy is signed for.
    fn policy_for(&self) -> anyhow::Result<(&str, &str)> {
        match (&self.tenant, &self.for_component) {
            (Some(t), Some(c)) => Ok((t, c)),
            _ => bail!("a policy is signed for one tenant's component: give --tenant and --for"),
        }
    }
}

/// The microVM a tool call runs in: shared by `run` and `vm multi`.
#[derive(clap::Args)]
struct GuestArgs {
    /// Guest kernel (default: from `cargo xtask guest-image`).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest initramfs (default: from `cargo xtask guest-image`).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Guest memory per VM, MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
    /// Extra guest kernel command line (diagnostics: `ignore_loglevel`
    /// prints the whole boot log into the console tail of a failed boot).
    #[arg(long, default_value = "")]
    guest_cmdline: String,
    /// Fresh microVMs to try when one fails before the call is sent (it
    /// was not ready in time, or ended or dropped the connection while
    /// loading; the tool has not run, so nothing happens twice).
    #[arg(long, default_value_t = airlock::sandbox::BOOT_ATTEMPTS,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    boot_attempts: u32,
    /// CA certificates (PEM file) the host's egress proxy trusts for https
    /// besides the Mozilla roots (a private CA), in either isolation.
    #[arg(long)]
    egress_ca: Option<PathBuf>,
    /// The VMM binary each microVM runs in (default: `airlock-vmm` next to
    /// this program).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Run each VMM process in its jail (namespaces, pivot_root, a uid of
    /// its own, a cgroup leaf): auto (when root), on, off.
    #[arg(long, default_value = "auto")]
    jail: airlock::callsite::JailMode,
    /// How microVMs start: `restore` (from a snapshot of the guest made
    /// once per guest image and VM shape, cached in
    /// `$AIRLOCK_CACHE/snapshots`), `boot` (a cold boot each) or `parked`
    /// (restored into a VMM started ahead and waiting, set up, for the
    /// call; `vm multi` waits until it is before its calls).
    #[arg(long, default_value = "restore", value_parser = ["restore", "boot", "parked"])]
    start: String,
}

impl GuestArgs {
    /// The `--egress-ca` file's certificates, checked now so a bad file is
    /// refused before any call or VM.
    fn egress_ca(&self) -> anyhow::Result<Vec<u8>> {
        self.egress_ca
            .as_deref()
            .map(airlock::egress::read_ca_file)
            .transpose()
            .context("--egress-ca")
            .map(Option::unwrap_or_default)
    }

    /// The call site for `isolation`: VM settings from these flags (and
    /// `weights`), up to `vms` calls in microVMs at once, a runner without
    /// pooling (the CLI makes one call per process: pooling would only
    /// reserve address space).
    fn call_site(
        self,
        isolation: Isolation,
        weights: Option<Weights>,
        policy: &Policy,
        vms: usize,
    ) -> anyhow::Result<CallSite> {
        let ca = self.egress_ca()?;
        let vm = match isolation {
            Isolation::Process => None,
            Isolation::Vm => {
                let (kernel, initrd) = guest_image(self.kernel, self.initrd)?;
                Some(VmSettings {
                    vmm: self
                        .vmm
                        .unwrap_or_else(airlock::callsite::default_vmm_binary),
                    kernel,
                    initrd,
                    memory_mib: self.memory_mib,
                    warm: 0,
                    park: self.start == "parked",
                    max_vms: vms,
                    weights,
                    cmdline_extra: self.guest_cmdline,
                    boot_attempts: self.boot_attempts,
                    life_timeout: std::time::Duration::from_millis(policy.limits.timeout_ms)
                        + std::time::Duration::from_secs(420),
                    jail: self.jail.resolve(airlock_vmm::jail::JailConfig::default()),
                    snapshots: match (self.start.as_str(), cache_dir()) {
                        ("restore" | "parked", Ok(c)) => Some(c.join("snapshots")),
                        ("restore" | "parked", Err(e)) => {
                            tracing::warn!(error = %e, "no cache directory for VM snapshots; every VM boots");
                            None
                        }
                        _ => None,
                    },
                })
            }
        };
        let engine = EngineConfig {
            pooling: false,
            ..EngineConfig::default()
        };
        CallSite::new(engine, &ca, vm).map_err(|e| match e {
            CallSiteError::Host(e) => anyhow::anyhow!(
                "{e} For development, --isolation process runs the Wasm sandbox without the VM."
            ),
            e => e.into(),
        })
    }
}

/// One VM run by `vm boot`, `vm snapshot` and `vm restore`.
#[derive(clap::Args)]
struct VmRunArgs {
    #[command(flatten)]
    image: BootImage,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 256)]
    memory_mib: u32,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Wall-clock limit, seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// The VMM binary (default: `airlock-vmm` next to this program).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Run the VMM in its jail: auto (when root), on, off. The report
    /// says what was done under "jail".
    #[arg(long, default_value = "auto")]
    jail: airlock::callsite::JailMode,
}

impl VmRunArgs {
    /// Run the VM (with `snapshot`, if any: its identity is worked out
    /// here, as a jailed VMM cannot) to its end; its report.
    fn run(
        self,
        snapshot: Option<airlock_vmm::SnapshotPlan>,
        selftest: Option<airlock_vmm::jail::Selftest>,
        report_threads: bool,
    ) -> anyhow::Result<airlock_vmm::process::ProcessEnd> {
        use airlock_vmm::SnapshotPlan;
        let mut cfg = self
            .image
            .config(self.memory_mib, self.vcpus, self.timeout_secs, 1 << 20);
        cfg.jail_selftest = selftest;
        cfg.report_threads = report_threads;
        let vmm = self
            .vmm
            .unwrap_or_else(airlock::callsite::default_vmm_binary);
        cfg.snapshot = match snapshot {
            None => None,
            Some(mut plan) => {
                let id = airlock_vmm::snapshot_identity_with(
                    &vmm,
                    &cfg,
                    &mut airlock_vmm::snapshot::file_sha256_hex,
                )?;
                match &mut plan {
                    SnapshotPlan::Make { dir, identity, .. } => {
                        std::fs::create_dir_all(&*dir)
                            .with_context(|| format!("making {}", dir.display()))?;
                        *identity = Some(id);
                    }
                    SnapshotPlan::Restore { identity, .. } => *identity = Some(id),
                }
                Some(plan)
            }
        };
        boot_process(&vmm, &cfg, self.jail)
    }
}

/// What a VM boots: shared by `vm boot` and `vm soak`.
#[derive(clap::Args)]
struct BootImage {
    /// Uncompressed ELF kernel (vmlinux).
    #[arg(long)]
    kernel: PathBuf,
    /// Initramfs.
    #[arg(long)]
    initrd: PathBuf,
    /// Extra kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// A read-only weights image (erofs, size a multiple of 2 MiB) for
    /// virtio-pmem; the guest sees /dev/pmem0.
    #[arg(long)]
    pmem: Option<PathBuf>,
    /// A host directory for the guest over virtio-fs, as TAG=DIR (the
    /// guest mounts it with `airlock.fs=TAG:/path`); repeatable.
    #[arg(long, value_parser = share_arg)]
    share: Vec<(String, PathBuf)>,
    /// As --share, read-only.
    #[arg(long, value_parser = share_arg)]
    share_ro: Vec<(String, PathBuf)>,
}

fn share_arg(s: &str) -> Result<(String, PathBuf), String> {
    let (tag, dir) = s
        .split_once('=')
        .ok_or_else(|| format!("expected TAG=DIR, got {s:?}"))?;
    Ok((tag.to_string(), PathBuf::from(dir)))
}

impl BootImage {
    fn config(
        self,
        memory_mib: u32,
        vcpus: u8,
        timeout_secs: u64,
        console_cap: usize,
    ) -> airlock_vmm::VmConfig {
        airlock_vmm::VmConfig {
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline_extra: self.cmdline,
            memory_mib,
            vcpus,
            timeout: std::time::Duration::from_secs(timeout_secs),
            console_cap,
            vsock: None,
            stop: None,
            pmem: self.pmem,
            shares: self
                .share
                .into_iter()
                .map(|s| (s, false))
                .chain(self.share_ro.into_iter().map(|s| (s, true)))
                .map(|((tag, dir), read_only)| airlock_vmm::ShareConfig {
                    tag,
                    dir,
                    read_only,
                })
                .collect(),
            seccomp: None,
            seccomp_selftest: false,
            jail_selftest: None,
            report_threads: false,
            share_write_limit: None,
            snapshot: None,
            park: None,
        }
    }
}

#[derive(clap::Args)]
struct SoakArgs {
    #[command(flatten)]
    image: BootImage,
    /// Boots in a row.
    #[arg(long, default_value_t = 20)]
    count: u32,
    /// VMs at once in each round.
    #[arg(long, default_value_t = 1)]
    parallel: u32,
    /// Wall-clock limit per VM, seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Isolation {
    /// Wasm sandbox in this process (development).
    Process,
    /// Wasm sandbox inside a KVM microVM.
    Vm,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.cmd {
        // `serve` reads its config before logging starts: the config says
        // where spans go.
        Cmd::Serve {
            config,
            listen,
            data_dir,
            check: false,
        } => serve_logged(&config, listen, data_dir.as_deref()),
        cmd => {
            init_logging(None);
            run(Cli { cmd })
        }
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Logs to stderr (warnings unless `AIRLOCK_LOG` says otherwise) and, with
/// a tracer provider, airlock's spans to it.
fn init_logging(spans: Option<&opentelemetry_sdk::trace::SdkTracerProvider>) {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // Warnings by default: a fallback (a VM that booted because its
        // snapshot could not be restored) must be said.
        .with_filter(
            tracing_subscriber::EnvFilter::try_from_env("AIRLOCK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        );
    let spans = spans.map(|p| {
        airlock::service::telemetry::layer(p).with_filter(
            tracing_subscriber::filter::Targets::new().with_target("airlock", tracing::Level::INFO),
        )
    });
    tracing_subscriber::registry().with(log).with(spans).init();
}

/// `serve`: the config read once, logging (and spans, when `[telemetry]`
/// names a collector) set up from it, then the service; what is still
/// batched is exported before the process ends.
fn serve_logged(
    config: &Path,
    listen: Option<std::net::SocketAddr>,
    data_dir: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let cfg = service_config(config, data_dir).inspect_err(|_| init_logging(None))?;
    let provider = cfg
        .telemetry
        .as_ref()
        .map(|t| airlock::service::telemetry::provider(t, &cfg.node))
        .transpose()
        .inspect_err(|_| init_logging(None))?;
    init_logging(provider.as_ref());
    let served = serve(cfg, listen);
    if let Some(p) = provider
        && let Err(e) = p.shutdown()
    {
        let _ = writeln!(
            std::io::stderr(),
            "warning: exporting the last spans failed: {e}"
        );
    }
    served
}

fn read_component(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read component {}", path.display()))
}

/// `vm boot`: the VMM in a process of its own (in its jail when `jail`
/// says so), run until the VM ends.
fn boot_process(
    vmm: &Path,
    cfg: &airlock_vmm::VmConfig,
    jail: airlock::callsite::JailMode,
) -> anyhow::Result<airlock_vmm::process::ProcessEnd> {
    airlock_vmm::refuse_pvm()?;
    let dir = airlock_vmm::jail::fresh_dir("airlock-boot")?;
    let run = || -> anyhow::Result<_> {
        let jail = jail
            .resolve(airlock_vmm::jail::JailConfig::default())
            .map(|j| airlock_vmm::jail::VmJail::prepare(&j, &dir, cfg))
            .transpose()?;
        let vm = airlock_vmm::process::VmProcess::spawn(vmm, cfg, jail)?;
        vm.wait_until_finished(None);
        Ok(vm.wait()?)
    };
    let end = run();
    let _ = std::fs::remove_dir_all(&dir);
    end
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn load_policy(path: &Path) -> anyhow::Result<Policy> {
    Policy::load(path).map_err(|e| match e {
        PolicyError::Field { .. } => anyhow::anyhow!("invalid policy {}: {e}", path.display()),
        other => anyhow::anyhow!("{other}"),
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Inspect {
            component,
            wit,
            json,
        } => {
            let bytes = read_component(&component)?;
            let runner = cli_runner()?;
            let (_c, mut set) = airlock_wasm_tools::ToolSet::from_bytes(runner.engine(), &bytes)?;
            if let Some(w) = wit {
                let docs = airlock_wasm_tools::docs::from_wit_path(&w)
                    .map_err(|e| anyhow::anyhow!("cannot read WIT {}: {e}", w.display()))?;
                for t in &mut set.tools {
                    let key = match &t.interface {
                        Some(i) => format!("{i}#{}", t.function),
                        None => t.function.clone(),
                    };
                    if let Some(d) = docs.functions.get(&key) {
                        t.description = Some(d.trim().to_string());
                    }
                }
            }
            if json {
                print_json(&set.inspect_json())?;
            } else {
                print_inspect_text(&set)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            component,
            policy,
            tool,
            args,
            calls,
            isolation,
            guest,
            weights,
        } => {
            let weights = weights
                .as_deref()
                .map(Weights::parse)
                .transpose()
                .context("--weights")?;
            if weights.is_some() && isolation == Isolation::Process {
                bail!(
                    "--weights only applies to --isolation vm (in process the grants read DIR directly)"
                );
            }
            let list: Vec<(String, serde_json::Value)> = match (&calls, tool) {
                (Some(file), _) => read_calls(file)?,
                (None, Some(tool)) => vec![(
                    tool,
                    serde_json::from_str(&args).context("--args is not valid JSON")?,
                )],
                (None, None) => bail!("--tool or --calls is needed"),
            };
            let policy = match policy {
                Some(p) => load_policy(&p)?,
                None => Policy::default(),
            };
            let wasm = WasmBytes::new(read_component(&component)?);
            let site = guest.call_site(isolation, weights, &policy, 1)?;
            let grants = site.grants(policy.grant_set())?;
            let mut outcomes = Vec::new();
            let mut all_ok = true;
            for (i, (tool, args)) in list.iter().enumerate() {
                let called = site
                    .call(&wasm, tool, args, &grants)
                    .with_context(|| format!("calling the tool (call {})", i + 1))?;
                all_ok &= matches!(called.outcome.result, CallResult::Ok(_));
                // In VM isolation the answer says how the VM started.
                let mut outcome = serde_json::to_value(&called.outcome)?;
                if let (Some(start), Some(o)) = (called.start, outcome.as_object_mut()) {
                    o.insert("start".into(), start.label().into());
                }
                outcomes.push(outcome);
            }
            match (calls, outcomes.pop()) {
                (None, Some(one)) => print_json(&one)?,
                (_, last) => {
                    outcomes.extend(last);
                    print_json(&serde_json::json!({ "calls": outcomes }))?;
                }
            }
            Ok(if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Vm {
            cmd:
                VmCmd::Boot {
                    vm,
                    jail_selftest,
                    report_threads,
                },
        } => {
            let end = vm.run(None, jail_selftest, report_threads)?;
            print_json(&end.report)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Vm {
            cmd: VmCmd::Snapshot { dir, at, vm },
        } => {
            let plan = airlock_vmm::SnapshotPlan::Make {
                at,
                dir,
                identity: None,
            };
            let end = vm.run(Some(plan), None, false)?;
            print_json(&end.report)?;
            Ok(if end.exit == airlock_vmm::VmExit::Paused {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Vm {
            cmd: VmCmd::Restore { dir, vm },
        } => {
            let plan = airlock_vmm::SnapshotPlan::Restore {
                dir,
                identity: None,
            };
            let end = vm.run(Some(plan), None, false)?;
            print_json(&end.report)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Vm {
            cmd: VmCmd::Soak(a),
        } => {
            let cfg = a.image.config(256, 1, a.timeout_secs, 256 << 10);
            // One warm-up boot so lazily created process state (signal
            // handler, allocator arenas) is not counted as a leak.
            airlock_vmm::run(&cfg)?;
            let before = airlock_vmm::ProcessUsage::now();
            let mut exits = Vec::new();
            for _ in 0..a.count {
                let round: Vec<_> = (0..a.parallel)
                    .map(|_| {
                        let cfg = cfg.clone();
                        std::thread::spawn(move || airlock_vmm::run(&cfg))
                    })
                    .collect();
                for t in round {
                    let r = t
                        .join()
                        .map_err(|_| anyhow::anyhow!("a VM thread panicked"))??;
                    let ok = r.console.contains("AIRLOCK-SELFTEST-DONE ok");
                    let mut run = serde_json::json!({"exit": format!("{:?}", r.exit), "wall_ms": r.wall.as_millis() as u64,
                        "selftest_ok": ok});
                    if !ok {
                        let tail: String = r
                            .console
                            .chars()
                            .rev()
                            .take(3000)
                            .collect::<Vec<_>>()
                            .into_iter()
                            .rev()
                            .collect();
                        run["console_tail"] = serde_json::Value::String(tail);
                    }
                    exits.push(run);
                }
            }
            // A joined thread can still be counted in /proc for a moment
            // (it is woken from join before its task is fully reaped; seen on
            // a one-CPU host). Give exits 2 s to settle: a thread that is
            // still there after that is a leak.
            let settle = std::time::Instant::now();
            let after = loop {
                let now = airlock_vmm::ProcessUsage::now();
                if now.threads <= before.threads
                    || settle.elapsed() > std::time::Duration::from_secs(2)
                {
                    break now;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            print_json(&serde_json::json!({"before": before, "after": after, "runs": exits}))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Vm {
            cmd:
                VmCmd::BenchBoot {
                    image,
                    qemu,
                    vmm,
                    reference_vmm,
                    rounds,
                    memory_mib,
                    jail,
                },
        } => {
            let vmm = match vmm {
                Some(v) => v,
                None => airlock::callsite::default_vmm_binary(),
            };
            if !vmm.is_file() {
                bail!(
                    "{} is missing: pass --vmm or build the airlock-vmm binary",
                    vmm.display()
                );
            }
            let report = airlock_vmm::bench::boot_bench(&airlock_vmm::bench::BenchConfig {
                vmm,
                qemu,
                kernel: image.kernel,
                initrd: image.initrd,
                cmdline_extra: image.cmdline,
                memory_mib,
                rounds,
                reference_vmm,
                jail: jail.resolve(airlock_vmm::jail::JailConfig::default()),
            })?;
            print_json(&report)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Vm {
            cmd: VmCmd::Multi(a),
        } => {
            let out = vm_multi(a)?;
            print_json(&out)?;
            let failed = out["vms"]
                .as_array()
                .is_some_and(|v| v.iter().any(|vm| vm.get("error").is_some()));
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Cmd::Serve {
            config,
            data_dir,
            check: true,
            ..
        } => {
            use airlock::service::config::{Isolation, Storage};
            let c = service_config(&config, data_dir.as_deref())?;
            print_json(&serde_json::json!({
                "ok": true,
                "listen": c.listen.to_string(),
                "node": c.node,
                "data_dir": c.data_dir,
                "storage": match c.storage { Storage::Sqlite => "sqlite", Storage::Postgres { .. } => "postgres" },
                "blobs": c.blobs.as_ref().map_or("data_dir", |_| "s3"),
                "isolation": match c.isolation { Isolation::Process => "process", Isolation::Vm(_) => "vm" },
                "tokens": c.tokens.len(),
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        // main() runs it: it sets logging up from the config.
        Cmd::Serve { check: false, .. } => unreachable!("main() serves"),
        Cmd::Keygen { out } => {
            use std::os::unix::fs::OpenOptionsExt;
            let key = airlock::signing::SigningKey::generate();
            let sec = out.with_extension("sec");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&sec)
                .with_context(|| format!("creating {}", sec.display()))?;
            f.write_all(&key.to_bytes())?;
            let id = key.public().id();
            let public = out.with_extension("pub");
            std::fs::write(&public, format!("{id}\n"))
                .with_context(|| format!("writing {}", public.display()))?;
            print_json(&serde_json::json!({"secret_key": sec, "public_key": id}))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Sign { key, what, out } => {
            let key = airlock::signing::SigningKey::from_file(&key)?;
            match (&what.component, &what.policy, out) {
                (Some(c), _, Some(out)) => {
                    let bytes = read_component(c)?;
                    let signed = key.sign_component(&bytes)?;
                    std::fs::write(&out, signed)
                        .with_context(|| format!("writing {}", out.display()))?;
                    print_json(&serde_json::json!({"signed": out, "key": key.public().id()}))?;
                }
                (_, Some(p), _) => {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    let (tenant, comp) = what.policy_for()?;
                    println!("{}", key.sign_policy(tenant, comp, &text));
                }
                _ => bail!("give a component and --out, or --policy"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verify {
            key,
            what,
            signature,
        } => {
            let trusted = [airlock::signing::TrustedKey::parse(&key)?];
            let checked = match (&what.component, &what.policy) {
                (Some(c), _) => {
                    let bytes = read_component(c)?;
                    airlock::signing::check_component(&bytes, &trusted)
                }
                (_, Some(p)) => {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    let (tenant, comp) = what.policy_for()?;
                    airlock::signing::check_policy(
                        signature.as_deref(),
                        tenant,
                        comp,
                        &text,
                        &trusted,
                    )
                }
                _ => bail!("give a component or --policy"),
            };
            let (ok, out) = match checked {
                Ok(airlock::signing::Signed::By(k)) => {
                    (true, serde_json::json!({"signature": "verified", "key": k}))
                }
                Ok(airlock::signing::Signed::Unsigned) => {
                    (false, serde_json::json!({"signature": "unsigned"}))
                }
                Err(e) => (
                    false,
                    serde_json::json!({"signature": "failed", "error": e.to_string()}),
                ),
            };
            print_json(&out)?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Weights {
            cmd: WeightsCmd::Pack { dir, out },
        } => {
            let len = airlock::weights::pack(&dir, &out)?;
            print_json(&serde_json::json!({"image": out, "bytes": len}))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Audit {
            cmd:
                AuditCmd::Verify {
                    data_dir,
                    config,
                    anchor,
                },
        } => {
            let anchor = match &anchor {
                Some(a) => {
                    let (seq, hash) = a
                        .split_once(':')
                        .and_then(|(s, h)| Some((s.parse::<i64>().ok()?, h)))
                        .context("--anchor must be <seq>:<hash>")?;
                    Some((seq, hash))
                }
                None => None,
            };
            use airlock::service::config::Storage;
            use airlock::service::store::Metadata;
            let (data_dir, storage) = match (data_dir, config) {
                (d, Some(c)) => {
                    let c = service_config(&c, d.as_deref())?;
                    (c.data_dir, c.storage)
                }
                (Some(d), None) => (d, Storage::Sqlite),
                (None, None) => bail!("give --data-dir or --config"),
            };
            let v = match storage {
                Storage::Postgres { url, ca } => {
                    airlock::service::store::postgres::Postgres::connect(&url, &ca)?
                        .audit_verify(anchor)?
                }
                Storage::Sqlite => {
                    if !data_dir.join("airlock.db").exists() {
                        bail!(
                            "{} is not an Airlock data directory (no airlock.db)",
                            data_dir.display()
                        );
                    }
                    airlock::service::store::Store::open(&data_dir)?.audit_verify(anchor)?
                }
            };
            print_json(&v)?;
            Ok(if v.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Policy {
            cmd:
                PolicyCmd::Check {
                    policy,
                    component,
                    json,
                },
        } => {
            let pol = load_policy(&policy)?;
            let report = match component {
                Some(c) => {
                    let bytes = read_component(&c)?;
                    let runner = cli_runner()?;
                    let (_c, set) =
                        airlock_wasm_tools::ToolSet::from_bytes(runner.engine(), &bytes)?;
                    Some(static_report(&set, &pol))
                }
                None => None,
            };
            if json {
                print_json(&serde_json::json!({"valid": true, "policy": pol, "report": report}))?;
            } else {
                let mut out = std::io::stdout().lock();
                writeln!(out, "policy {} is valid", policy.display())?;
                if let Some(r) = &report {
                    let caps: Vec<String> = r.requested.iter().map(|c| format!("{c:?}")).collect();
                    writeln!(out, "component requests: {}", caps.join(", "))?;
                    if r.findings.is_empty() {
                        writeln!(
                            out,
                            "no findings: every grant is used and every request is granted"
                        )?;
                    }
                    for f in &r.findings {
                        writeln!(out, "[{:?}] {}: {}", f.severity, f.subject, f.message)?;
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The service's config file, `data_dir` given by a flag or in the file
/// (the flag wins: a config without `data_dir` is fine with `--data-dir`).
fn service_config(
    config: &Path,
    data_dir: Option<&Path>,
) -> anyhow::Result<airlock::service::config::Config> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read config {}", config.display()))?;
    let text = match (data_dir, text.parse::<toml::Table>()) {
        // The file names one too: the flag's replaces it (everything the
        // config derives from data_dir follows).
        (Some(d), Ok(mut t)) if t.contains_key("data_dir") => {
            t.insert("data_dir".into(), d.display().to_string().into());
            t.to_string()
        }
        (Some(d), _) => format!(
            "data_dir = {}\n{text}",
            toml::Value::from(d.display().to_string())
        ),
        (None, _) => text,
    };
    airlock::service::config::Config::parse(&text)
        .map_err(|e| anyhow::anyhow!("invalid config {}: {e}", config.display()))
}

fn serve(
    mut cfg: airlock::service::config::Config,
    listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<ExitCode> {
    use airlock::service::{Service, api};
    if let Some(l) = listen {
        cfg.listen = l;
    }
    let open_files = raise_open_files();
    let max_connections = cfg.max_connections(open_files);
    let service = std::sync::Arc::new(Service::new(cfg)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("airlock-serve")
        .build()?;
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(service.config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", service.config.listen))?;
        let addr = listener.local_addr()?;
        // The one line on stdout: scripts and tests read the bound address from it.
        println!("airlock: listening on http://{addr}");
        std::io::stdout().flush()?;
        tracing::info!(%addr, data_dir = %service.config.data_dir.display(), isolation = service.isolation(), open_files, max_connections, "serving");
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("install SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
            tracing::info!("shutting down: finishing requests in flight");
        };
        api::serve(service.clone(), listener, max_connections, shutdown).await?;
        anyhow::Ok(())
    });
    // Drop the server runtime before the service (the runner owns a runtime of
    // its own, which must not be dropped from inside an async context).
    drop(rt);
    service.shutdown_vms();
    drop(service);
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Airlock's cache directory: `$AIRLOCK_CACHE`, else `~/.cache/airlock`.
fn cache_dir() -> anyhow::Result<PathBuf> {
    std::env::var_os("AIRLOCK_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/airlock")))
        .context("set AIRLOCK_CACHE or HOME")
}

/// The guest kernel and agent initramfs: flags, else the manifest written by
/// `cargo xtask guest-image`.
fn guest_image(
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    if let (Some(k), Some(i)) = (&kernel, &initrd) {
        return Ok((k.clone(), i.clone()));
    }
    let manifest = cache_dir()?.join("guest-image.json");
    let text = std::fs::read_to_string(&manifest).with_context(|| {
        format!(
            "--isolation vm needs a guest image: pass --kernel and --initrd, or build one with `cargo xtask guest-image` ({} is missing)",
            manifest.display()
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let get = |k: &str| {
        v[k].as_str()
            .map(PathBuf::from)
            .with_context(|| format!("{} has no {k}", manifest.display()))
    };
    Ok((
        kernel.map_or_else(|| get("vmlinux"), Ok)?,
        initrd.map_or_else(|| get("initramfs"), Ok)?,
    ))
}

/// The server's descriptor limit raised to its hard limit (connections and
/// microVMs both need descriptors); what it is now.
fn raise_open_files() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// `airlock run --calls FILE`: the calls it lists, in order.
fn read_calls(file: &Path) -> anyhow::Result<Vec<(String, serde_json::Value)>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct OneCall {
        tool: String,
        #[serde(default = "empty_object")]
        args: serde_json::Value,
    }
    fn empty_object() -> serde_json::Value {
        serde_json::json!({})
    }
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading --calls {}", file.display()))?;
    let list: Vec<OneCall> = serde_json::from_str(&text).with_context(|| {
        format!(
            "--calls {}: expected a JSON array of {{\"tool\": ..., \"args\": {{...}}}}",
            file.display()
        )
    })?;
    if list.is_empty() {
        bail!("--calls {}: the array is empty", file.display());
    }
    Ok(list.into_iter().map(|c| (c.tool, c.args)).collect())
}

/// `airlock vm multi`: N microVMs at once, one independent call in each.
fn vm_multi(a: MultiArgs) -> anyhow::Result<serde_json::Value> {
    let args = a
        .args
        .iter()
        .enumerate()
        .map(|(i, s)| {
            serde_json::from_str::<serde_json::Value>(s)
                .with_context(|| format!("--args #{} is not JSON", i + 1))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let wasm = WasmBytes::new(read_component(&a.component)?);
    let policy = match &a.policy {
        Some(p) => load_policy(p)?,
        None => Policy::default(),
    };
    let weights = a
        .weights
        .as_deref()
        .map(Weights::parse)
        .transpose()
        .context("--weights")?;
    let parked = a.guest.start == "parked";
    // Every VM at once: the calls wait for each other below.
    let site = a
        .guest
        .call_site(Isolation::Vm, weights, &policy, args.len())?;
    if parked
        && !site
            .pool()
            .is_some_and(|p| p.wait_parked(airlock::callsite::READY_TIMEOUT))
    {
        anyhow::bail!(
            "--start parked: no VM was parked within {:?} (see the warnings above)",
            airlock::callsite::READY_TIMEOUT
        );
    }
    let grants = site.grants(policy.grant_set())?;
    // Every VM waits, once loaded, for the others: the calls overlap.
    let all_ready = std::sync::Barrier::new(args.len());
    let start = std::time::Instant::now();
    let outcomes: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = args
            .iter()
            .map(|v| {
                let (site, wasm, grants, tool, barrier) =
                    (&site, &wasm, &grants, &a.tool, &all_ready);
                s.spawn(move || {
                    site.call_when(wasm, tool, v, grants, &|| {
                        barrier.wait();
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CallSiteError::Task("a VM thread panicked".into())))
            })
            .collect()
    });
    let vms: Vec<serde_json::Value> = args
        .iter()
        .zip(outcomes)
        .map(|(v, o)| match o {
            Ok(called) => serde_json::json!({
                "args": v,
                "ready_ms": called.ready_after.unwrap_or_default().as_millis() as u64,
                "start": called.start.map(airlock::sandbox::Start::label),
                "ready_steps_ms": called
                    .ready_steps
                    .iter()
                    .map(|(k, d)| ((*k).to_string(), (d.as_secs_f64() * 1e3).into()))
                    .collect::<serde_json::Map<_, _>>(),
                "load_ms": called.load.unwrap_or_default().as_secs_f64() * 1e3,
                "invoke_ms": called.invoke.unwrap_or_default().as_secs_f64() * 1e3,
                "vm_end": called.vm_end.map(|mut r| {
                    // The bench reads the numbers; the console is long.
                    if let Some(o) = r.as_object_mut() {
                        o.remove("console");
                    }
                    r
                }),
                "outcome": called.outcome,
            }),
            Err(e) => serde_json::json!({"args": v, "error": e.to_string()}),
        })
        .collect();
    Ok(serde_json::json!({
        "vms": vms,
        "wall_ms": start.elapsed().as_millis() as u64,
    }))
}

/// The CLI runs one call per process: no pooling (it would only reserve
/// address space for instances that never come).
fn cli_runner() -> anyhow::Result<Runner> {
    Ok(Runner::new(EngineConfig {
        pooling: false,
        ..EngineConfig::default()
    })?)
}

fn print_inspect_text(set: &airlock_wasm_tools::ToolSet) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "tools ({}):", set.tools.len())?;
    for t in &set.tools {
        let params: Vec<&str> = t.param_types.iter().map(|(n, _)| n.as_str()).collect();
        writeln!(out, "  {}({})", t.name, params.join(", "))?;
        if let Some(d) = &t.description {
            for line in d.lines() {
                writeln!(out, "      {line}")?;
            }
        }
    }
    if !set.skipped.is_empty() {
        writeln!(out, "skipped exports:")?;
        for s in &set.skipped {
            writeln!(out, "  {}: {}", s.export, s.reason)?;
        }
    }
    writeln!(out, "imports:")?;
    for i in &set.imports {
        writeln!(out, "  {:<40} {:?}", i.name, i.class)?;
    }
    writeln!(out, "capabilities:")?;
    for c in set.capability_classes() {
        writeln!(out, "  {c:?}: {}", c.describe())?;
    }
    Ok(())
}
