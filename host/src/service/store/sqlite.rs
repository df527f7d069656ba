//! The embedded metadata store: one SQLite file in the data directory
//! (WAL, `synchronous = FULL`), the default.
//!
//! **Invariants:** every change and its audit record are one transaction;
//! the audit head is read and the record appended inside it, and SQLite's
//! single writer serialises appends.

use super::{ComponentRow, PolicyRow};
use super::{Metadata, NewComponent, PolicyInsert, StoreError};
use crate::service::audit::{self, NewRecord};
use crate::signing::state as signature_state;
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// The SQLite metadata store.
pub struct Sqlite {
    db: Mutex<Connection>,
}

/// A unique key taken by another writer: the caller decides what that
/// means (a name taken, a policy version to compute again).
fn conflict(e: rusqlite::Error, what: &str) -> StoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            StoreError::Conflict(what.to_string())
        }
        other => StoreError::Db(other),
    }
}

impl Sqlite {
    /// Open (creating if needed) the database at `path`, migrating an
    /// older schema in place.
    ///
    /// # Errors
    /// The database cannot be opened or migrated.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Connection::open(path)?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA foreign_keys = ON;
             CREATE TABLE IF NOT EXISTS components(
                tenant TEXT NOT NULL, name TEXT NOT NULL, digest TEXT NOT NULL,
                size INTEGER NOT NULL, created_ms INTEGER NOT NULL, created_by TEXT NOT NULL,
                PRIMARY KEY (tenant, name));
             CREATE TABLE IF NOT EXISTS policies(
                tenant TEXT NOT NULL, component TEXT NOT NULL, version INTEGER NOT NULL,
                text TEXT NOT NULL, sha256 TEXT NOT NULL, created_ms INTEGER NOT NULL,
                created_by TEXT NOT NULL,
                PRIMARY KEY (tenant, component, version));",
        )?;
        // Signatures came later: a database made before has the columns
        // added (NULL: unsigned).
        for table in ["components", "policies"] {
            let has: bool = db.query_row(
                &format!(
                    "SELECT COUNT(*) > 0 FROM pragma_table_info('{table}') WHERE name = 'signed_by'"
                ),
                [],
                |r| r.get(0),
            )?;
            if !has {
                db.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN signed_by TEXT"))?;
            }
        }
        audit::init(&db)?;
        Ok(Self { db: Mutex::new(db) })
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written
        // (transactions roll back on drop), so a poisoned lock is still usable.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn insert_policy(tx: &rusqlite::Transaction<'_>, p: &PolicyInsert<'_>) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO policies(tenant, component, version, text, sha256, created_ms, created_by, signed_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            p.tenant,
            p.component,
            p.version,
            p.text,
            p.sha256,
            p.created_ms,
            p.actor,
            p.signed_by
        ],
    )
    .map_err(|e| conflict(e, p.component))?;
    Ok(())
}

impl Metadata for Sqlite {
    fn digest_of(&self, tenant: &str, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .db()
            .query_row(
                "SELECT digest FROM components WHERE tenant = ?1 AND name = ?2",
                params![tenant, name],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn insert_component(
        &self,
        c: &NewComponent<'_>,
        policy: Option<&PolicyInsert<'_>>,
        record: &NewRecord<'_>,
    ) -> Result<i64, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "INSERT INTO components(tenant, name, digest, size, created_ms, created_by, signed_by)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                c.tenant,
                c.name,
                c.digest,
                c.size,
                c.created_ms,
                c.actor,
                c.signed_by
            ],
        )
        .map_err(|e| conflict(e, c.name))?;
        if let Some(p) = policy {
            insert_policy(&tx, p)?;
        }
        let seq = audit::append(&tx, record)?;
        tx.commit()?;
        Ok(seq)
    }

    fn list(&self, tenant: &str, name: Option<&str>) -> Result<Vec<ComponentRow>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT c.name, c.digest, c.size, c.created_ms, c.created_by,
                    (SELECT COALESCE(MAX(version), 0) FROM policies p
                      WHERE p.tenant = c.tenant AND p.component = c.name),
                    c.signed_by
             FROM components c WHERE c.tenant = ?1 AND (?2 IS NULL OR c.name = ?2)
             ORDER BY c.name",
        )?;
        let rows = stmt.query_map(params![tenant, name], |r| {
            let signed_by: Option<String> = r.get(6)?;
            Ok(ComponentRow {
                name: r.get(0)?,
                digest: r.get(1)?,
                size: r.get(2)?,
                created_ms: r.get(3)?,
                created_by: r.get(4)?,
                policy_version: r.get(5)?,
                signature: signature_state(signed_by.as_deref()).to_string(),
                signed_by,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn delete(
        &self,
        tenant: &str,
        name: &str,
        digest: &str,
        record: &NewRecord<'_>,
    ) -> Result<(i64, bool), StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let gone = tx.execute(
            "DELETE FROM components WHERE tenant = ?1 AND name = ?2 AND digest = ?3",
            params![tenant, name, digest],
        )?;
        if gone == 0 {
            return Err(StoreError::NoComponent(name.to_string()));
        }
        tx.execute(
            "DELETE FROM policies WHERE tenant = ?1 AND component = ?2",
            params![tenant, name],
        )?;
        let seq = audit::append(&tx, record)?;
        let still_used: i64 = tx.query_row(
            "SELECT COUNT(*) FROM components WHERE digest = ?1",
            [digest],
            |r| r.get(0),
        )?;
        tx.commit()?;
        Ok((seq, still_used > 0))
    }

    fn insert_policy(
        &self,
        p: &PolicyInsert<'_>,
        record: &NewRecord<'_>,
    ) -> Result<i64, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        insert_policy(&tx, p)?;
        let seq = audit::append(&tx, record)?;
        tx.commit()?;
        Ok(seq)
    }

    fn policy(
        &self,
        tenant: &str,
        component: &str,
        version: Option<i64>,
    ) -> Result<Option<PolicyRow>, StoreError> {
        Ok(self
            .db()
            .query_row(
                "SELECT version, text, sha256, created_ms, created_by, signed_by FROM policies
                 WHERE tenant = ?1 AND component = ?2 AND (?3 IS NULL OR version = ?3)
                 ORDER BY version DESC LIMIT 1",
                params![tenant, component, version],
                |r| {
                    Ok(PolicyRow {
                        version: r.get(0)?,
                        text: r.get(1)?,
                        sha256: r.get(2)?,
                        created_ms: r.get(3)?,
                        created_by: r.get(4)?,
                        signed_by: r.get(5)?,
                    })
                },
            )
            .optional()?)
    }

    fn policy_versions(&self, tenant: &str, component: &str) -> Result<Vec<PolicyRow>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT version, sha256, created_ms, created_by, signed_by FROM policies
             WHERE tenant = ?1 AND component = ?2 ORDER BY version",
        )?;
        let rows = stmt.query_map(params![tenant, component], |r| {
            Ok(PolicyRow {
                version: r.get(0)?,
                text: String::new(),
                sha256: r.get(1)?,
                created_ms: r.get(2)?,
                created_by: r.get(3)?,
                signed_by: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn audit_append(&self, r: &NewRecord<'_>) -> Result<i64, StoreError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        let seq = audit::append(&tx, r)?;
        tx.commit()?;
        Ok(seq)
    }

    fn audit_query(
        &self,
        tenant: &str,
        f: &audit::Filter,
    ) -> Result<Vec<audit::Record>, StoreError> {
        Ok(audit::query(&self.db(), tenant, f)?)
    }

    fn audit_verify(&self, anchor: Option<(i64, &str)>) -> Result<audit::Verification, StoreError> {
        Ok(audit::verify(&self.db(), anchor)?)
    }

    fn live_digests(&self) -> Result<HashSet<String>, StoreError> {
        let db = self.db();
        let mut stmt = db.prepare("SELECT DISTINCT digest FROM components")?;
        Ok(stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?)
    }
}
