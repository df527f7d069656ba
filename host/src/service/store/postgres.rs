//! Cluster mode's metadata store: one PostgreSQL database that every node
//! shares (`[storage] kind = "postgres"`).
//!
//! **Invariants:**
//! * The audit chain stays one chain when nodes append at the same time:
//!   an append locks the chain's head row (`audit_head`, `FOR UPDATE`),
//!   chains its record onto it, stores it and moves the head, all in the
//!   transaction of the change it records; a second node's append waits on
//!   the row lock and then sees the new head.
//! * Two nodes taking one component name or one policy version meet the
//!   primary key: one commits, the other gets [`StoreError::Conflict`]
//!   (the store computes the version again, or reports the name taken).
//! * Schema changes are made by one node at a time (an advisory lock), and
//!   a node refuses a database whose schema is newer than it knows
//!   ([`StoreError::Schema`]) rather than write rows it does not understand.
//! * A node holds at most [`MAX_CONNECTIONS`] connections (more requests
//!   at once wait for one); a connection that broke (the server restarted,
//!   the network failed) is dropped and made again by a later request;
//!   nothing is retried silently inside a transaction.

use super::{ComponentRow, Metadata, NewComponent, PolicyInsert, PolicyRow, StoreError};
use crate::service::audit::{self, NewRecord};
use crate::signing::state as signature_state;
use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, GenericClient, Row, Statement, Transaction};
use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The schema version this node writes (`airlock_schema.version`).
pub const SCHEMA_VERSION: i64 = 1;

/// Held while one node creates or migrates the schema
/// (`pg_advisory_lock`): an arbitrary constant, "airlock" in ASCII.
const SCHEMA_LOCK: i64 = 0x0061_6972_6c6f_636b;

/// How long a connection attempt may take before the request fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one statement may run (or wait for a lock) on the server.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(15);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS airlock_schema(
    id INTEGER PRIMARY KEY CHECK (id = 1), version BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS components(
    tenant TEXT NOT NULL, name TEXT NOT NULL, digest TEXT NOT NULL,
    size BIGINT NOT NULL, created_ms BIGINT NOT NULL, created_by TEXT NOT NULL,
    signed_by TEXT,
    PRIMARY KEY (tenant, name));
CREATE INDEX IF NOT EXISTS components_digest ON components(digest);
CREATE TABLE IF NOT EXISTS policies(
    tenant TEXT NOT NULL, component TEXT NOT NULL, version BIGINT NOT NULL,
    text TEXT NOT NULL, sha256 TEXT NOT NULL, created_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL, signed_by TEXT,
    PRIMARY KEY (tenant, component, version));
CREATE TABLE IF NOT EXISTS audit(
    seq BIGINT PRIMARY KEY, ts_ms BIGINT NOT NULL, tenant TEXT NOT NULL,
    actor TEXT NOT NULL, kind TEXT NOT NULL, component TEXT NOT NULL,
    tool TEXT NOT NULL, decision TEXT NOT NULL, body TEXT NOT NULL,
    prev TEXT NOT NULL, hash TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_tenant ON audit(tenant, component, tool);
CREATE TABLE IF NOT EXISTS audit_head(
    id INTEGER PRIMARY KEY CHECK (id = 1), seq BIGINT NOT NULL, hash TEXT NOT NULL);
";

/// The PostgreSQL metadata store.
pub struct Postgres {
    config: postgres::Config,
    tls: MakeRustlsConnect,
    pool: Mutex<Pool>,
    /// Signalled when a connection goes back to the pool.
    returned: Condvar,
}

/// The node's connections: idle ones, and how many are open in all.
#[derive(Default)]
struct Pool {
    idle: Vec<Conn>,
    open: usize,
}

/// A connection and the statements prepared on it: each SQL text is
/// parsed once per connection, then only bound and run (one round trip
/// where a text query takes two).
struct Conn {
    client: Client,
    stmts: HashMap<&'static str, Statement>,
}

/// A connection, or a transaction on one, with the connection's prepared
/// statements: what every query of this store goes through.
struct Session<'a, C> {
    c: &'a mut C,
    stmts: &'a mut HashMap<&'static str, Statement>,
}

impl<C: GenericClient> Session<'_, C> {
    fn prepared(&mut self, sql: &'static str) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self.c.prepare(sql)?;
        self.stmts.insert(sql, s.clone());
        Ok(s)
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        let s = self.prepared(sql)?;
        self.c.query(&s, params)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        let s = self.prepared(sql)?;
        self.c.query_opt(&s, params)
    }

    fn query_one(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, postgres::Error> {
        let s = self.prepared(sql)?;
        self.c.query_one(&s, params)
    }

    fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        let s = self.prepared(sql)?;
        self.c.execute(&s, params)
    }
}

/// Connections one node holds at most; more requests at once wait for one.
pub const MAX_CONNECTIONS: usize = 16;

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: name only where it points.
        f.debug_struct("Postgres")
            .field("hosts", &self.config.get_hosts().len())
            .field("dbname", &self.config.get_dbname())
            .finish_non_exhaustive()
    }
}

/// A key another writer took first, as [`StoreError::Conflict`].
fn conflict(e: postgres::Error, what: &str) -> StoreError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        StoreError::Conflict(what.to_string())
    } else {
        StoreError::Postgres(e)
    }
}

impl Postgres {
    /// Connect to `url` (`postgres://user:password@host:port/db` or
    /// `host=... dbname=...`), then create or check the schema. TLS (the
    /// URL's `sslmode`) is verified against the Mozilla roots and the CA
    /// certificates in `ca_pem` (PEM; empty for none).
    ///
    /// # Errors
    /// A malformed URL or CA file, an unreachable server, a certificate
    /// no root vouches for, or a schema newer than this node's
    /// ([`StoreError::Schema`]).
    pub fn connect(url: &str, ca_pem: &[u8]) -> Result<Self, StoreError> {
        let tls = tls(ca_pem)?;
        let mut config: postgres::Config = url.parse()?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A server that hangs fails the request instead of holding it
        // (and the node's one connection) for good; a lock wait (the
        // chain's head) counts too. The URL's own `options` come after,
        // so they may set another.
        let options = format!(
            "-c statement_timeout={} {}",
            STATEMENT_TIMEOUT.as_millis(),
            config.get_options().unwrap_or("")
        );
        config.options(options.trim_end());
        config.application_name("airlock");
        let store = Self {
            config,
            tls,
            pool: Mutex::new(Pool::default()),
            returned: Condvar::new(),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute("SELECT pg_advisory_lock($1)", &[&SCHEMA_LOCK])?;
            let made = (|| {
                c.c.batch_execute(SCHEMA)?;
                let found: Option<i64> = c
                    .query_opt("SELECT version FROM airlock_schema WHERE id = 1", &[])?
                    .map(|r| r.get(0));
                match found {
                    Some(v) if v > SCHEMA_VERSION => Err(StoreError::Schema {
                        found: v,
                        known: SCHEMA_VERSION,
                    }),
                    Some(_) => Ok(()),
                    None => {
                        c.execute(
                            "INSERT INTO airlock_schema(id, version) VALUES (1, $1)",
                            &[&SCHEMA_VERSION],
                        )?;
                        c.execute(
                            "INSERT INTO audit_head(id, seq, hash) VALUES (1, 0, $1)
                             ON CONFLICT (id) DO NOTHING",
                            &[&audit::GENESIS],
                        )?;
                        Ok(())
                    }
                }
            })();
            c.execute("SELECT pg_advisory_unlock($1)", &[&SCHEMA_LOCK])?;
            made
        })
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` on a connection of the pool, connecting first if none is
    /// idle (up to [`MAX_CONNECTIONS`]; past that, wait for one). A
    /// connection that fails or broke is dropped, so a later request
    /// connects again.
    ///
    /// `postgres`' blocking client drives its own runtime: `f` runs off
    /// the caller's ([`super::off_runtime`]).
    fn with<T: Send>(
        &self,
        f: impl FnOnce(&mut Session<'_, Client>) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        super::off_runtime(|| self.with_here(f))
    }

    fn with_here<T>(
        &self,
        f: impl FnOnce(&mut Session<'_, Client>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.take()?;
        let r = f(&mut Session {
            c: &mut conn.client,
            stmts: &mut conn.stmts,
        });
        let mut pool = self.lock();
        if conn.client.is_closed() {
            pool.open -= 1;
        } else {
            pool.idle.push(conn);
        }
        drop(pool);
        self.returned.notify_one();
        r
    }

    /// An idle connection, else a new one, else (at the cap) the next one
    /// given back.
    fn take(&self) -> Result<Conn, StoreError> {
        let mut pool = self.lock();
        loop {
            while let Some(c) = pool.idle.pop() {
                if !c.client.is_closed() {
                    return Ok(c);
                }
                pool.open -= 1;
            }
            if pool.open < MAX_CONNECTIONS {
                pool.open += 1;
                drop(pool);
                return match self.config.connect(self.tls.clone()) {
                    Ok(client) => Ok(Conn {
                        client,
                        stmts: HashMap::new(),
                    }),
                    Err(e) => {
                        self.lock().open -= 1;
                        self.returned.notify_one();
                        Err(e.into())
                    }
                };
            }
            pool = self.returned.wait(pool).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// `f` in one transaction, committed when it succeeds.
    fn tx<T: Send>(
        &self,
        f: impl FnOnce(&mut Session<'_, Transaction<'_>>) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        self.with(|s| {
            let mut tx = s.c.transaction()?;
            let r = f(&mut Session {
                c: &mut tx,
                stmts: s.stmts,
            })?;
            tx.commit()?;
            Ok(r)
        })
    }
}

/// The TLS connector: the Mozilla roots and the CAs in `ca_pem`.
fn tls(ca_pem: &[u8]) -> Result<MakeRustlsConnect, StoreError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let bad = |reason: String| StoreError::Tls(reason);
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned());
    if !ca_pem.is_empty() {
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| bad(format!("the CA file: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("the CA file: {e}")))?;
            n += 1;
        }
        if n == 0 {
            return Err(bad("the CA file holds no CERTIFICATE block".into()));
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Append `r` to the chain inside `tx`, holding the head row locked until
/// `tx` ends (see the module invariants).
fn append(tx: &mut Session<'_, Transaction<'_>>, r: &NewRecord<'_>) -> Result<i64, StoreError> {
    let head = tx.query_one(
        "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE",
        &[],
    )?;
    let (seq, hash): (i64, String) = (head.get(0), head.get(1));
    let c = audit::chain((seq > 0).then_some((seq, hash)), r);
    // The record and the new head in one statement (one round trip).
    tx.execute(
        "WITH added AS (
            INSERT INTO audit(seq, ts_ms, tenant, actor, kind, component, tool, decision, body, prev, hash)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING seq, hash)
         UPDATE audit_head SET seq = added.seq, hash = added.hash FROM added WHERE id = 1",
        &[
            &c.seq,
            &c.ts_ms,
            &r.tenant,
            &r.actor,
            &r.kind,
            &r.component,
            &r.tool,
            &r.decision,
            &c.body,
            &c.prev,
            &c.hash,
        ],
    )?;
    Ok(c.seq)
}

fn insert_policy(
    tx: &mut Session<'_, Transaction<'_>>,
    p: &PolicyInsert<'_>,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO policies(tenant, component, version, text, sha256, created_ms, created_by, signed_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &p.tenant,
            &p.component,
            &p.version,
            &p.text,
            &p.sha256,
            &p.created_ms,
            &p.actor,
            &p.signed_by,
        ],
    )
    .map_err(|e| conflict(e, p.component))?;
    Ok(())
}

/// An audit row's columns, in [`record`]'s order (a macro, for `concat!`).
macro_rules! columns {
    () => {
        "seq, ts_ms, tenant, actor, kind, component, tool, decision, body, prev, hash"
    };
}
const COLUMNS: &str = columns!();

/// A row of [`COLUMNS`] and its body text.
fn record(row: &Row) -> (audit::Record, String) {
    (
        audit::Record {
            seq: row.get(0),
            ts_ms: row.get(1),
            tenant: row.get(2),
            actor: row.get(3),
            kind: row.get(4),
            component: row.get(5),
            tool: row.get(6),
            decision: row.get(7),
            body: serde_json::Value::Null,
            prev: row.get(9),
            hash: row.get(10),
        },
        row.get(8),
    )
}

impl Metadata for Postgres {
    fn digest_of(&self, tenant: &str, name: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            Ok(c.query_opt(
                "SELECT digest FROM components WHERE tenant = $1 AND name = $2",
                &[&tenant, &name],
            )?
            .map(|r| r.get(0)))
        })
    }

    fn insert_component(
        &self,
        row: &NewComponent<'_>,
        policy: Option<&PolicyInsert<'_>>,
        record: &NewRecord<'_>,
    ) -> Result<i64, StoreError> {
        self.tx(|tx| {
            tx.execute(
                "INSERT INTO components(tenant, name, digest, size, created_ms, created_by, signed_by)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &row.tenant,
                    &row.name,
                    &row.digest,
                    &row.size,
                    &row.created_ms,
                    &row.actor,
                    &row.signed_by,
                ],
            )
            .map_err(|e| conflict(e, row.name))?;
            if let Some(p) = policy {
                insert_policy(tx, p)?;
            }
            append(tx, record)
        })
    }

    fn list(&self, tenant: &str, name: Option<&str>) -> Result<Vec<ComponentRow>, StoreError> {
        self.with(|c| {
            let rows = c.query(
                "SELECT c.name, c.digest, c.size, c.created_ms, c.created_by,
                        (SELECT COALESCE(MAX(version), 0) FROM policies p
                          WHERE p.tenant = c.tenant AND p.component = c.name),
                        c.signed_by
                 FROM components c WHERE c.tenant = $1 AND ($2::TEXT IS NULL OR c.name = $2)
                 ORDER BY c.name",
                &[&tenant, &name],
            )?;
            Ok(rows
                .iter()
                .map(|r| {
                    let signed_by: Option<String> = r.get(6);
                    ComponentRow {
                        name: r.get(0),
                        digest: r.get(1),
                        size: r.get(2),
                        created_ms: r.get(3),
                        created_by: r.get(4),
                        policy_version: r.get(5),
                        signature: signature_state(signed_by.as_deref()).to_string(),
                        signed_by,
                    }
                })
                .collect())
        })
    }

    fn delete(
        &self,
        tenant: &str,
        name: &str,
        digest: &str,
        record: &NewRecord<'_>,
    ) -> Result<(i64, bool), StoreError> {
        self.tx(|tx| {
            let gone = tx.execute(
                "DELETE FROM components WHERE tenant = $1 AND name = $2 AND digest = $3",
                &[&tenant, &name, &digest],
            )?;
            if gone == 0 {
                return Err(StoreError::NoComponent(name.to_string()));
            }
            tx.execute(
                "DELETE FROM policies WHERE tenant = $1 AND component = $2",
                &[&tenant, &name],
            )?;
            let seq = append(tx, record)?;
            let used: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM components WHERE digest = $1)",
                    &[&digest],
                )?
                .get(0);
            Ok((seq, used))
        })
    }

    fn insert_policy(
        &self,
        p: &PolicyInsert<'_>,
        record: &NewRecord<'_>,
    ) -> Result<i64, StoreError> {
        self.tx(|tx| {
            insert_policy(tx, p)?;
            append(tx, record)
        })
    }

    fn policy(
        &self,
        tenant: &str,
        component: &str,
        version: Option<i64>,
    ) -> Result<Option<PolicyRow>, StoreError> {
        self.with(|c| {
            Ok(c.query_opt(
                "SELECT version, text, sha256, created_ms, created_by, signed_by FROM policies
                 WHERE tenant = $1 AND component = $2 AND ($3::BIGINT IS NULL OR version = $3)
                 ORDER BY version DESC LIMIT 1",
                &[&tenant, &component, &version],
            )?
            .map(|r| PolicyRow {
                version: r.get(0),
                text: r.get(1),
                sha256: r.get(2),
                created_ms: r.get(3),
                created_by: r.get(4),
                signed_by: r.get(5),
            }))
        })
    }

    fn policy_versions(&self, tenant: &str, component: &str) -> Result<Vec<PolicyRow>, StoreError> {
        self.with(|c| {
            Ok(c.query(
                "SELECT version, sha256, created_ms, created_by, signed_by FROM policies
                 WHERE tenant = $1 AND component = $2 ORDER BY version",
                &[&tenant, &component],
            )?
            .iter()
            .map(|r| PolicyRow {
                version: r.get(0),
                text: String::new(),
                sha256: r.get(1),
                created_ms: r.get(2),
                created_by: r.get(3),
                signed_by: r.get(4),
            })
            .collect())
        })
    }

    fn audit_append(&self, r: &NewRecord<'_>) -> Result<i64, StoreError> {
        self.tx(|tx| append(tx, r))
    }

    fn audit_query(
        &self,
        tenant: &str,
        f: &audit::Filter,
    ) -> Result<Vec<audit::Record>, StoreError> {
        let limit = i64::from(f.page_size());
        self.with(|c| {
            let rows = c.query(
                concat!(
                    "SELECT ",
                    columns!(),
                    " FROM audit WHERE tenant = $1
                       AND ($2::TEXT IS NULL OR component = $2) AND ($3::TEXT IS NULL OR tool = $3)
                       AND ($4::TEXT IS NULL OR kind = $4) AND ($5::TEXT IS NULL OR decision = $5)
                       AND ($6::BIGINT IS NULL OR ts_ms >= $6) AND ($7::BIGINT IS NULL OR ts_ms < $7)
                       AND ($8::BIGINT IS NULL OR seq > $8) AND ($10::TEXT IS NULL OR actor = $10)
                     ORDER BY seq LIMIT $9"
                ),
                &[
                    &tenant,
                    &f.component,
                    &f.tool,
                    &f.kind,
                    &f.decision,
                    &f.since_ms,
                    &f.until_ms,
                    &f.after_seq,
                    &limit,
                    &f.actor,
                ],
            )?;
            rows.iter()
                .map(|row| {
                    let (rec, body) = record(row);
                    Ok(audit::with_body(rec, &body)?)
                })
                .collect()
        })
    }

    fn audit_verify(&self, anchor: Option<(i64, &str)>) -> Result<audit::Verification, StoreError> {
        use postgres::fallible_iterator::FallibleIterator;
        self.with(|c| {
            // One snapshot of the whole log, read as a stream.
            let mut tx =
                c.c.build_transaction()
                    .isolation_level(postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()?;
            let mut v = audit::Verifier::new(anchor);
            {
                let mut rows = tx.query_raw(
                    &format!("SELECT {COLUMNS} FROM audit ORDER BY seq"),
                    std::iter::empty::<i64>(),
                )?;
                while let Some(row) = rows.next()? {
                    let (r, body) = record(&row);
                    if !v.next(&r, &body) {
                        break;
                    }
                }
            }
            tx.commit()?;
            Ok(v.finish())
        })
    }

    fn live_digests(&self) -> Result<HashSet<String>, StoreError> {
        self.with(|c| {
            Ok(c.query("SELECT DISTINCT digest FROM components", &[])?
                .iter()
                .map(|r| r.get(0))
                .collect())
        })
    }
}
