//! The audit log: append-only, hash-chained records in the service database.
//!
//! Each record carries the hash of the one before it; its own hash covers its
//! sequence number, every field and that previous hash, so editing, deleting
//! or reordering any record breaks the chain from that point on, and
//! [`verify`] names the first broken record. Removing records from the *end*
//! leaves a shorter valid chain: anchor the head (`seq`, `hash`) somewhere
//! else (a ticket, a log shipper) and pass it to `verify` to catch that too.
//!
//! Records are written in the same SQLite transaction as the change they
//! describe (upload, policy version, deletion), so there is never a change
//! without its record or a record without its change.

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Hash of the (virtual) record before the first one.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Audit-log errors.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The database failed.
    #[error("The audit log could not be read or written: {0}.")]
    Db(#[from] rusqlite::Error),
    /// A record body is not JSON (the database was edited by hand).
    #[error("Audit record {seq} has a body that is not JSON: {message}.")]
    Body {
        /// The record.
        seq: i64,
        /// The parser's message.
        message: String,
    },
}

/// What a record is about, before it is chained.
#[derive(Debug, Clone)]
pub struct NewRecord<'a> {
    /// Tenant.
    pub tenant: &'a str,
    /// Token name that acted.
    pub actor: &'a str,
    /// `invoke`, `component.upload`, `component.delete`, `policy.put`.
    pub kind: &'a str,
    /// Component name.
    pub component: &'a str,
    /// Tool name (empty when not a call).
    pub tool: &'a str,
    /// `allow`, `deny` or `error` for calls; `allow` for changes.
    pub decision: &'a str,
    /// Details: capability decisions and metering, or old/new hashes.
    pub body: serde_json::Value,
}

/// One stored record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// Milliseconds since the Unix epoch.
    pub ts_ms: i64,
    /// Tenant.
    pub tenant: String,
    /// Token name that acted.
    pub actor: String,
    /// Record kind.
    pub kind: String,
    /// Component name.
    pub component: String,
    /// Tool name.
    pub tool: String,
    /// Decision.
    pub decision: String,
    /// Details.
    pub body: serde_json::Value,
    /// Hash of the previous record.
    pub prev: String,
    /// This record's hash.
    pub hash: String,
}

/// Create the table.
///
/// # Errors
/// Database failure.
pub fn init(db: &Connection) -> Result<(), AuditError> {
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS audit(
            seq INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, tenant TEXT NOT NULL,
            actor TEXT NOT NULL, kind TEXT NOT NULL, component TEXT NOT NULL,
            tool TEXT NOT NULL, decision TEXT NOT NULL, body TEXT NOT NULL,
            prev TEXT NOT NULL, hash TEXT NOT NULL);
         CREATE INDEX IF NOT EXISTS audit_tenant ON audit(tenant, component, tool);",
    )?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn chain_hash(seq: i64, ts_ms: i64, fields: [&str; 6], body_text: &str, prev: &str) -> String {
    let mut h = Sha256::new();
    // Each text field JSON-quoted: no separator can be forged from inside a field.
    h.update(format!("airlock-audit/1\n{seq}\n{ts_ms}\n").as_bytes());
    for f in fields {
        h.update(serde_json::Value::from(f).to_string().as_bytes());
        h.update(b"\n");
    }
    h.update(serde_json::Value::from(body_text).to_string().as_bytes());
    h.update(b"\n");
    h.update(prev.as_bytes());
    hex::encode(h.finalize())
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A record chained onto the head before it, ready to be stored.
#[derive(Debug, Clone)]
pub(crate) struct Chained {
    pub seq: i64,
    pub ts_ms: i64,
    /// The body as stored (JSON text).
    pub body: String,
    pub prev: String,
    pub hash: String,
}

/// Chain `r` onto `head` (the last record's sequence number and hash;
/// `None` for an empty log). Every store appends through this, holding
/// its log's head locked until the record is stored.
pub(crate) fn chain(head: Option<(i64, String)>, r: &NewRecord<'_>) -> Chained {
    let (seq, prev) = match head {
        Some((s, h)) => (s + 1, h),
        None => (1, GENESIS.to_string()),
    };
    let ts_ms = now_ms();
    let body = r.body.to_string();
    let fields = [r.tenant, r.actor, r.kind, r.component, r.tool, r.decision];
    let hash = chain_hash(seq, ts_ms, fields, &body, &prev);
    Chained {
        seq,
        ts_ms,
        body,
        prev,
        hash,
    }
}

/// Append a record inside `tx`; returns its sequence number.
///
/// # Errors
/// Database failure.
pub fn append(tx: &Transaction<'_>, r: &NewRecord<'_>) -> Result<i64, AuditError> {
    let head: Option<(i64, String)> = tx
        .query_row(
            "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    let c = chain(head, r);
    tx.execute(
        "INSERT INTO audit(seq, ts_ms, tenant, actor, kind, component, tool, decision, body, prev, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![c.seq, c.ts_ms, r.tenant, r.actor, r.kind, r.component, r.tool, r.decision, c.body, c.prev, c.hash],
    )?;
    Ok(c.seq)
}

/// Filter for [`query`]; `None` fields match everything.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Component name.
    pub component: Option<String>,
    /// Tool name.
    pub tool: Option<String>,
    /// The token name that acted.
    pub actor: Option<String>,
    /// Record kind.
    pub kind: Option<String>,
    /// `allow`, `deny` or `error`.
    pub decision: Option<String>,
    /// From this time (ms since epoch, inclusive).
    pub since_ms: Option<i64>,
    /// Until this time (ms since epoch, exclusive).
    pub until_ms: Option<i64>,
    /// Only records after this sequence number (paging).
    pub after_seq: Option<i64>,
    /// At most this many (default 100, max 1000).
    pub limit: Option<u32>,
}

impl Filter {
    /// How many records one query returns: `limit`, 100 by default, at
    /// most 1,000.
    pub fn page_size(&self) -> u32 {
        self.limit.unwrap_or(100).min(1000)
    }
}

fn row_to_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Record, String)> {
    let body: String = row.get(8)?;
    Ok((
        Record {
            seq: row.get(0)?,
            ts_ms: row.get(1)?,
            tenant: row.get(2)?,
            actor: row.get(3)?,
            kind: row.get(4)?,
            component: row.get(5)?,
            tool: row.get(6)?,
            decision: row.get(7)?,
            body: serde_json::Value::Null,
            prev: row.get(9)?,
            hash: row.get(10)?,
        },
        body,
    ))
}

const COLUMNS: &str =
    "seq, ts_ms, tenant, actor, kind, component, tool, decision, body, prev, hash";

/// One tenant's records matching `f`, oldest first.
///
/// # Errors
/// Database failure or a hand-edited body.
pub fn query(db: &Connection, tenant: &str, f: &Filter) -> Result<Vec<Record>, AuditError> {
    let limit = f.page_size();
    let mut stmt = db.prepare(&format!(
        "SELECT {COLUMNS} FROM audit WHERE tenant = ?1
           AND (?2 IS NULL OR component = ?2) AND (?3 IS NULL OR tool = ?3)
           AND (?4 IS NULL OR kind = ?4) AND (?5 IS NULL OR decision = ?5)
           AND (?6 IS NULL OR ts_ms >= ?6) AND (?7 IS NULL OR ts_ms < ?7)
           AND (?8 IS NULL OR seq > ?8) AND (?10 IS NULL OR actor = ?10)
         ORDER BY seq LIMIT ?9"
    ))?;
    let rows = stmt.query_map(
        params![
            tenant,
            f.component,
            f.tool,
            f.kind,
            f.decision,
            f.since_ms,
            f.until_ms,
            f.after_seq,
            limit,
            f.actor
        ],
        row_to_record,
    )?;
    rows.map(|r| {
        let (rec, body) = r?;
        with_body(rec, &body)
    })
    .collect()
}

/// `rec` with its stored `body` text parsed.
///
/// # Errors
/// [`AuditError::Body`] when the text is not JSON (edited by hand).
pub(crate) fn with_body(mut rec: Record, body: &str) -> Result<Record, AuditError> {
    rec.body = serde_json::from_str(body).map_err(|e| AuditError::Body {
        seq: rec.seq,
        message: e.to_string(),
    })?;
    Ok(rec)
}

/// What [`verify`] found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Verification {
    /// True when every record checks out (and the anchor, if given, matches).
    pub ok: bool,
    /// Records checked.
    pub records: i64,
    /// Last record's sequence number (0 when empty).
    pub head_seq: i64,
    /// Last record's hash ([`GENESIS`] when empty).
    pub head_hash: String,
    /// The first problem, naming the record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// Checks a log's records, fed oldest first, against their chain; every
/// store's `verify` walks its records through one.
pub(crate) struct Verifier<'a> {
    anchor: Option<(i64, &'a str)>,
    anchor_seen: bool,
    expected_seq: i64,
    prev: String,
    problem: Option<String>,
}

impl<'a> Verifier<'a> {
    /// A walk from the start of the log; with `anchor = Some((seq, hash))`,
    /// record `seq` must exist and have that hash.
    pub(crate) fn new(anchor: Option<(i64, &'a str)>) -> Self {
        Self {
            anchor,
            anchor_seen: false,
            expected_seq: 1,
            prev: GENESIS.to_string(),
            problem: None,
        }
    }

    /// Check the next record (its `body` as stored); false once a problem
    /// is found (the walk can stop).
    pub(crate) fn next(&mut self, r: &Record, body: &str) -> bool {
        let fields = [
            r.tenant.as_str(),
            &r.actor,
            &r.kind,
            &r.component,
            &r.tool,
            &r.decision,
        ];
        let bad = if r.seq != self.expected_seq {
            Some(format!(
                "record {} is missing (next is {}): records were deleted or renumbered",
                self.expected_seq, r.seq
            ))
        } else if r.prev != self.prev {
            Some(format!(
                "record {} does not follow record {}: its previous-hash differs (records deleted, reordered or edited)",
                r.seq,
                r.seq - 1
            ))
        } else if chain_hash(r.seq, r.ts_ms, fields, body, &r.prev) != r.hash {
            Some(format!(
                "record {} was edited: its contents do not match its hash",
                r.seq
            ))
        } else {
            None
        };
        if bad.is_some() {
            self.problem = bad;
            return false;
        }
        if let Some((s, h)) = self.anchor
            && s == r.seq
        {
            self.anchor_seen = true;
            if h != r.hash {
                self.problem = Some(format!(
                    "record {s} has hash {} but the anchor says {h}",
                    r.hash
                ));
                return false;
            }
        }
        self.prev.clone_from(&r.hash);
        self.expected_seq += 1;
        true
    }

    /// What the walk found.
    pub(crate) fn finish(mut self) -> Verification {
        if self.problem.is_none()
            && let Some((s, _)) = self.anchor
            && !self.anchor_seen
        {
            self.problem = Some(format!(
                "the anchor names record {s}, but the log ends at record {}: records were removed from the end",
                self.expected_seq - 1
            ));
        }
        Verification {
            ok: self.problem.is_none(),
            records: self.expected_seq - 1,
            head_seq: self.expected_seq - 1,
            head_hash: self.prev,
            problem: self.problem,
        }
    }
}

/// Walk the whole chain. With `anchor = Some((seq, hash))`, also require that
/// record `seq` exists and has that hash (catches truncation and rewrites of
/// the history before the anchor).
///
/// # Errors
/// Database failure (a broken chain is `Ok` with `ok: false`).
pub fn verify(db: &Connection, anchor: Option<(i64, &str)>) -> Result<Verification, AuditError> {
    let mut stmt = db.prepare(&format!("SELECT {COLUMNS} FROM audit ORDER BY seq"))?;
    let mut rows = stmt.query([])?;
    let mut v = Verifier::new(anchor);
    while let Some(row) = rows.next()? {
        let (r, body) = row_to_record(row)?;
        if !v.next(&r, &body) {
            break;
        }
    }
    Ok(v.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db_with(n: usize) -> Connection {
        let mut db = Connection::open_in_memory().unwrap();
        init(&db).unwrap();
        for i in 0..n {
            let tx = db.transaction().unwrap();
            append(
                &tx,
                &NewRecord {
                    tenant: "acme",
                    actor: "t",
                    kind: "invoke",
                    component: "kitchen",
                    tool: "echo",
                    decision: if i % 2 == 0 { "allow" } else { "deny" },
                    body: serde_json::json!({"i": i}),
                },
            )
            .unwrap();
            tx.commit().unwrap();
        }
        db
    }

    #[test]
    fn intact_chain_verifies_and_anchor_matches() {
        let db = db_with(5);
        let v = verify(&db, None).unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!(v.records, 5);
        let v2 = verify(&db, Some((5, &v.head_hash))).unwrap();
        assert!(v2.ok);
        let empty = db_with(0);
        assert_eq!(verify(&empty, None).unwrap().head_hash, GENESIS);
    }

    #[test]
    fn edit_delete_reorder_and_truncation_are_detected() {
        let db = db_with(5);
        db.execute("UPDATE audit SET decision='allow' WHERE seq=2", [])
            .unwrap();
        let v = verify(&db, None).unwrap();
        assert!(!v.ok);
        assert!(v.problem.unwrap().contains("record 2 was edited"));

        let db = db_with(5);
        db.execute("DELETE FROM audit WHERE seq=3", []).unwrap();
        let p = verify(&db, None).unwrap().problem.unwrap();
        assert!(p.contains("record 3 is missing"), "{p}");

        // Reorder: swap the contents of records 2 and 3 (keeping seq numbers).
        let db = db_with(5);
        db.execute_batch(
            "UPDATE audit SET seq = 100 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 3;
             UPDATE audit SET seq = 3 WHERE seq = 100;",
        )
        .unwrap();
        let p = verify(&db, None).unwrap().problem.unwrap();
        assert!(p.contains("record 2"), "{p}");

        let db = db_with(5);
        let head = verify(&db, None).unwrap();
        db.execute("DELETE FROM audit WHERE seq=5", []).unwrap();
        assert!(
            verify(&db, None).unwrap().ok,
            "truncation alone is invisible"
        );
        let p = verify(&db, Some((5, &head.head_hash)))
            .unwrap()
            .problem
            .unwrap();
        assert!(p.contains("removed from the end"), "{p}");
    }

    #[test]
    fn query_filters_by_tenant_tool_and_decision() {
        let db = db_with(6);
        let all = query(&db, "acme", &Filter::default()).unwrap();
        assert_eq!(all.len(), 6);
        let denied = query(
            &db,
            "acme",
            &Filter {
                decision: Some("deny".into()),
                ..Filter::default()
            },
        )
        .unwrap();
        assert_eq!(denied.len(), 3);
        assert!(query(&db, "other", &Filter::default()).unwrap().is_empty());
        let page = query(
            &db,
            "acme",
            &Filter {
                after_seq: Some(4),
                limit: Some(1),
                ..Filter::default()
            },
        )
        .unwrap();
        assert_eq!(page[0].seq, 5);
        assert_eq!(page.len(), 1);
    }
}
