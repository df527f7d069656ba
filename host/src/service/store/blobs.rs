//! Where component bytes live, by sha256 digest: the data directory's
//! `blobs/` (the default), or an S3-compatible object store every node of
//! a cluster shares, with `blobs/` as this node's cache.
//!
//! **Invariants:**
//! * A blob is stored before the metadata row that names it commits, so
//!   every row's blob exists (the store's ordering, see the module above).
//! * Bytes read from the object store are checked against their digest
//!   before they are cached or used: a bucket someone else can write cannot
//!   swap a component's code.
//! * Compiled artifacts (native code) never go to the object store: a node
//!   runs only what it compiled itself (`artifacts/`, per node).
//! * The object store keeps a blob no row names for [`GRACE`] before the
//!   collector deletes it: another node may be between storing it and
//!   committing its row (a re-upload stores it again, renewing its time).

use super::{StoreError, io};
use futures_util::StreamExt;
use object_store::ObjectStoreExt;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long an unreferenced blob stays in the object store.
pub const GRACE: Duration = Duration::from_secs(60 * 60);

/// How long one object store request may take, retries included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Component bytes by digest.
pub trait Blobs: Send + Sync {
    /// Keep the file at `staged` (its sha256 is `digest`) as that blob;
    /// storing one that exists changes nothing.
    ///
    /// # Errors
    /// The bytes cannot be stored.
    fn put(&self, digest: &str, staged: &Path) -> Result<(), StoreError>;

    /// The bytes of a blob.
    ///
    /// # Errors
    /// Missing, unreadable, or (from an object store) not matching `digest`.
    fn get(&self, digest: &str) -> Result<Vec<u8>, StoreError>;

    /// No component names `digest` any more (as of the commit just made).
    fn forget(&self, digest: &str);

    /// Remove what no component names (`live`), as far as it is safe.
    ///
    /// # Errors
    /// The blobs cannot be listed.
    fn collect(&self, live: &HashSet<String>) -> Result<(), StoreError>;
}

/// `blobs/` in the data directory.
pub struct LocalBlobs {
    dir: PathBuf,
}

impl LocalBlobs {
    /// Blobs kept in `dir` (which exists).
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(digest)
    }

    /// Move `staged` in as `digest` (fsynced), unless it is there.
    fn keep(&self, digest: &str, staged: &Path) -> Result<(), StoreError> {
        let dest = self.path(digest);
        if !dest.exists() {
            std::fs::rename(staged, &dest).map_err(io("storing a blob"))?;
            std::fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io(format!("fsyncing {}", self.dir.display())))?;
        }
        Ok(())
    }
}

impl Blobs for LocalBlobs {
    fn put(&self, digest: &str, staged: &Path) -> Result<(), StoreError> {
        self.keep(digest, staged)
    }

    fn get(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        std::fs::read(self.path(digest)).map_err(io(format!("reading blob {digest}")))
    }

    fn forget(&self, digest: &str) {
        let _ = std::fs::remove_file(self.path(digest));
    }

    fn collect(&self, live: &HashSet<String>) -> Result<(), StoreError> {
        for e in std::fs::read_dir(&self.dir).map_err(io("listing blobs/"))? {
            let e = e.map_err(io("listing blobs/"))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !live.contains(&name) {
                tracing::info!(file = %e.path().display(), "removing an unreferenced blob");
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(())
    }
}

/// Where the object store is and how to reach it (`[blobs]`).
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// `http(s)://host:port` of an S3-compatible server (empty: AWS).
    pub endpoint: Option<String>,
    /// The bucket.
    pub bucket: String,
    /// The region (`us-east-1` unless set).
    pub region: String,
    /// Key prefix inside the bucket (`airlock/` unless set).
    pub prefix: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Whether plain `http://` endpoints are allowed.
    pub allow_http: bool,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// An S3-compatible object store, `cache` (this node's `blobs/`) in front.
pub struct S3Blobs {
    store: Arc<dyn object_store::ObjectStore>,
    prefix: String,
    cache: LocalBlobs,
    rt: tokio::runtime::Runtime,
}

fn s3_err(what: &str, digest: &str) -> impl FnOnce(object_store::Error) -> StoreError {
    let what = format!("{what} blob {digest}");
    move |e| StoreError::ObjectStore {
        what,
        reason: e.to_string(),
    }
}

impl S3Blobs {
    /// Reach the object store of `cfg`, caching in `cache` (which exists).
    ///
    /// # Errors
    /// A configuration the client refuses.
    pub fn new(cfg: &S3Config, cache: &Path) -> Result<Self, StoreError> {
        let mut b = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(&cfg.access_key_id)
            .with_secret_access_key(&cfg.secret_access_key)
            // Client options first: setting them replaces allow_http.
            .with_client_options(
                object_store::ClientOptions::new()
                    .with_timeout(REQUEST_TIMEOUT)
                    .with_connect_timeout(Duration::from_secs(5)),
            )
            .with_allow_http(cfg.allow_http)
            .with_retry(object_store::RetryConfig {
                max_retries: 2,
                retry_timeout: REQUEST_TIMEOUT,
                ..object_store::RetryConfig::default()
            });
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e);
        }
        let store = b.build().map_err(|e| StoreError::ObjectStore {
            what: "configuring".into(),
            reason: e.to_string(),
        })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io("starting the object store client"))?;
        Ok(Self {
            store: Arc::new(store),
            prefix: cfg.prefix.clone(),
            cache: LocalBlobs::new(cache),
            rt,
        })
    }

    fn key(&self, digest: &str) -> object_store::path::Path {
        object_store::path::Path::from(format!("{}blobs/{digest}", self.prefix))
    }

    /// Run `f` on this client's runtime (on a thread of its own when the
    /// caller's thread drives another runtime, see [`super::off_runtime`]).
    fn run<T: Send>(&self, f: impl Future<Output = T> + Send) -> T {
        super::off_runtime(|| self.rt.block_on(f))
    }
}

impl Blobs for S3Blobs {
    fn put(&self, digest: &str, staged: &Path) -> Result<(), StoreError> {
        let key = self.key(digest);
        let bytes = std::fs::read(staged).map_err(io("reading an upload"))?;
        // Stored again even when it is there: its time is renewed, so the
        // collector's grace period runs from this upload (see the module
        // invariants).
        self.run(self.store.put(&key, bytes.into()))
            .map_err(s3_err("storing", digest))?;
        self.cache.keep(digest, staged)
    }

    fn get(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        if let Ok(b) = self.cache.get(digest) {
            return Ok(b);
        }
        let key = self.key(digest);
        let bytes = self
            .run(async {
                let got = self.store.get(&key).await?;
                got.bytes().await
            })
            .map_err(s3_err("reading", digest))?;
        if hex::encode(Sha256::digest(&bytes)) != digest {
            return Err(StoreError::Tampered(digest.to_string()));
        }
        // Cached through a temporary file: a crash never leaves half a blob.
        let tmp = self.cache.dir.join(format!(".{digest}.part"));
        std::fs::write(&tmp, &bytes)
            .and_then(|()| std::fs::rename(&tmp, self.cache.path(digest)))
            .map_err(io("caching a blob"))?;
        Ok(bytes.to_vec())
    }

    fn forget(&self, digest: &str) {
        // The object store's copy goes with the collector, after GRACE.
        self.cache.forget(digest);
    }

    fn collect(&self, live: &HashSet<String>) -> Result<(), StoreError> {
        self.cache.collect(live)?;
        let prefix = object_store::path::Path::from(format!("{}blobs", self.prefix));
        let old = unix_now() - GRACE.as_secs() as i64;
        let stale: Vec<object_store::path::Path> = self
            .run(async {
                let mut list = self.store.list(Some(&prefix));
                let mut stale = Vec::new();
                while let Some(m) = list.next().await {
                    let m = m?;
                    let digest = m.location.filename().unwrap_or("").to_string();
                    if !live.contains(&digest) && m.last_modified.timestamp() < old {
                        stale.push(m.location);
                    }
                }
                Ok::<_, object_store::Error>(stale)
            })
            .map_err(s3_err("listing", "every"))?;
        for key in stale {
            tracing::info!(key = %key, "removing an unreferenced blob from the object store");
            let _ = self.run(self.store.delete(&key));
        }
        Ok(())
    }
}

/// Seconds since the epoch, as the object store's times count them.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
