//! `wasi:nn` (the standard WIT, `guest/wit/wasi-nn.wit`): models as a
//! capability. A component loads a model **by name** (`load-by-name`); the
//! name must be one its policy grants ([`GrantSet::models`]), and the model
//! runs natively in this process on [`airlock_nn`], which reads the weights
//! in place from their read-only mapping (in a VM: `/weights`, the host's
//! page cache over DAX).
//!
//! Why our own host side of the standard interface and not
//! `wasmtime-wasi-nn`'s: its backends are native libraries (OpenVINO, ONNX
//! Runtime, libtorch) this machine cannot fetch, and its tensors are host
//! copies no limit covers. Here every byte of tensor data the host holds
//! for a call is charged to that call's memory limit.
//!
//! **Invariants:**
//! * Only granted names load; every load is audited (`nn.load`), a denied
//!   one as `deny`. `load` (model bytes from the component) is refused: a
//!   component cannot make the host parse a model it brought.
//! * Tensor data held on the host (inputs the component made, outputs of
//!   `compute`) counts with the call's linear memory against its memory
//!   limit (the limiter's `host` bytes); past it, the constructor traps and
//!   the call ends `out_of_memory` with a `limit.memory` event, and
//!   `compute` answers `too-large` (with the same event).
//! * A model is opened once per process and shared by every call (its
//!   weights are a read-only mapping) while its files stay the same (device,
//!   inode, size, times); at most `MAX_OPEN_MODELS` stay open between calls.
//!   A model that cannot be opened is an error for the call
//!   (`runtime-error`, naming the file), never a panic.
//!
//! [`GrantSet::models`]: crate::grants::GrantSet::models

use super::CallState;
use crate::audit::Decision;
use crate::grants::ModelGrant;
use airlock_nn::{Batch, Bert};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use wasmtime::component::{HasSelf, Linker, Resource};

mod generated {
    wasmtime::component::bindgen!({
        world: "ml",
        path: "wit/wasi-nn.wit",
        with: {
            "wasi:nn/graph.graph": super::NnGraph,
            "wasi:nn/tensor.tensor": super::NnTensor,
            "wasi:nn/inference.graph-execution-context": super::NnContext,
            "wasi:nn/errors.error": super::NnFailure,
        },
        imports: { default: trappable },
    });
}

use generated::wasi::nn::errors::ErrorCode;
use generated::wasi::nn::graph::{ExecutionTarget, GraphBuilder, GraphEncoding};
use generated::wasi::nn::tensor::TensorType;

/// A loaded model (a `graph` resource).
pub struct NnGraph {
    name: String,
    model: Arc<Bert>,
}

/// An execution context of a graph.
pub struct NnContext {
    name: String,
    model: Arc<Bert>,
}

/// A tensor held on the host (charged to the call, see the invariants).
pub struct NnTensor {
    dims: Vec<u32>,
    ty: TensorType,
    data: Vec<u8>,
}

/// A `wasi:nn` error resource.
pub struct NnFailure {
    code: ErrorCode,
    data: String,
}

/// A call's `wasi:nn` state: its grants (the bytes its tensors hold are
/// the memory limiter's `host`).
#[derive(Debug, Default)]
pub(crate) struct NnState {
    /// Granted models by name.
    pub(crate) models: std::collections::BTreeMap<String, ModelGrant>,
}

/// Most models a process keeps open between calls. Each may be a sealed
/// copy of its weights (a model not on a read-only image), so a policy
/// that names many model directories cannot make the host hold more than
/// this many copies beyond the calls running now (those keep theirs alive).
const MAX_OPEN_MODELS: usize = 4;

/// What a model's files are: device, inode, size, modification and change
/// times of `config.json` and `model.safetensors`. A file replaced or
/// changed in place is another model.
type FilesKey = [(u64, u64, i64, i64, i64, i64, i64); 2];

/// An open model: its directory, its files, the model.
type Opened = (PathBuf, FilesKey, Arc<Bert>);

/// Models opened by this process, most recently used last: each opened
/// (mapped or copied) once while its files stay the same.
fn opened() -> &'static Mutex<Vec<Opened>> {
    static OPENED: OnceLock<Mutex<Vec<Opened>>> = OnceLock::new();
    OPENED.get_or_init(Mutex::default)
}

/// The [`FilesKey`] of the model in the open directory `dir` (no link
/// followed).
fn files_key(dir: &std::os::fd::OwnedFd) -> Result<FilesKey, String> {
    use nix::fcntl::AtFlags;
    let one = |name: &str| {
        nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map(|st| {
                (
                    st.st_dev,
                    st.st_ino,
                    st.st_size,
                    st.st_mtime,
                    st.st_mtime_nsec,
                    st.st_ctime,
                    st.st_ctime_nsec,
                )
            })
            .map_err(|e| format!("{name}: {e}"))
    };
    Ok([one("config.json")?, one("model.safetensors")?])
}

/// The model `grant` names: opened beneath its root (no link followed on
/// the way, none for its files), or the one this process opened before
/// from the same files.
fn open_model(grant: &ModelGrant) -> Result<Arc<Bert>, String> {
    let dir = grant.open()?;
    let named = grant.named().display().to_string();
    let key = files_key(&dir).map_err(|e| format!("The model at {named} cannot be used: {e}."))?;
    let mut cache = opened().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = cache
        .iter()
        .position(|(d, k, _)| *d == grant.dir && *k == key)
    {
        let hit = cache.remove(i);
        let model = hit.2.clone();
        cache.push(hit);
        return Ok(model);
    }
    let by_fd = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&dir)
    ));
    let model = Bert::open(&by_fd).map_err(|e| {
        // Name the directory the grant names, not the descriptor.
        e.to_string().replace(&by_fd.display().to_string(), &named)
    })?;
    let model = Arc::new(model);
    // The directory's older model (its files changed) goes, then the
    // least recently used beyond the bound.
    cache.retain(|(d, _, _)| *d != grant.dir);
    if cache.len() >= MAX_OPEN_MODELS {
        cache.remove(0);
    }
    cache.push((grant.dir.clone(), key, model.clone()));
    Ok(model)
}

/// Add `wasi:nn` to the linker.
pub(crate) fn add_to_linker(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    generated::Ml::add_to_linker::<CallState, HasSelf<CallState>>(linker, |s| s)
}

type Answer<T> = wasmtime::Result<Result<Resource<T>, Resource<NnFailure>>>;

impl CallState {
    /// The `wasi:nn` error a function answers.
    fn nn_fail<T>(
        &mut self,
        code: ErrorCode,
        data: impl Into<String>,
    ) -> wasmtime::Result<Result<T, Resource<NnFailure>>> {
        let e = self.table.push(NnFailure {
            code,
            data: data.into(),
        })?;
        Ok(Err(e))
    }
}

impl generated::wasi::nn::graph::Host for CallState {
    fn load(
        &mut self,
        builders: Vec<GraphBuilder>,
        encoding: GraphEncoding,
        _target: ExecutionTarget,
    ) -> Answer<NnGraph> {
        let bytes: usize = builders.iter().map(Vec::len).sum();
        self.audit.record(
            "nn.load",
            format!("({bytes} bytes, {encoding:?})"),
            Decision::Deny,
            "models are granted by name: use load-by-name with a model the policy grants",
        );
        self.nn_fail(
            ErrorCode::Security,
            "loading a model from bytes is not allowed; use load-by-name with a granted model",
        )
    }

    fn load_by_name(&mut self, name: String) -> Answer<NnGraph> {
        let Some(grant) = self.nn.models.get(&name).cloned() else {
            let granted: Vec<&str> = self.nn.models.keys().map(String::as_str).collect();
            self.audit.record(
                "nn.load",
                name.clone(),
                Decision::Deny,
                format!("model not granted by policy (granted: {granted:?})"),
            );
            return self.nn_fail(
                ErrorCode::Security,
                format!("model {name:?} is not granted to this tool"),
            );
        };
        match open_model(&grant) {
            Ok(model) => {
                self.audit.record(
                    "nn.load",
                    name.clone(),
                    Decision::Allow,
                    format!(
                        "granted by policy: {} ({})",
                        grant.named().display(),
                        if model.in_place() {
                            "read in place from a read-only image"
                        } else {
                            "read from this process's sealed copy"
                        }
                    ),
                );
                Ok(Ok(self.table.push(NnGraph { name, model })?))
            }
            Err(e) => {
                self.audit.record(
                    "nn.load",
                    name.clone(),
                    Decision::Allow,
                    "granted by policy, but the model cannot be opened",
                );
                self.nn_fail(ErrorCode::RuntimeError, format!("model_unavailable: {e}"))
            }
        }
    }
}

impl generated::wasi::nn::graph::HostGraph for CallState {
    fn init_execution_context(&mut self, graph: Resource<NnGraph>) -> Answer<NnContext> {
        let g = self.table.get(&graph)?;
        let ctx = NnContext {
            name: g.name.clone(),
            model: g.model.clone(),
        };
        Ok(Ok(self.table.push(ctx)?))
    }

    fn drop(&mut self, graph: Resource<NnGraph>) -> wasmtime::Result<()> {
        self.table.delete(graph)?;
        Ok(())
    }
}

/// Little-endian i64s of a tensor the model takes as token input.
fn i64s(field: &'static str, t: &NnTensor) -> Result<Vec<i64>, String> {
    match t.ty {
        TensorType::I64 => Ok(t
            .data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect()),
        TensorType::I32 => Ok(t
            .data
            .chunks_exact(4)
            .map(|c| i64::from(i32::from_le_bytes(c.try_into().unwrap_or_default())))
            .collect()),
        other => Err(format!("{field} must be I64 or I32, not {other:?}")),
    }
}

/// The graph's inputs: `batch × seq` token ids, and the optional mask and
/// token types, by their slot (`input_ids`, `attention_mask`,
/// `token_type_ids`).
struct Inputs {
    batch: usize,
    seq: usize,
    slots: [Option<Vec<i64>>; 3],
}

/// The inputs from the named tensors: `input_ids` `[batch, seq]`, optional
/// `attention_mask` and `token_type_ids` of the same shape.
fn inputs(named: &[(String, &NnTensor)]) -> Result<Inputs, String> {
    let mut out: [Option<Vec<i64>>; 3] = [None, None, None];
    let mut shape = None;
    for (name, t) in named {
        let field: &'static str = match name.as_str() {
            "input_ids" => "input_ids",
            "attention_mask" => "attention_mask",
            "token_type_ids" => "token_type_ids",
            other => {
                return Err(format!(
                    "unknown input {other:?}: the model takes input_ids, attention_mask, token_type_ids"
                ));
            }
        };
        let (b, s) = match t.dims[..] {
            [b, s] => (b as usize, s as usize),
            [s] => (1, s as usize),
            _ => return Err(format!("{field} must be [batch, seq], not {:?}", t.dims)),
        };
        if *shape.get_or_insert((b, s)) != (b, s) {
            return Err(format!(
                "{field} has shape {:?}, unlike the other inputs",
                t.dims
            ));
        }
        let v = i64s(field, t)?;
        if Some(v.len()) != b.checked_mul(s) {
            return Err(format!(
                "{field} holds {} values for its shape {:?}",
                v.len(),
                t.dims
            ));
        }
        let slot = ["input_ids", "attention_mask", "token_type_ids"]
            .iter()
            .position(|n| *n == field)
            .unwrap_or(0);
        if out[slot].replace(v).is_some() {
            return Err(format!("{field} is given twice"));
        }
    }
    let (b, s) = shape.ok_or("no inputs: the model takes input_ids")?;
    if out[0].is_none() {
        return Err("input_ids is missing".into());
    }
    Ok(Inputs {
        batch: b,
        seq: s,
        slots: out,
    })
}

impl generated::wasi::nn::inference::HostGraphExecutionContext for CallState {
    fn compute(
        &mut self,
        ctx: Resource<NnContext>,
        named: Vec<(String, Resource<NnTensor>)>,
    ) -> wasmtime::Result<Result<Vec<(String, Resource<NnTensor>)>, Resource<NnFailure>>> {
        match self.nn_compute(&ctx, &named)? {
            Ok(v) => Ok(Ok(v)),
            Err((code, data)) => self.nn_fail(code, data),
        }
    }

    fn drop(&mut self, ctx: Resource<NnContext>) -> wasmtime::Result<()> {
        self.table.delete(ctx)?;
        Ok(())
    }
}

type Computed = Result<Vec<(String, Resource<NnTensor>)>, (ErrorCode, String)>;

impl CallState {
    fn nn_compute(
        &mut self,
        ctx: &Resource<NnContext>,
        named: &[(String, Resource<NnTensor>)],
    ) -> wasmtime::Result<Computed> {
        let (name, model) = {
            let c = self.table.get(ctx)?;
            (c.name.clone(), c.model.clone())
        };
        // The inputs stay the component's: read them where they are.
        let mut held = Vec::with_capacity(named.len());
        for (n, r) in named {
            held.push((n.clone(), self.table.get(r)?));
        }
        let Inputs {
            batch,
            seq,
            slots: [ids, mask, types],
        } = match inputs(&held) {
            Ok(v) => v,
            Err(e) => {
                return Ok(Err((
                    ErrorCode::InvalidArgument,
                    format!("bad_arguments: {e}"),
                )));
            }
        };
        let hidden = model.config().hidden_size;
        // Charged before the engine allocates it; more tokens than the
        // engine takes are refused by it before any allocation.
        let tokens = batch.saturating_mul(seq);
        let out_bytes = tokens.saturating_mul(hidden).saturating_mul(4);
        let charged = tokens <= airlock_nn::MAX_TOKENS;
        if charged
            && !self
                .limiter
                .hold(out_bytes as u64, "a wasi:nn output tensor")
        {
            return Ok(Err((
                ErrorCode::TooLarge,
                format!(
                    "the output ({out_bytes} bytes) does not fit the call's memory limit beside its memory and tensors"
                ),
            )));
        }
        let b = Batch {
            batch,
            seq,
            input_ids: ids.as_deref().unwrap_or_default(),
            attention_mask: mask.as_deref(),
            token_type_ids: types.as_deref(),
        };
        let started = std::time::Instant::now();
        // Native work of bounded size (the engine's MAX_TOKENS): let the
        // runtime move other tasks off this thread meanwhile.
        let result = tokio::task::block_in_place(|| model.encode(&b));
        let v = match result {
            Ok(v) => v,
            Err(e) => {
                if charged {
                    self.limiter.release(out_bytes as u64);
                }
                return Ok(Err((
                    ErrorCode::InvalidArgument,
                    format!("bad_arguments: {e}"),
                )));
            }
        };
        self.audit.record(
            "nn.compute",
            name,
            Decision::Allow,
            format!(
                "{batch}x{seq} tokens in {} ms",
                started.elapsed().as_millis()
            ),
        );
        let t = self.table.push(NnTensor {
            dims: vec![batch as u32, seq as u32, hidden as u32],
            ty: TensorType::Fp32,
            data: v.iter().flat_map(|f| f.to_le_bytes()).collect(),
        })?;
        Ok(Ok(vec![("last_hidden_state".to_string(), t)]))
    }
}

impl generated::wasi::nn::tensor::HostTensor for CallState {
    fn new(
        &mut self,
        dims: Vec<u32>,
        ty: TensorType,
        data: Vec<u8>,
    ) -> wasmtime::Result<Resource<NnTensor>> {
        if !self.limiter.hold(data.len() as u64, "a wasi:nn tensor") {
            // The call ends as out of memory, as when its memory grows.
            self.limiter.hit = true;
            return Err(wasmtime::format_err!(
                "host memory for tensors: {} more bytes would pass the call's memory limit of {} bytes",
                data.len(),
                self.limiter.limit
            ));
        }
        Ok(self.table.push(NnTensor { dims, ty, data })?)
    }

    fn dimensions(&mut self, t: Resource<NnTensor>) -> wasmtime::Result<Vec<u32>> {
        Ok(self.table.get(&t)?.dims.clone())
    }

    fn ty(&mut self, t: Resource<NnTensor>) -> wasmtime::Result<TensorType> {
        Ok(self.table.get(&t)?.ty)
    }

    fn data(&mut self, t: Resource<NnTensor>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table.get(&t)?.data.clone())
    }

    fn drop(&mut self, t: Resource<NnTensor>) -> wasmtime::Result<()> {
        let t = self.table.delete(t)?;
        self.limiter.release(t.data.len() as u64);
        Ok(())
    }
}

impl generated::wasi::nn::errors::HostError for CallState {
    fn code(&mut self, e: Resource<NnFailure>) -> wasmtime::Result<ErrorCode> {
        Ok(self.table.get(&e)?.code)
    }

    fn data(&mut self, e: Resource<NnFailure>) -> wasmtime::Result<String> {
        Ok(self.table.get(&e)?.data.clone())
    }

    fn drop(&mut self, e: Resource<NnFailure>) -> wasmtime::Result<()> {
        self.table.delete(e)?;
        Ok(())
    }
}

impl generated::wasi::nn::errors::Host for CallState {}
impl generated::wasi::nn::tensor::Host for CallState {}
impl generated::wasi::nn::inference::Host for CallState {}

#[cfg(test)]
mod tests {
    use super::*;

    /// all-MiniLM-L6-v2 from `$AIRLOCK_MINILM` or the cache.
    fn minilm() -> PathBuf {
        std::env::var_os("AIRLOCK_MINILM")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let cache = std::env::var_os("AIRLOCK_CACHE")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| {
                        PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                            .join(".cache/airlock")
                    });
                cache.join("models/all-MiniLM-L6-v2")
            })
    }

    /// `n` model directories under one root, their files hard links to the
    /// real model's copy in the root (no 87 MiB copy each).
    fn models(n: usize) -> (tempfile::TempDir, Vec<ModelGrant>) {
        let root = tempfile::tempdir().unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(minilm().join(f), root.path().join(f)).unwrap();
        }
        let grants = (0..n)
            .map(|i| {
                let dir = root.path().join(format!("m{i}"));
                std::fs::create_dir(&dir).unwrap();
                for f in ["config.json", "model.safetensors"] {
                    std::fs::hard_link(root.path().join(f), dir.join(f)).unwrap();
                }
                ModelGrant {
                    root: root.path().to_path_buf(),
                    dir,
                    origin: None,
                }
            })
            .collect();
        (root, grants)
    }

    #[test]
    fn a_model_is_opened_once_until_its_files_change_and_few_stay_open() {
        let (_root, grants) = models(MAX_OPEN_MODELS + 2);
        let a = open_model(&grants[0]).unwrap();
        assert!(Arc::ptr_eq(&a, &open_model(&grants[0]).unwrap()));
        // The files replaced (a new inode, as an update would): reopened.
        let cfg = grants[0].dir.join("config.json");
        let text = std::fs::read(&cfg).unwrap();
        std::fs::remove_file(&cfg).unwrap();
        std::fs::write(&cfg, text).unwrap();
        let b = open_model(&grants[0]).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&b, &open_model(&grants[0]).unwrap()));
        // Many model directories: at most MAX_OPEN_MODELS stay open
        // (other tests' models may be among them, never more).
        for g in &grants {
            open_model(g).unwrap();
        }
        let open = opened().lock().unwrap();
        assert!(open.len() <= MAX_OPEN_MODELS, "{} open", open.len());
        assert!(!open.iter().any(|(d, _, _)| *d == grants[0].dir));
    }
}
