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
//!   weights are a read-only mapping); a model that cannot be opened is an
//!   error for the call (`runtime-error`, naming the file), never a panic.
//!
//! [`GrantSet::models`]: crate::grants::GrantSet::models

use super::CallState;
use crate::audit::Decision;
use crate::grants::ModelGrant;
use airlock_nn::{Batch, Bert};
use std::collections::HashMap;
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

/// Models opened by this process, by directory: each opened (mapped) once.
fn opened() -> &'static Mutex<HashMap<PathBuf, Arc<Bert>>> {
    static OPENED: OnceLock<Mutex<HashMap<PathBuf, Arc<Bert>>>> = OnceLock::new();
    OPENED.get_or_init(Mutex::default)
}

/// The model `grant` names: opened beneath its root (no link followed on
/// the way, none for its files), or the one this process opened before.
fn open_model(grant: &ModelGrant) -> Result<Arc<Bert>, String> {
    let mut map = opened().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = map.get(&grant.dir) {
        return Ok(m.clone());
    }
    let dir = grant.open()?;
    let by_fd = PathBuf::from(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&dir)
    ));
    let model = Bert::open(&by_fd).map_err(|e| {
        // Name the directory the grant names, not the descriptor.
        e.to_string().replace(
            &by_fd.display().to_string(),
            &grant.named().display().to_string(),
        )
    })?;
    let model = Arc::new(model);
    map.insert(grant.dir.clone(), model.clone());
    Ok(model)
}

/// Add `wasi:nn` to the linker.
pub(crate) fn add_to_linker(linker: &mut Linker<CallState>) -> wasmtime::Result<()> {
    generated::Ml::add_to_linker::<CallState, HasSelf<CallState>>(linker, |s| s)
}

type Answer<T> = wasmtime::Result<Result<Resource<T>, Resource<NnFailure>>>;

impl CallState {
    fn nn_fail<T>(&mut self, code: ErrorCode, data: impl Into<String>) -> Answer<T> {
        let e = self.table.push(NnFailure {
            code,
            data: data.into(),
        })?;
        Ok(Err(e))
    }

    /// Charge `bytes` of tensor data to the call's memory limit; whether
    /// they fit.
    fn nn_charge(&mut self, bytes: usize, what: &str) -> bool {
        self.limiter.hold(bytes as u64, what)
    }

    fn nn_release(&mut self, bytes: usize) {
        self.limiter.release(bytes as u64);
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
            Err((code, data)) => Ok(Err(self.table.push(NnFailure { code, data })?)),
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
        if charged && !self.nn_charge(out_bytes, "a wasi:nn output tensor") {
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
                    self.nn_release(out_bytes);
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
        if !self.nn_charge(data.len(), "a wasi:nn tensor") {
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
        self.nn_release(t.data.len());
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
