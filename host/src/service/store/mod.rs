//! The data directory: a content-addressed blob store (sha256) for component
//! bytes, a cache of precompiled artifacts, and the metadata (components,
//! policy versions, audit log) behind one interface, [`Metadata`]: an
//! SQLite file in the data directory ([`sqlite`], the default) or a
//! PostgreSQL database several nodes share ([`postgres`]).
//!
//! ```text
//! <data>/airlock.db            SQLite (WAL, synchronous=FULL)
//! <data>/blobs/<sha256>        component bytes, immutable
//! <data>/tmp/                  uploads in progress (emptied at start)
//! <data>/artifacts/<sha256>-<engine>.cwasm   precompiled, per engine config
//! ```
//!
//! **Invariants:** a blob is renamed into `blobs/` only after its bytes are
//! fsynced and its digest computed; a component row is committed only after
//! its blob is in place (and the directory fsynced). A crash at any point
//! therefore leaves either no component or a complete one; stray temporary
//! files and unreferenced blobs are removed at the next start. Every change
//! and its audit record are one transaction of the metadata store, and two
//! writers racing for one name or one policy version meet the store's
//! unique keys ([`StoreError::Conflict`]), never a silent overwrite.

pub mod blobs;
pub mod postgres;
pub mod sqlite;

use blobs::Blobs;

use super::audit::{self, AuditError, NewRecord, now_ms};
use crate::signing::state as signature_state;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("The data directory could not be used ({what}): {source}.")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The database failed.
    #[error("The database failed: {0}.")]
    Db(#[from] rusqlite::Error),
    /// The PostgreSQL database failed or cannot be reached.
    #[error("The PostgreSQL database failed: {}.", postgres_reason(.0))]
    Postgres(#[from] ::postgres::Error),
    /// The TLS settings for the database cannot be used.
    #[error("TLS to the PostgreSQL database cannot be set up: {0}.")]
    Tls(String),
    /// The PostgreSQL database's schema is newer than this node knows.
    #[error(
        "The PostgreSQL database has schema version {found}; this node knows {known} at most. Upgrade this node before starting it."
    )]
    Schema {
        /// The database's version.
        found: i64,
        /// This node's.
        known: i64,
    },
    /// The object store failed or cannot be reached.
    #[error("The object store failed {what}: {reason}.")]
    ObjectStore {
        /// What was being done (`storing blob <digest>`).
        what: String,
        /// Why.
        reason: String,
    },
    /// Bytes read back do not match their digest: changed where they are
    /// kept (the object store's bucket, the cache), and refused.
    #[error(
        "Blob {0} does not match its digest (its bytes were changed where they are kept); refused."
    )]
    Tampered(String),
    /// Another writer took the same key first (a component name, a
    /// policy version) and trying again did not help.
    #[error("Another change to {0:?} was made at the same moment; try again.")]
    Conflict(String),
    /// The audit log failed.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// A component of that name exists with other bytes.
    #[error("A component named {0:?} already exists with different bytes; delete it first.")]
    Exists(String),
    /// No such component.
    #[error("No component named {0:?}.")]
    NoComponent(String),
    /// No such policy version.
    #[error("Component {component:?} has no policy version {version}.")]
    NoPolicy {
        /// The component.
        component: String,
        /// The version asked for.
        version: i64,
    },
}

/// What the server said (`ERROR 23505: duplicate key …`), else the
/// client's error with its causes (`postgres::Error` alone says only
/// "db error").
fn postgres_reason(e: &::postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text = format!("{text}: {s}");
        source = s.source();
    }
    text
}

/// Run `f`, which blocks on a runtime of its own (a database or object
/// store client's), off the caller's runtime: a thread that drives one
/// (the service's handlers call the store from async code) may not enter
/// another. On a multi-threaded runtime the thread leaves it for the
/// while (`block_in_place`, its other tasks move to other workers); on a
/// single-threaded one `f` runs on a thread of its own while the caller
/// waits, as it would on a socket.
pub(crate) fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Err(_) => f(),
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        Ok(_) => std::thread::scope(|scope| {
            scope
                .spawn(f)
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        }),
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Io { what, source }
}

/// A registered component.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ComponentRow {
    /// Name, unique in the tenant.
    pub name: String,
    /// sha256 of the bytes.
    pub digest: String,
    /// Size in bytes.
    pub size: i64,
    /// Upload time, ms since epoch.
    pub created_ms: i64,
    /// Token name that uploaded it.
    pub created_by: String,
    /// Latest policy version (0: none, nothing granted).
    pub policy_version: i64,
    /// `verified` (signed by a key the tenant trusts) or `unsigned`.
    pub signature: String,
    /// The key that signed it (`ed25519:<hex>`), if signed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_by: Option<String>,
}

/// Who signed what is being stored (`None`: unsigned).
#[derive(Debug, Default, Clone, Copy)]
pub struct SignedBy<'a> {
    /// The component's key.
    pub component: Option<&'a str>,
    /// The policy's key (an upload with a policy).
    pub policy: Option<&'a str>,
}

/// One policy version.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PolicyRow {
    /// 1, 2, ...
    pub version: i64,
    /// The TOML text as uploaded.
    pub text: String,
    /// sha256 of the text.
    pub sha256: String,
    /// When, ms since epoch.
    pub created_ms: i64,
    /// Token name.
    pub created_by: String,
    /// The key that signed it (`ed25519:<hex>`), if signed.
    pub signed_by: Option<String>,
}

/// An upload written to `tmp/` and fsynced, not yet registered.
#[derive(Debug)]
pub struct StagedBlob {
    path: PathBuf,
    /// sha256 of the bytes.
    pub digest: String,
    /// Size.
    pub size: u64,
}

/// Writes an upload to `tmp/` while hashing it.
pub struct BlobWriter {
    file: std::fs::File,
    /// `None` once handed over to a [`StagedBlob`].
    path: Option<PathBuf>,
    hasher: Sha256,
    size: u64,
}

impl BlobWriter {
    /// Append a chunk.
    ///
    /// # Errors
    /// Write failure.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        self.file
            .write_all(chunk)
            .map_err(io("writing an upload"))?;
        self.hasher.update(chunk);
        self.size += chunk.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// fsync and hand back the staged blob.
    ///
    /// # Errors
    /// fsync failure.
    pub fn finish(mut self) -> Result<StagedBlob, StoreError> {
        self.file.sync_all().map_err(io("fsyncing an upload"))?;
        Ok(StagedBlob {
            path: self.path.take().unwrap_or_default(),
            digest: hex::encode(std::mem::take(&mut self.hasher).finalize()),
            size: self.size,
        })
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // An upload abandoned midway (limit hit, client gone): remove it now
        // rather than at the next start.
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl StagedBlob {
    /// Read the staged bytes (for validation).
    ///
    /// # Errors
    /// Read failure.
    pub fn read(&self) -> Result<Vec<u8>, StoreError> {
        std::fs::read(&self.path).map_err(io("reading an upload"))
    }
}

impl Drop for StagedBlob {
    fn drop(&mut self) {
        // Registered blobs were renamed away; anything left is an abandoned upload.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a metadata store keeps and does: components, policy versions and
/// the audit chain. Each write and its audit record are one transaction;
/// a key another writer took first is [`StoreError::Conflict`].
pub trait Metadata: Send + Sync {
    /// The digest of `tenant`'s component `name`, if there is one.
    ///
    /// # Errors
    /// Database failure.
    fn digest_of(&self, tenant: &str, name: &str) -> Result<Option<String>, StoreError>;

    /// Add a component, its first policy (if any) and `record`; returns
    /// the record's sequence number.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when the name was taken meanwhile.
    fn insert_component(
        &self,
        c: &NewComponent<'_>,
        policy: Option<&PolicyInsert<'_>>,
        record: &NewRecord<'_>,
    ) -> Result<i64, StoreError>;

    /// One tenant's components by name (only `name`, when given).
    ///
    /// # Errors
    /// Database failure.
    fn list(&self, tenant: &str, name: Option<&str>) -> Result<Vec<ComponentRow>, StoreError>;

    /// Remove `tenant`'s component `name` (if its digest is still
    /// `digest`) with its policies, and add `record`; returns the record's
    /// sequence number and whether another component still uses the digest.
    ///
    /// # Errors
    /// [`StoreError::NoComponent`] when it is not there (any more).
    fn delete(
        &self,
        tenant: &str,
        name: &str,
        digest: &str,
        record: &NewRecord<'_>,
    ) -> Result<(i64, bool), StoreError>;

    /// Add a policy version and `record`; returns the record's sequence
    /// number.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when the version was taken meanwhile.
    fn insert_policy(
        &self,
        p: &PolicyInsert<'_>,
        record: &NewRecord<'_>,
    ) -> Result<i64, StoreError>;

    /// A policy version (`None`: the latest), if there is one.
    ///
    /// # Errors
    /// Database failure.
    fn policy(
        &self,
        tenant: &str,
        component: &str,
        version: Option<i64>,
    ) -> Result<Option<PolicyRow>, StoreError>;

    /// Every policy version of a component, oldest first, without texts.
    ///
    /// # Errors
    /// Database failure.
    fn policy_versions(&self, tenant: &str, component: &str) -> Result<Vec<PolicyRow>, StoreError>;

    /// Append a record on its own.
    ///
    /// # Errors
    /// Database failure.
    fn audit_append(&self, r: &NewRecord<'_>) -> Result<i64, StoreError>;

    /// One tenant's records matching `f`, oldest first.
    ///
    /// # Errors
    /// Database failure or a hand-edited body.
    fn audit_query(
        &self,
        tenant: &str,
        f: &audit::Filter,
    ) -> Result<Vec<audit::Record>, StoreError>;

    /// Walk the whole chain ([`audit::Verifier`]).
    ///
    /// # Errors
    /// Database failure (a broken chain is `Ok` with `ok: false`).
    fn audit_verify(&self, anchor: Option<(i64, &str)>) -> Result<audit::Verification, StoreError>;

    /// Every digest a component refers to.
    ///
    /// # Errors
    /// Database failure.
    fn live_digests(&self) -> Result<HashSet<String>, StoreError>;
}

/// A component row to add.
#[derive(Debug)]
pub struct NewComponent<'a> {
    /// Tenant.
    pub tenant: &'a str,
    /// Name.
    pub name: &'a str,
    /// sha256 of the bytes.
    pub digest: &'a str,
    /// Size in bytes.
    pub size: i64,
    /// When, ms since epoch.
    pub created_ms: i64,
    /// Token name.
    pub actor: &'a str,
    /// The key that signed it.
    pub signed_by: Option<&'a str>,
}

/// A policy version to add.
#[derive(Debug)]
pub struct PolicyInsert<'a> {
    /// Tenant.
    pub tenant: &'a str,
    /// Token name.
    pub actor: &'a str,
    /// Component.
    pub component: &'a str,
    /// 1, 2, ...
    pub version: i64,
    /// The TOML text.
    pub text: &'a str,
    /// sha256 of the text.
    pub sha256: String,
    /// When, ms since epoch.
    pub created_ms: i64,
    /// The key that signed it.
    pub signed_by: Option<&'a str>,
}

/// How often a write that met another writer's key is tried again.
const CONFLICT_TRIES: usize = 5;

/// The data directory, its metadata store and its blob store.
pub struct Store {
    dir: PathBuf,
    meta: Box<dyn Metadata>,
    blobs: Box<dyn Blobs>,
    /// The node every audit record this store writes names (`body.node`).
    node: Option<String>,
}

impl Store {
    /// Open (creating if needed) a data directory with its SQLite
    /// metadata (`airlock.db`), and clean up after any crash.
    ///
    /// # Errors
    /// The directory or database cannot be used.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::embedded(dir, None)
    }

    /// [`Store::open`] with the blobs in the object store `s3`, if given.
    ///
    /// # Errors
    /// As [`Store::with`].
    pub fn embedded(dir: &Path, s3: Option<&blobs::S3Config>) -> Result<Self, StoreError> {
        Self::make_dirs(dir)?;
        let meta = sqlite::Sqlite::open(&dir.join("airlock.db"))?;
        Self::with(dir, Box::new(meta), s3)
    }

    /// A data directory (uploads in progress, artifacts, and blobs or
    /// their cache) whose metadata is `meta` and whose blobs are in the
    /// object store `s3` (else in `blobs/`); cleans up after any crash.
    ///
    /// # Errors
    /// The directory cannot be used, or `meta` or the object store fails.
    pub fn with(
        dir: &Path,
        meta: Box<dyn Metadata>,
        s3: Option<&blobs::S3Config>,
    ) -> Result<Self, StoreError> {
        Self::make_dirs(dir)?;
        let local = dir.join("blobs");
        let blobs: Box<dyn Blobs> = match s3 {
            Some(cfg) => Box::new(blobs::S3Blobs::new(cfg, &local)?),
            None => Box::new(blobs::LocalBlobs::new(&local)),
        };
        let store = Self {
            dir: dir.to_path_buf(),
            meta,
            blobs,
            node: None,
        };
        store.collect_garbage()?;
        Ok(store)
    }

    /// Name `node` in every audit record written from now on (`body.node`:
    /// which node of a cluster acted).
    #[must_use]
    pub fn on_node(mut self, node: &str) -> Self {
        self.node = Some(node.to_string());
        self
    }

    /// `r` naming this store's node, if it has one.
    fn stamped<'a>(&self, r: &NewRecord<'a>) -> NewRecord<'a> {
        let mut r = r.clone();
        if let (Some(node), Some(body)) = (&self.node, r.body.as_object_mut()) {
            body.insert("node".into(), node.clone().into());
        }
        r
    }

    fn make_dirs(dir: &Path) -> Result<(), StoreError> {
        for sub in ["blobs", "tmp", "artifacts"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(io(format!("creating {}", dir.join(sub).display())))?;
        }
        Ok(())
    }

    /// Remove abandoned uploads and blobs/artifacts no component refers to.
    fn collect_garbage(&self) -> Result<(), StoreError> {
        let tmp = self.dir.join("tmp");
        for e in std::fs::read_dir(&tmp).map_err(io("listing tmp/"))? {
            let e = e.map_err(io("listing tmp/"))?;
            tracing::info!(file = %e.path().display(), "removing an abandoned upload");
            let _ = std::fs::remove_file(e.path());
        }
        let live = self.meta.live_digests()?;
        self.blobs.collect(&live)?;
        for e in std::fs::read_dir(self.dir.join("artifacts")).map_err(io("listing artifacts/"))? {
            let e = e.map_err(io("listing artifacts/"))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let digest = name.split(['-', '.']).next().unwrap_or("");
            if !live.contains(digest) {
                tracing::info!(file = %e.path().display(), "removing an unreferenced artifact");
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    /// Start writing an upload into `tmp/`.
    ///
    /// # Errors
    /// The file cannot be created.
    pub fn begin_upload(&self) -> Result<BlobWriter, StoreError> {
        let mut rnd = [0u8; 16];
        getrandom::fill(&mut rnd).map_err(|e| StoreError::Io {
            what: "naming an upload".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let path = self.dir.join("tmp").join(hex::encode(rnd));
        let file = std::fs::File::create(&path).map_err(io("creating an upload file"))?;
        Ok(BlobWriter {
            file,
            path: Some(path),
            hasher: Sha256::new(),
            size: 0,
        })
    }

    /// Bytes of a stored blob.
    ///
    /// # Errors
    /// Missing or unreadable blob.
    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        self.blobs.get(digest)
    }

    /// The cached precompiled artifact for `digest` under engine `engine_id`.
    pub fn artifact(&self, digest: &str, engine_id: &str) -> Option<Vec<u8>> {
        std::fs::read(self.artifact_path(digest, engine_id)).ok()
    }

    fn artifact_path(&self, digest: &str, engine_id: &str) -> PathBuf {
        self.dir
            .join("artifacts")
            .join(format!("{digest}-{engine_id}.cwasm"))
    }

    /// Cache a precompiled artifact (written to a temp file, then renamed).
    ///
    /// # Errors
    /// Write failure.
    pub fn put_artifact(
        &self,
        digest: &str,
        engine_id: &str,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let mut w = self.begin_upload()?;
        w.write(bytes)?;
        let staged = w.finish()?;
        std::fs::rename(&staged.path, self.artifact_path(digest, engine_id))
            .map_err(io("storing an artifact"))?;
        Ok(())
    }

    /// Register a staged, validated upload as component `name` of `tenant`,
    /// with an optional first policy, and its audit record — all or nothing.
    /// Returns `(created, audit seq)`; uploading the same bytes under the same
    /// name again is a no-op (`created = false`), also when two such uploads
    /// race.
    ///
    /// # Errors
    /// [`StoreError::Exists`] when the name is taken by other bytes.
    pub fn register(
        &self,
        tenant: &str,
        actor: &str,
        name: &str,
        staged: StagedBlob,
        policy: Option<&str>,
        signed: SignedBy<'_>,
    ) -> Result<(bool, Option<i64>), StoreError> {
        let unchanged_or_taken = |existing: Option<String>| match existing {
            Some(d) if d == staged.digest && policy.is_none() => Ok(Some((false, None))),
            Some(_) => Err(StoreError::Exists(name.to_string())),
            None => Ok(None),
        };
        if let Some(same) = unchanged_or_taken(self.meta.digest_of(tenant, name)?)? {
            return Ok(same);
        }
        self.blobs.put(&staged.digest, &staged.path)?;
        let now = now_ms();
        let policy = policy.map(|text| PolicyInsert {
            tenant,
            actor,
            component: name,
            version: 1,
            text,
            sha256: hex::encode(Sha256::digest(text.as_bytes())),
            created_ms: now,
            signed_by: signed.policy,
        });
        let record = NewRecord {
            tenant,
            actor,
            kind: "component.upload",
            component: name,
            tool: "",
            decision: "allow",
            body: serde_json::json!({
                "digest": staged.digest,
                "size": staged.size,
                "policy_version": policy.as_ref().map(|_| 1),
                "policy_sha256": policy.as_ref().map(|p| p.sha256.clone()),
                "signature": signature_state(signed.component),
                "signed_by": signed.component,
                "policy_signed_by": signed.policy,
            }),
        };
        let row = NewComponent {
            tenant,
            name,
            digest: &staged.digest,
            size: staged.size as i64,
            created_ms: now,
            actor,
            signed_by: signed.component,
        };
        match self
            .meta
            .insert_component(&row, policy.as_ref(), &self.stamped(&record))
        {
            Ok(seq) => Ok((true, Some(seq))),
            // Another upload took the name between the check and now.
            Err(StoreError::Conflict(_)) => unchanged_or_taken(self.meta.digest_of(tenant, name)?)?
                .ok_or_else(|| StoreError::Conflict(name.to_string())),
            Err(e) => Err(e),
        }
    }

    /// One tenant's components.
    ///
    /// # Errors
    /// Database failure.
    pub fn list(&self, tenant: &str) -> Result<Vec<ComponentRow>, StoreError> {
        self.meta.list(tenant, None)
    }

    /// One component.
    ///
    /// # Errors
    /// [`StoreError::NoComponent`].
    pub fn get(&self, tenant: &str, name: &str) -> Result<ComponentRow, StoreError> {
        self.meta
            .list(tenant, Some(name))?
            .pop()
            .ok_or_else(|| StoreError::NoComponent(name.to_string()))
    }

    /// Delete a component and its policy versions (the audit log keeps their hashes).
    ///
    /// # Errors
    /// [`StoreError::NoComponent`].
    pub fn delete(&self, tenant: &str, actor: &str, name: &str) -> Result<i64, StoreError> {
        let row = self.get(tenant, name)?;
        let record = NewRecord {
            tenant,
            actor,
            kind: "component.delete",
            component: name,
            tool: "",
            decision: "allow",
            body: serde_json::json!({"digest": row.digest}),
        };
        let (seq, still_used) =
            self.meta
                .delete(tenant, name, &row.digest, &self.stamped(&record))?;
        if !still_used {
            // After the commit: a crash here leaves an unreferenced blob,
            // which the next start removes.
            self.blobs.forget(&row.digest);
            if let Ok(rd) = std::fs::read_dir(self.dir.join("artifacts")) {
                for e in rd.flatten() {
                    if e.file_name().to_string_lossy().starts_with(&row.digest) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
        Ok(seq)
    }

    /// Add a policy version (validated by the caller); returns (version, audit seq).
    /// Two writers adding a version at once both succeed, one after the other.
    ///
    /// # Errors
    /// [`StoreError::NoComponent`].
    pub fn put_policy(
        &self,
        tenant: &str,
        actor: &str,
        component: &str,
        text: &str,
        signed_by: Option<&str>,
    ) -> Result<(i64, i64), StoreError> {
        let sha256 = hex::encode(Sha256::digest(text.as_bytes()));
        for _ in 0..CONFLICT_TRIES {
            // The latest version; without one, the component must exist.
            let old = self.meta.policy(tenant, component, None)?;
            if old.is_none() {
                self.get(tenant, component)?;
            }
            let version = old.as_ref().map_or(0, |p| p.version) + 1;
            let p = PolicyInsert {
                tenant,
                actor,
                component,
                version,
                text,
                sha256: sha256.clone(),
                created_ms: now_ms(),
                signed_by,
            };
            let record = NewRecord {
                tenant,
                actor,
                kind: "policy.put",
                component,
                tool: "",
                decision: "allow",
                body: serde_json::json!({
                    "old_version": old.as_ref().map(|p| p.version),
                    "old_sha256": old.as_ref().map(|p| p.sha256.clone()),
                    "new_version": version,
                    "new_sha256": sha256,
                    "signature": signature_state(signed_by),
                    "signed_by": signed_by,
                }),
            };
            match self.meta.insert_policy(&p, &self.stamped(&record)) {
                Ok(seq) => return Ok((version, seq)),
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict(component.to_string()))
    }

    /// A policy version (`None`: the latest).
    ///
    /// # Errors
    /// [`StoreError::NoPolicy`] / [`StoreError::NoComponent`].
    pub fn policy(
        &self,
        tenant: &str,
        component: &str,
        version: Option<i64>,
    ) -> Result<PolicyRow, StoreError> {
        // A policy row exists only with its component (deleted together):
        // the component is looked up only to say which is missing.
        match self.meta.policy(tenant, component, version)? {
            Some(p) => Ok(p),
            None => {
                self.get(tenant, component)?;
                Err(StoreError::NoPolicy {
                    component: component.to_string(),
                    version: version.unwrap_or(0),
                })
            }
        }
    }

    /// All policy versions of a component, oldest first (text omitted).
    ///
    /// # Errors
    /// [`StoreError::NoComponent`].
    pub fn policy_versions(
        &self,
        tenant: &str,
        component: &str,
    ) -> Result<Vec<PolicyRow>, StoreError> {
        self.get(tenant, component)?;
        self.meta.policy_versions(tenant, component)
    }

    /// Append an invocation record.
    ///
    /// # Errors
    /// Database failure.
    pub fn audit_append(&self, r: &NewRecord<'_>) -> Result<i64, StoreError> {
        self.meta.audit_append(&self.stamped(r))
    }

    /// Query one tenant's audit records.
    ///
    /// # Errors
    /// Database failure.
    pub fn audit_query(
        &self,
        tenant: &str,
        f: &audit::Filter,
    ) -> Result<Vec<audit::Record>, StoreError> {
        self.meta.audit_query(tenant, f)
    }

    /// Verify the whole chain.
    ///
    /// # Errors
    /// Database failure.
    pub fn audit_verify(
        &self,
        anchor: Option<(i64, &str)>,
    ) -> Result<audit::Verification, StoreError> {
        self.meta.audit_verify(anchor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(s: &Store, bytes: &[u8]) -> StagedBlob {
        let mut w = s.begin_upload().unwrap();
        w.write(bytes).unwrap();
        w.finish().unwrap()
    }

    /// (What every metadata store must do is `tests/cluster.rs`'s
    /// `exercise`, run on SQLite and PostgreSQL; here what is the data
    /// directory's.)
    #[test]
    fn a_registered_component_survives_reopen_and_leaves_no_temporary_files() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let staged = stage(&s, b"one");
        let reg = |s: &Store, staged| {
            s.register(
                "a",
                "tok",
                "c1",
                staged,
                Some("version = 1\n"),
                SignedBy::default(),
            )
        };
        assert_eq!(reg(&s, staged).unwrap(), (true, Some(1)));
        assert!(matches!(
            reg(&s, stage(&s, b"two")),
            Err(StoreError::Exists(_))
        ));
        // No temporary files are left behind by either path.
        assert_eq!(std::fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        drop(s);
        let s = Store::open(d.path()).unwrap();
        let c = s.get("a", "c1").unwrap();
        assert_eq!(c.policy_version, 1);
        assert_eq!(s.read_blob(&c.digest).unwrap(), b"one");
        assert!(s.audit_verify(None).unwrap().ok);
    }

    #[test]
    fn delete_removes_rows_and_unshared_blob_and_garbage_is_collected() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        s.register("a", "t", "c1", stage(&s, b"x"), None, SignedBy::default())
            .unwrap();
        s.register("b", "t", "c1", stage(&s, b"x"), None, SignedBy::default())
            .unwrap();
        let digest = s.get("a", "c1").unwrap().digest;
        s.delete("a", "t", "c1").unwrap();
        assert!(s.read_blob(&digest).is_ok(), "tenant b still uses it");
        s.delete("b", "t", "c1").unwrap();
        assert!(s.read_blob(&digest).is_err());
        // A crash between blob rename and commit leaves an orphan blob; an
        // interrupted upload leaves a tmp file. Both go at the next open.
        std::fs::write(d.path().join("blobs").join("f".repeat(64)), b"orphan").unwrap();
        std::fs::write(d.path().join("tmp").join("partial"), b"half").unwrap();
        drop(s);
        let _s = Store::open(d.path()).unwrap();
        assert_eq!(std::fs::read_dir(d.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(
            std::fs::read_dir(d.path().join("blobs")).unwrap().count(),
            0
        );
    }

    #[test]
    fn policy_versions_accumulate() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        s.register("a", "t", "c", stage(&s, b"x"), None, SignedBy::default())
            .unwrap();
        assert!(matches!(
            s.policy("a", "c", None),
            Err(StoreError::NoPolicy { .. })
        ));
        assert_eq!(
            s.put_policy("a", "t", "c", "version = 1\n", None)
                .unwrap()
                .0,
            1
        );
        assert_eq!(
            s.put_policy("a", "t", "c", "version = 1 \n", None)
                .unwrap()
                .0,
            2
        );
        assert_eq!(s.policy("a", "c", None).unwrap().version, 2);
        assert_eq!(s.policy("a", "c", Some(1)).unwrap().text, "version = 1\n");
        assert_eq!(s.policy_versions("a", "c").unwrap().len(), 2);
        let recs = s.audit_query("a", &audit::Filter::default()).unwrap();
        assert_eq!(recs.last().unwrap().body["old_version"], 1);
    }
}
