//! The engine: its configuration (pooling, fuel, async, the explicit
//! CPU target) and the CPU baseline every artifact is compiled for.

use serde::{Deserialize, Serialize};

/// The CPU baseline every artifact is compiled for, whatever CPU compiles it.
///
/// **x86-64-v2** (SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, CMPXCHG16B): every
/// x86-64 server since about 2009 has it, and so does the microVM, whose
/// CPUID is what the VMM offers from KVM's supported set — nested on our CI
/// machines (QEMU TCG, `-cpu EPYC`) the guest has no AVX, so v3 (AVX2, BMI,
/// FMA) is out. Code built for the baseline runs on the host that compiled
/// it, in any microVM and on any other host, older or newer.
///
/// The engine is given an explicit target, so Cranelift starts from no
/// extensions at all and never asks the build host's CPUID; then exactly
/// these flags are turned on. An extension Cranelift learns to use in a
/// later release (AVX-VNNI, AVX-512 FP16, AMX, APX, …) stays off until it is
/// added here on purpose. The engine fingerprint names the baseline.
pub mod baseline {
    /// The baseline's name (in the engine fingerprint).
    pub const NAME: &str = "x86-64-v2";
    /// The Cranelift x86 flags the baseline turns on; every other ISA flag
    /// is off.
    pub const X86_CRANELIFT_FLAGS: &[&str] = &[
        "has_sse3",
        "has_ssse3",
        "has_cmpxchg16b",
        "has_sse41",
        "has_sse42",
        "has_popcnt",
    ];
    /// `-C target-cpu` for native code built on the host to run in the
    /// guest or on another machine (the init, the static `airlock`): the
    /// same baseline, never `native`.
    pub const RUSTC_TARGET_CPU: &str = "x86-64-v2";
}

/// Engine settings. Host and guest must use the same settings; the
/// [`fingerprint`](EngineConfig::fingerprint) pins them into artifacts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineConfig {
    /// Use the pooling instance allocator (fast instantiation).
    pub pooling: bool,
    /// Maximum number of concurrent instances when pooling.
    pub pool_instances: u32,
    /// Largest linear memory any call may use, in bytes (the pool's slot size).
    pub max_memory_bytes: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            pooling: true,
            pool_instances: 64,
            max_memory_bytes: 4 << 30,
        }
    }
}

impl EngineConfig {
    /// A string that changes whenever compiled code would be incompatible.
    /// Pooling is a runtime-only choice and is not part of it.
    pub fn fingerprint(&self) -> String {
        format!(
            "airlock-engine/3 wasmtime/48 {} isa={} fuel=1 max_memory={}",
            std::env::consts::ARCH,
            baseline::NAME,
            self.max_memory_bytes
        )
    }

    pub(crate) fn wasmtime_config(&self) -> wasmtime::Config {
        let mut c = wasmtime::Config::new();
        c.consume_fuel(true);
        c.wasm_component_model(true);
        // The same tunables on every machine, so artifacts move between
        // host and guest.
        c.memory_reservation(self.max_memory_bytes);
        c.memory_guard_size(32 << 20);
        c.memory_reservation_for_growth(0);
        // Code compiled on the host runs in the microVM and on other hosts:
        // an explicit target (no CPUID probing) plus exactly the baseline's
        // flags (see `baseline`). Without a compiler (the in-VM init) there
        // is nothing to set: wasmtime checks each artifact's flags against
        // this CPU when it loads it.
        #[cfg(feature = "compile")]
        {
            c.target(&target_lexicon::HOST.to_string())
                .expect("the host triple is a valid target");
            #[cfg(target_arch = "x86_64")]
            for flag in baseline::X86_CRANELIFT_FLAGS {
                // SAFETY: the baseline's extensions are present on every CPU
                // Airlock supports, and wasmtime re-checks at load time that
                // every flag enabled in an artifact is present on the CPU
                // running it (an error, not undefined behaviour).
                unsafe {
                    c.cranelift_flag_enable(flag);
                }
            }
        }
        if self.pooling {
            let mut p = wasmtime::PoolingAllocationConfig::new();
            let n = self.pool_instances;
            p.total_component_instances(n);
            p.total_core_instances(n * 4);
            p.total_memories(n * 2);
            p.total_tables(n * 4);
            p.max_memory_size(self.max_memory_bytes as usize);
            p.max_core_instances_per_component(32);
            p.max_memories_per_component(4);
            p.max_tables_per_component(16);
            c.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(p));
        }
        c
    }
}

#[cfg(all(test, feature = "compile", target_arch = "x86_64"))]
mod baseline_tests {
    use super::*;
    use crate::artifact;
    use crate::runner::Runner;
    use wasmtime_environ::FlagValue;

    /// The ISA flags an engine enabled, as it wrote them into the engine
    /// section of an artifact (the list wasmtime checks against the CPU
    /// when the artifact is loaded).
    pub(crate) fn enabled_isa_flags(payload: &[u8]) -> Vec<String> {
        use object::{Object, ObjectSection};
        let file = object::File::parse(payload).expect("an artifact is an ELF file");
        let data = file
            .section_by_name(wasmtime_environ::obj::ELF_WASM_ENGINE)
            .expect("the engine section")
            .data()
            .expect("its data");
        // [section format 0][n][wasmtime version: n bytes][postcard metadata]
        let (&format, rest) = data.split_first().expect("format byte");
        assert_eq!(format, 0, "wasmtime changed its engine section format");
        let (&n, rest) = rest.split_first().expect("version length");
        #[derive(serde::Deserialize)]
        struct Head<'a> {
            #[allow(dead_code)]
            target: String,
            #[allow(dead_code)]
            #[serde(borrow)]
            shared_flags: Vec<(&'a str, FlagValue<'a>)>,
            #[serde(borrow)]
            isa_flags: Vec<(&'a str, FlagValue<'a>)>,
        }
        let head: Head<'_> =
            postcard::from_bytes(&rest[usize::from(n)..]).expect("the engine metadata");
        head.isa_flags
            .into_iter()
            .filter(|(_, v)| *v == FlagValue::Bool(true))
            .map(|(k, _)| k.to_string())
            .collect()
    }

    /// An empty component: enough to make the engine write its settings.
    const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";

    #[test]
    pub(crate) fn compiled_code_uses_exactly_the_baseline_whatever_this_cpu_has() {
        let runner = Runner::new(EngineConfig {
            pooling: false,
            ..EngineConfig::default()
        })
        .unwrap();
        let payload = runner
            .engine()
            .precompile_component(EMPTY_COMPONENT)
            .unwrap();
        let mut enabled = enabled_isa_flags(&payload);
        enabled.sort();
        let mut want: Vec<String> = baseline::X86_CRANELIFT_FLAGS
            .iter()
            .map(|s| s.to_string())
            .collect();
        want.sort();
        let outside: Vec<&String> = enabled.iter().filter(|f| !want.contains(f)).collect();
        assert!(
            outside.is_empty(),
            "ISA flags outside the {} baseline: {outside:?} (all enabled: {enabled:?})",
            baseline::NAME
        );
        assert_eq!(enabled, want, "the baseline is not fully enabled");
        // And what `precompile` wraps is the same code.
        let wrapped = runner.precompile(EMPTY_COMPONENT).unwrap();
        let inner = artifact::unwrap(&runner.fingerprint(), &wrapped).unwrap();
        let mut again = enabled_isa_flags(inner);
        again.sort();
        assert_eq!(again, want);
    }

    #[test]
    pub(crate) fn the_fingerprint_names_the_baseline() {
        let f = EngineConfig::default().fingerprint();
        assert!(f.contains("isa=x86-64-v2"), "{f}");
    }
}
