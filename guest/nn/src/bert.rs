//! The BERT encoder: config, zero-copy weights, forward pass.

use crate::{MAX_TOKENS, NnError};
use ndarray::{Array2, ArrayView1, ArrayView2, s};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Largest `config.json` read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The fields of a Hugging Face `config.json` the encoder runs by.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct BertConfig {
    /// Must be `bert`.
    #[serde(default = "bert")]
    pub model_type: String,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of every hidden state.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer (divides `hidden_size`).
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// The model's context: the longest sequence it takes.
    pub max_position_embeddings: usize,
    /// Token types (segments).
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    /// The layer norms' epsilon.
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// Must be `gelu` (the exact, erf-based GELU).
    #[serde(default = "gelu")]
    pub hidden_act: String,
    /// Must be `absolute`.
    #[serde(default = "absolute")]
    pub position_embedding_type: String,
}

fn bert() -> String {
    "bert".into()
}
fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}
fn gelu() -> String {
    "gelu".into()
}
fn absolute() -> String {
    "absolute".into()
}

impl BertConfig {
    /// Whether this engine runs a model of this shape; why not otherwise.
    fn check(&self) -> Result<(), String> {
        let want = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_string()) };
        want(self.model_type == "bert", "model_type is not \"bert\"")?;
        want(
            self.hidden_act == "gelu",
            "hidden_act is not \"gelu\" (the only activation this engine has)",
        )?;
        want(
            self.position_embedding_type == "absolute",
            "position_embedding_type is not \"absolute\"",
        )?;
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            // Each is a dimension of a tensor in the file, so the file's
            // size bounds them; this bound only keeps products in range.
            want(
                v > 0 && v <= 1 << 24,
                &format!("{name} is {v}, not 1..=2^24"),
            )?;
        }
        want(
            self.hidden_size.is_multiple_of(self.num_attention_heads),
            "num_attention_heads does not divide hidden_size",
        )?;
        want(
            self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0,
            "layer_norm_eps is not a positive number",
        )
    }
}

/// A dense layer: `y = x Wᵀ + b`, `W` stored `[out, inp]`.
#[derive(Debug, Clone)]
struct Linear {
    w: Range<usize>,
    b: Range<usize>,
    out: usize,
    inp: usize,
}

/// A layer norm's gain and bias.
#[derive(Debug, Clone)]
struct Norm {
    g: Range<usize>,
    b: Range<usize>,
}

#[derive(Debug, Clone)]
struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    inter: Linear,
    out: Linear,
    out_norm: Norm,
}

/// One call's input: `batch` sequences of `seq` tokens, row-major.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence (padding included).
    pub seq: usize,
    /// Token ids, `batch × seq`.
    pub input_ids: &'a [i64],
    /// 1 for a real token, 0 for padding (`batch × seq`); all 1 if absent.
    pub attention_mask: Option<&'a [i64]>,
    /// Token types (`batch × seq`); all 0 if absent.
    pub token_type_ids: Option<&'a [i64]>,
}

/// Where a [`Bert`]'s weights lie.
enum Weights {
    /// Mapped read-only: a file on a read-only image, or this process's
    /// sealed copy ([`Bert::open`]).
    #[cfg(feature = "map")]
    Mapped(memmap2::Mmap),
    /// Read into this process's memory ([`Bert::read`]); `u32`s so the
    /// bytes are aligned for `f32` reads, the first `usize` bytes used.
    Owned(Vec<u32>, usize),
}

impl Weights {
    fn bytes(&self) -> &[u8] {
        match self {
            #[cfg(feature = "map")]
            Self::Mapped(m) => m,
            Self::Owned(words, len) => &bytemuck::cast_slice(words)[..*len],
        }
    }
}

/// A BERT encoder over a mapped safetensors file (see the crate docs).
pub struct Bert {
    weights: Weights,
    in_place: bool,
    cfg: BertConfig,
    path: PathBuf,
    word: Range<usize>,
    position: Range<usize>,
    token_type: Range<usize>,
    embed_norm: Norm,
    layers: Vec<Layer>,
}

impl std::fmt::Debug for Bert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bert")
            .field("path", &self.path)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Bert {
    /// Open the model in `dir` (`config.json`, `model.safetensors`),
    /// its weights mapped, never copied into this process's heap.
    ///
    /// # Errors
    /// [`NnError::Model`] when a file is missing, unreadable, malformed, or
    /// lacks a tensor of the shape the config implies.
    #[cfg(feature = "map")]
    pub fn open(dir: &Path) -> Result<Self, NnError> {
        let cfg = read_config(dir)?;
        let path = dir.join("model.safetensors");
        let bad = |reason: String| NnError::Model {
            path: path.clone(),
            reason,
        };
        let file = open_no_link(&path).map_err(|e| bad(e.to_string()))?;
        let (file, in_place) = stable(file).map_err(bad)?;
        // SAFETY: a read-only shared mapping; nothing here writes through
        // it. The file cannot change while mapped: it is either on a
        // read-only image file system (`stable`: erofs, squashfs) or a
        // memfd sealed against writes, shrinking and growing; every view
        // into it is bounds- and alignment-checked in `build` before use.
        let map = unsafe { memmap2::MmapOptions::new().map(&file) }
            .map_err(|e| bad(format!("cannot map it: {e}")))?;
        Self::build(cfg, Weights::Mapped(map), path, in_place)
    }

    /// Read the model in `dir` whole into this process's memory: what a
    /// program without a mapping (a Wasm component reading a granted file)
    /// does — a private copy of the weights per reader.
    ///
    /// # Errors
    /// As [`Bert::open`].
    pub fn read(dir: &Path) -> Result<Self, NnError> {
        use std::io::Read;
        let cfg = read_config(dir)?;
        let path = dir.join("model.safetensors");
        let bad = |reason: String| NnError::Model {
            path: path.clone(),
            reason,
        };
        let mut file = open_no_link(&path).map_err(|e| bad(e.to_string()))?;
        let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
        let len = usize::try_from(len).map_err(|_| bad("it is too large to read".into()))?;
        let mut words = vec![0u32; len.div_ceil(4)];
        file.read_exact(&mut bytemuck::cast_slice_mut(&mut words)[..len])
            .map_err(|e| bad(format!("cannot read it: {e}")))?;
        Self::build(cfg, Weights::Owned(words, len), path, false)
    }

    /// The encoder over `weights`, every tensor it reads checked.
    fn build(
        cfg: BertConfig,
        weights: Weights,
        path: PathBuf,
        in_place: bool,
    ) -> Result<Self, NnError> {
        let index = Index::new(weights.bytes(), &path)?;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let linear = |name: &str, out: usize, inp: usize| -> Result<Linear, NnError> {
            Ok(Linear {
                w: index.f32s(&format!("{name}.weight"), &[out, inp])?,
                b: index.f32s(&format!("{name}.bias"), &[out])?,
                out,
                inp,
            })
        };
        let norm = |name: &str| -> Result<Norm, NnError> {
            Ok(Norm {
                g: index.f32s(&format!("{name}.weight"), &[h])?,
                b: index.f32s(&format!("{name}.bias"), &[h])?,
            })
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            layers.push(Layer {
                q: linear(&format!("{p}.attention.self.query"), h, h)?,
                k: linear(&format!("{p}.attention.self.key"), h, h)?,
                v: linear(&format!("{p}.attention.self.value"), h, h)?,
                attn_out: linear(&format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                inter: linear(&format!("{p}.intermediate.dense"), i, h)?,
                out: linear(&format!("{p}.output.dense"), h, i)?,
                out_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        let word = index.f32s("embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?;
        let position = index.f32s(
            "embeddings.position_embeddings.weight",
            &[cfg.max_position_embeddings, h],
        )?;
        let token_type = index.f32s(
            "embeddings.token_type_embeddings.weight",
            &[cfg.type_vocab_size, h],
        )?;
        let embed_norm = norm("embeddings.LayerNorm")?;
        drop(index);
        Ok(Self {
            weights,
            in_place,
            cfg,
            path,
            word,
            position,
            token_type,
            embed_norm,
            layers,
        })
    }

    /// The model's config.
    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// The mapped weights file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the weights are read where they lie (a read-only image, the
    /// page cache shared by every process and VM), rather than from this
    /// process's sealed copy.
    pub fn in_place(&self) -> bool {
        self.in_place
    }

    /// The last hidden state of every token: `batch × seq × hidden` floats,
    /// row-major (`last_hidden_state` of a Hugging Face `BertModel`).
    ///
    /// # Errors
    /// [`NnError::Input`] naming the input that does not fit the model.
    pub fn encode(&self, b: &Batch<'_>) -> Result<Vec<f32>, NnError> {
        let tokens = self.check(b)?;
        let h = self.cfg.hidden_size;
        let mut out = Vec::with_capacity(tokens * h);
        for i in 0..b.batch {
            let r = i * b.seq..(i + 1) * b.seq;
            let ids = &b.input_ids[r.clone()];
            let mask = b.attention_mask.map(|m| &m[r.clone()]);
            let types = b.token_type_ids.map(|t| &t[r]);
            let hidden = self.sequence(ids, types, mask)?;
            out.extend(hidden.iter());
        }
        Ok(out)
    }

    /// Check `b` against the model; the number of tokens.
    fn check(&self, b: &Batch<'_>) -> Result<usize, NnError> {
        let c = &self.cfg;
        if b.batch == 0 || b.seq == 0 {
            return Err(NnError::input(
                "input_ids",
                format!("its shape [{}, {}] is empty", b.batch, b.seq),
            ));
        }
        if b.seq > c.max_position_embeddings {
            return Err(NnError::input(
                "input_ids",
                format!(
                    "{} tokens per sequence is longer than the model's context of {}",
                    b.seq, c.max_position_embeddings
                ),
            ));
        }
        let tokens = b
            .batch
            .checked_mul(b.seq)
            .filter(|t| *t <= MAX_TOKENS)
            .ok_or_else(|| {
                NnError::input(
                    "input_ids",
                    format!(
                        "{} sequences of {} tokens is more than {MAX_TOKENS} tokens at once",
                        b.batch, b.seq
                    ),
                )
            })?;
        let within = |field: &'static str, v: &[i64], below: usize| {
            if v.len() != tokens {
                return Err(NnError::input(
                    field,
                    format!("it holds {} values, not {tokens}", v.len()),
                ));
            }
            match v
                .iter()
                .position(|&x| usize::try_from(x).map_or(true, |x| x >= below))
            {
                Some(at) => Err(NnError::input(
                    field,
                    format!("value {} at {at} is not in 0..{below}", v[at]),
                )),
                None => Ok(()),
            }
        };
        within("input_ids", b.input_ids, c.vocab_size)?;
        if let Some(m) = b.attention_mask {
            within("attention_mask", m, 2)?;
        }
        if let Some(t) = b.token_type_ids {
            within("token_type_ids", t, c.type_vocab_size)?;
        }
        Ok(tokens)
    }

    /// The weights in `r` (checked when the model opened).
    fn f(&self, r: &Range<usize>) -> &[f32] {
        bytemuck::cast_slice(&self.weights.bytes()[r.clone()])
    }

    fn view2(
        &self,
        r: &Range<usize>,
        rows: usize,
        cols: usize,
    ) -> Result<ArrayView2<'_, f32>, NnError> {
        ArrayView2::from_shape((rows, cols), self.f(r)).map_err(|e| NnError::Model {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }

    fn linear(&self, x: &ArrayView2<'_, f32>, l: &Linear) -> Result<Array2<f32>, NnError> {
        let w = self.view2(&l.w, l.out, l.inp)?;
        let mut y = x.dot(&w.t());
        y += &ArrayView1::from(self.f(&l.b));
        Ok(y)
    }

    fn layer_norm(&self, x: &mut Array2<f32>, n: &Norm) {
        let (g, b) = (self.f(&n.g), self.f(&n.b));
        let eps = self.cfg.layer_norm_eps as f32;
        for mut row in x.rows_mut() {
            let len = row.len() as f32;
            let mean = row.sum() / len;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / len;
            let inv = 1.0 / (var + eps).sqrt();
            for (j, v) in row.iter_mut().enumerate() {
                *v = (*v - mean) * inv * g[j] + b[j];
            }
        }
    }

    /// One sequence's last hidden state, `[seq, hidden]`.
    fn sequence(
        &self,
        ids: &[i64],
        types: Option<&[i64]>,
        mask: Option<&[i64]>,
    ) -> Result<Array2<f32>, NnError> {
        let c = &self.cfg;
        let (n, h) = (ids.len(), c.hidden_size);
        let (word, pos, tt) = (
            self.f(&self.word),
            self.f(&self.position),
            self.f(&self.token_type),
        );
        let mut x = Array2::<f32>::zeros((n, h));
        for (i, mut row) in x.rows_mut().into_iter().enumerate() {
            // In range: `check` held every id below its table's rows.
            let id = ids[i] as usize;
            let t = types.map_or(0, |t| t[i] as usize);
            let (w, p, k) = (&word[id * h..][..h], &pos[i * h..][..h], &tt[t * h..][..h]);
            for (j, v) in row.iter_mut().enumerate() {
                *v = w[j] + p[j] + k[j];
            }
        }
        self.layer_norm(&mut x, &self.embed_norm);
        // Padding takes no attention: its scores get the lowest float.
        let bias: Vec<f32> = (0..n)
            .map(|j| match mask {
                Some(m) if m[j] == 0 => f32::MIN,
                _ => 0.0,
            })
            .collect();
        let heads = c.num_attention_heads;
        let d = h / heads;
        let scale = 1.0 / (d as f32).sqrt();
        for l in &self.layers {
            let q = self.linear(&x.view(), &l.q)?;
            let k = self.linear(&x.view(), &l.k)?;
            let v = self.linear(&x.view(), &l.v)?;
            let mut ctx = Array2::<f32>::zeros((n, h));
            for head in 0..heads {
                let cols = s![.., head * d..(head + 1) * d];
                let mut scores = q.slice(cols).dot(&k.slice(cols).t());
                for mut row in scores.rows_mut() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = *v * scale + bias[j];
                    }
                    softmax(row.as_slice_mut().unwrap_or(&mut []));
                }
                ctx.slice_mut(cols).assign(&scores.dot(&v.slice(cols)));
            }
            let mut a = self.linear(&ctx.view(), &l.attn_out)?;
            a += &x;
            self.layer_norm(&mut a, &l.attn_norm);
            let mut inter = self.linear(&a.view(), &l.inter)?;
            inter.mapv_inplace(gelu_erf);
            let mut o = self.linear(&inter.view(), &l.out)?;
            o += &a;
            self.layer_norm(&mut o, &l.out_norm);
            x = o;
        }
        Ok(x)
    }
}

/// The exact GELU: `x Φ(x)`.
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// Softmax in place (max-subtracted, so large scores do not overflow).
fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    if sum > 0.0 {
        for v in row.iter_mut() {
            *v /= sum;
        }
    }
}

/// The checked `config.json` of the model in `dir`.
fn read_config(dir: &Path) -> Result<BertConfig, NnError> {
    let path = dir.join("config.json");
    let bad = |reason: String| NnError::Model {
        path: path.clone(),
        reason,
    };
    let text = read_bounded(&path).map_err(bad)?;
    let cfg: BertConfig = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    cfg.check().map_err(bad)?;
    Ok(cfg)
}

/// File systems whose files cannot change under a mapping: read-only
/// images (erofs — the weights image — and squashfs).
#[cfg(feature = "map")]
const IMAGE_FS_MAGIC: [u32; 2] = [0xE0F5_E1E2, 0x7371_7368];

/// A file whose bytes cannot change while mapped, and whether it is `file`
/// itself. A file on a read-only image is; any other may be truncated by
/// whoever can write it — a mapped page that is gone is a `SIGBUS` that
/// ends the process — so it is copied once into a memfd sealed against
/// writing, shrinking and growing.
#[cfg(feature = "map")]
fn stable(file: std::fs::File) -> Result<(std::fs::File, bool), String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: an all-zero statfs is a valid value of the plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `file` is an open descriptor and `st` a valid statfs the call
    // fills; nothing else is touched.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(format!(
            "cannot stat its file system: {}",
            std::io::Error::last_os_error()
        ));
    }
    if IMAGE_FS_MAGIC.contains(&(st.f_type as u32)) {
        return Ok((file, true));
    }
    // SAFETY: a NUL-terminated name and flags; the call returns a new
    // descriptor or -1 and touches no memory of ours.
    let fd = unsafe {
        libc::memfd_create(
            c"airlock-model".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(format!(
            "cannot make a sealed copy: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let mut copy = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut src = file;
    std::io::copy(&mut src, &mut copy).map_err(|e| format!("cannot copy it: {e}"))?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on the memfd we own, with an integer argument.
    if unsafe { libc::fcntl(copy.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(format!(
            "cannot seal its copy: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok((copy, false))
}

/// Open a model file for reading; a symbolic link in its place is refused
/// (a model directory's files are its own).
#[cfg(feature = "map")]
fn open_no_link(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Without `map` (built into a Wasm component): the file at `path`; the
/// component's own file system grant bounds what it can reach.
#[cfg(not(feature = "map"))]
fn open_no_link(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(path)
}

/// Read a small file whole, refusing one over [`MAX_CONFIG_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let file = open_no_link(path).map_err(|e| e.to_string())?;
    let mut text = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(format!("it is larger than {MAX_CONFIG_BYTES} bytes"));
    }
    Ok(text)
}

/// The tensors of a mapped safetensors file, as checked byte ranges.
struct Index<'a> {
    tensors: safetensors::SafeTensors<'a>,
    base: usize,
    path: &'a Path,
}

impl<'a> Index<'a> {
    fn new(map: &'a [u8], path: &'a Path) -> Result<Self, NnError> {
        // The parser checks the header and that every tensor's bytes lie
        // inside the file and match its dtype and shape.
        let tensors = safetensors::SafeTensors::deserialize(map).map_err(|e| NnError::Model {
            path: path.to_path_buf(),
            reason: format!("not a safetensors file: {e}"),
        })?;
        Ok(Self {
            tensors,
            base: map.as_ptr() as usize,
            path,
        })
    }

    /// The byte range of the f32 tensor `name`, which must have `shape`
    /// and be aligned for `f32` reads.
    fn f32s(&self, name: &str, shape: &[usize]) -> Result<Range<usize>, NnError> {
        let bad = |reason: String| NnError::Model {
            path: self.path.to_path_buf(),
            reason,
        };
        let t = self
            .tensors
            .tensor(name)
            .map_err(|_| bad(format!("it has no tensor {name}")))?;
        if t.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!("{name} is {:?}, not F32", t.dtype())));
        }
        if t.shape() != shape {
            return Err(bad(format!(
                "{name} has shape {:?}, not {shape:?}",
                t.shape()
            )));
        }
        let data = t.data();
        let start = data.as_ptr() as usize - self.base;
        if !(data.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>())
            || data.len() % std::mem::size_of::<f32>() != 0
        {
            return Err(bad(format!("{name} is not aligned for f32 reads")));
        }
        Ok(start..start + data.len())
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("safetensors data is little-endian; this engine reads it in place");

#[cfg(test)]
mod tests;
