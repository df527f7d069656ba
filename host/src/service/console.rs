//! `/console`: the read-only web console for security teams — components
//! with their signature state and tools, each tool's capability report,
//! policy versions and their diffs, the audit trail with filters (denials
//! stand out), the audit chain's state, and call counts over the last hour.
//!
//! Plain server-rendered HTML (`maud`, which escapes every value it
//! renders): no script, no build step; every read view works without
//! JavaScript, with a keyboard and a screen reader (landmarks, a skip link,
//! labelled form fields, tables with headers, the chart repeated as a
//! table).
//!
//! **Invariants:**
//! * Only auditors and admins see it; an invoker's token gets 403. A person
//!   logs in with a token (`POST /console/login`) and gets a session
//!   cookie (`HttpOnly`, `SameSite=Strict`, path `/console`); requests with
//!   `Authorization: Bearer` are accepted too. Sessions are kept as the
//!   sha256 of their id, expire after [`SESSION_LIFE`], and at most
//!   [`MAX_SESSIONS`] exist (the oldest goes first).
//! * The only state-changing requests, login and logout, are refused when
//!   the browser says they come from anywhere but this origin
//!   (`Sec-Fetch-Site` other than `same-origin`, or an `Origin` that is not
//!   this host): no login CSRF, not even from another port of this host.
//! * Every page is sent with a content security policy that allows no
//!   script at all, `frame-ancestors 'none'`, `no-store` and `nosniff`: an
//!   uploaded name or description that slipped past escaping still could
//!   not run.

use super::api::AppState;
use super::{Action, Principal, ServiceError, audit::Filter};
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A console session lasts this long.
pub const SESSION_LIFE: Duration = Duration::from_secs(8 * 60 * 60);
/// Most console sessions at once.
pub const MAX_SESSIONS: usize = 4096;
/// Most audit records the overview reads for its chart (the API's cap).
const RECENT: u32 = 1000;
/// The session cookie.
const COOKIE: &str = "airlock_console";
/// The stylesheet (served at `/console/style.css`; no inline styles, so the
/// content security policy allows no `unsafe-inline`).
const STYLE: &str = include_str!("console.css");
/// Sent with every console response.
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Console sessions: sha256 of the id → who and until when.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], (Principal, Instant)>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (Principal, Instant)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session for `who`; its id (for the cookie).
    fn open(&self, who: Principal) -> Result<String, ServiceError> {
        let mut id = [0u8; 32];
        getrandom::fill(&mut id).map_err(|e| ServiceError::Internal(e.to_string()))?;
        let id = hex::encode(id);
        let mut map = self.lock();
        let now = Instant::now();
        map.retain(|_, (_, until)| *until > now);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(key(&id), (who, now + SESSION_LIFE));
        Ok(id)
    }

    fn get(&self, id: &str) -> Option<Principal> {
        let map = self.lock();
        map.get(&key(id))
            .filter(|(_, until)| *until > Instant::now())
            .map(|(p, _)| p.clone())
    }

    fn close(&self, id: &str) {
        self.lock().remove(&key(id));
    }
}

fn key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// The console's routes.
pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/console", get(overview))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/style.css", get(style))
        .route("/console/audit", get(audit))
        .route("/console/components/{name}", get(component))
        .route("/console/components/{name}/diff", get(diff))
}

/// Security headers on every console response.
fn secure(mut r: Response) -> Response {
    let h = r.headers_mut();
    for (k, v) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        // Not `no-referrer`: a browser then sends `Origin: null` on the
        // login form, which the cross-site check must refuse.
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    r
}

/// The session cookie's value, if any.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// Who is asking: a bearer token, else the session. `Err` is the response
/// to send instead (the login page, or 403 for a role the console is not
/// for).
fn viewer(s: &AppState, headers: &HeaderMap) -> Result<Principal, Box<Response>> {
    let who = if headers.contains_key(header::AUTHORIZATION) {
        super::api::principal(s, headers).map_err(|e| Box::new(error_page(None, &e)))?
    } else {
        match cookie(headers).and_then(|id| s.console.get(id)) {
            Some(p) => p,
            None => {
                return Err(Box::new(secure(
                    Redirect::to("/console/login").into_response(),
                )));
            }
        }
    };
    who.require(Action::Audit)
        .map_err(|e| Box::new(error_page(Some(&who), &e)))?;
    Ok(who)
}

/// Whether a state-changing request comes from this site (see the module
/// invariants): a browser's `Sec-Fetch-Site` must say `same-origin` (or
/// `none`, typed by the user); without it, an `Origin` must name this host
/// (`null` does not). A request with neither is not a browser's.
fn same_site(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return matches!(site.as_bytes(), b"same-origin" | b"none");
    }
    match (headers.get(header::ORIGIN), headers.get(header::HOST)) {
        (None, _) => true,
        (Some(o), Some(h)) => {
            let (o, h) = (o.to_str().unwrap_or(""), h.to_str().unwrap_or("-"));
            o.strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"))
                .is_some_and(|rest| rest == h)
        }
        (Some(_), None) => false,
    }
}

/// The answer to a login or logout from another site.
fn cross_site() -> Response {
    secure(
        (
            StatusCode::FORBIDDEN,
            page(
                "Refused",
                None,
                html! {
                    p role="alert" { "This request came from another site. Log in from the console's own page." }
                    p { a href="/console/login" { "Log in" } }
                },
            ),
        )
            .into_response(),
    )
}

fn page(title: &str, who: Option<&Principal>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " — Airlock console" }
                link rel="stylesheet" href="/console/style.css";
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    nav aria-label="Console" {
                        ul {
                            li { a href="/console" { "Overview" } }
                            li { a href="/console/audit" { "Audit trail" } }
                            li { a href="/console/audit?decision=deny" { "Denials" } }
                        }
                    }
                    @if let Some(w) = who {
                        p.who {
                            "Signed in as " strong { (w.name) } " (" (role(w)) ", tenant " (w.tenant) ")"
                        }
                        form method="post" action="/console/logout" {
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main id="main" tabindex="-1" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

fn role(w: &Principal) -> &'static str {
    match w.role {
        super::config::Role::Admin => "admin",
        super::config::Role::Invoker => "invoker",
        super::config::Role::Auditor => "auditor",
    }
}

fn error_page(who: Option<&Principal>, e: &ServiceError) -> Response {
    let status = e.status();
    let body = page(
        status.canonical_reason().unwrap_or("Error"),
        who,
        html! {
            p role="alert" { (e.to_string()) }
            @if status == StatusCode::FORBIDDEN {
                p { "The console is for auditor and admin tokens." }
            }
            p { a href="/console/login" { "Log in with another token" } }
        },
    );
    secure((status, body).into_response())
}

fn html_ok(m: Markup) -> Response {
    secure((StatusCode::OK, m).into_response())
}

async fn style() -> Response {
    secure(([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response())
}

async fn login_page() -> Response {
    html_ok(login_form(None))
}

fn login_form(problem: Option<&str>) -> Markup {
    page(
        "Log in",
        None,
        html! {
            @if let Some(p) = problem {
                p.problem role="alert" { (p) }
            }
            form method="post" action="/console/login" {
                label for="token" { "Token (auditor or admin)" }
                input id="token" name="token" type="password" autocomplete="off" required;
                button type="submit" { "Log in" }
            }
        },
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(s): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    if !same_site(&headers) {
        return cross_site();
    }
    let Ok(Form(f)) = form else {
        return secure(
            (StatusCode::BAD_REQUEST, login_form(Some("Give a token."))).into_response(),
        );
    };
    let who = match s.authenticate(Some(f.token.trim())) {
        Ok(w) => w,
        Err(_) => {
            return secure(
                (
                    StatusCode::UNAUTHORIZED,
                    login_form(Some("That token is not valid.")),
                )
                    .into_response(),
            );
        }
    };
    if let Err(e) = who.require(Action::Audit) {
        return error_page(Some(&who), &e);
    }
    let id = match s.console.open(who) {
        Ok(id) => id,
        Err(e) => return error_page(None, &e),
    };
    let mut r = Redirect::to("/console").into_response();
    if let Ok(v) = HeaderValue::from_str(&format!(
        "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}",
        SESSION_LIFE.as_secs()
    )) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    secure(r)
}

async fn logout(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if !same_site(&headers) {
        return cross_site();
    }
    if let Some(id) = cookie(&headers) {
        s.console.close(id);
    }
    let mut r = Redirect::to("/console/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "airlock_console=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    secure(r)
}

/// Run blocking store work off the async workers; errors become pages.
async fn blocking<T: Send + 'static>(
    who: &Principal,
    f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, Box<Response>> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Box::new(error_page(Some(who), &e))),
        Err(e) => Err(Box::new(error_page(
            Some(who),
            &ServiceError::Internal(e.to_string()),
        ))),
    }
}

fn utc(ms: i64) -> String {
    // Days since the epoch to a civil date (Howard Hinnant's algorithm).
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

async fn overview(State(s): State<AppState>, headers: HeaderMap) -> Response {
    let who = match viewer(&s, &headers) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let (s2, tenant) = (s.clone(), who.tenant.clone());
    let since = now_ms() - 60 * 60 * 1000;
    let data = blocking(&who, move || {
        let components = s2.store().list(&tenant)?;
        let verify = s2.store().audit_verify(None)?;
        let recent = s2.store().audit_query(
            &tenant,
            &Filter {
                since_ms: Some(since),
                limit: Some(RECENT),
                ..Filter::default()
            },
        )?;
        Ok((components, verify, recent))
    })
    .await;
    let (components, verify, recent) = match data {
        Ok(d) => d,
        Err(r) => return *r,
    };
    // Calls per 5 minutes over the last hour, by decision.
    let mut buckets = [[0u32; 3]; 12];
    for r in recent.iter().filter(|r| r.kind == "invoke") {
        let b = ((r.ts_ms - since) / (5 * 60 * 1000)).clamp(0, 11) as usize;
        let d = match r.decision.as_str() {
            "allow" => 0,
            "deny" => 1,
            _ => 2,
        };
        buckets[b][d] += 1;
    }
    let max = buckets
        .iter()
        .map(|b| b.iter().sum::<u32>())
        .max()
        .unwrap_or(0)
        .max(1);
    let total: u32 = buckets.iter().flatten().sum();
    let truncated = recent.len() >= RECENT as usize;
    let denials: Vec<_> = recent
        .iter()
        .rev()
        .filter(|r| r.decision == "deny")
        .take(10)
        .collect();
    html_ok(page(
        &format!("Tenant {}", who.tenant),
        Some(&who),
        html! {
            section aria-labelledby="chain" {
                h2 id="chain" { "Audit chain" }
                @if verify.ok {
                    p.ok { "Intact: " (verify.records) " records checked." }
                } @else {
                    p.broken role="alert" {
                        strong { "BROKEN: " }
                        (verify.problem.clone().unwrap_or_default())
                    }
                }
                p {
                    label for="head" { "Head (record " (verify.head_seq) "), to keep as an anchor:" }
                    input id="head" type="text" readonly value=(format!("{}:{}", verify.head_seq, verify.head_hash)) size="80";
                }
            }
            section aria-labelledby="calls" {
                h2 id="calls" { "Calls in the last hour" }
                p {
                    @if truncated { "At least " } (total) " calls, as of " (utc(now_ms())) ". "
                    @if truncated { "(The chart counts the hour's first " (RECENT) " audit records.) " }
                    a href="/console" { "Refresh" }
                }
                svg role="img" aria-labelledby="chart-title" viewBox="0 0 360 110" width="360" height="110" {
                    title id="chart-title" { (total) " calls in the last hour, per 5 minutes (the table below has the numbers)" }
                    @for (i, b) in buckets.iter().enumerate() {
                        @let h = |n: u32| n * 100 / max;
                        @let (a, d, e) = (h(b[0]), h(b[1]), h(b[2]));
                        rect.allow x=(i * 30 + 2) y=(105 - a) width="26" height=(a) {}
                        rect.deny x=(i * 30 + 2) y=(105 - a - d) width="26" height=(d) {}
                        rect.error x=(i * 30 + 2) y=(105 - a - d - e) width="26" height=(e) {}
                    }
                }
                table {
                    caption { "Calls per 5 minutes (oldest first)" }
                    thead { tr { th scope="col" { "Minutes ago" } th scope="col" { "Allowed" } th scope="col" { "Denied" } th scope="col" { "Errors" } } }
                    tbody {
                        @for (i, b) in buckets.iter().enumerate() {
                            tr { th scope="row" { (60 - i * 5) "–" (55 - i * 5) } td { (b[0]) } td { (b[1]) } td { (b[2]) } }
                        }
                    }
                }
            }
            section aria-labelledby="denials" {
                h2 id="denials" { "Recent denials" }
                @if denials.is_empty() {
                    p { "None in the last hour." }
                } @else {
                    ul.denials {
                        @for r in &denials {
                            li { strong { "DENIED" } " " (utc(r.ts_ms)) " — " (r.actor) " called " code { (r.component) "__" (r.tool) } " (record " (r.seq) ")" }
                        }
                    }
                }
            }
            section aria-labelledby="components" {
                h2 id="components" { "Components" }
                table {
                    thead { tr { th scope="col" { "Name" } th scope="col" { "Digest" } th scope="col" { "Signature" } th scope="col" { "Policy" } th scope="col" { "Uploaded" } } }
                    tbody {
                        @for c in &components {
                            tr {
                                th scope="row" { a href=(format!("/console/components/{}", c.name)) { (c.name) } }
                                td { code { (short(&c.digest)) } }
                                td { (signature_cell(&c.signature, c.signed_by.as_deref())) }
                                td { @if c.policy_version == 0 { "none (nothing granted)" } @else { "version " (c.policy_version) } }
                                td { (utc(c.created_ms)) " by " (c.created_by) }
                            }
                        }
                    }
                }
            }
        },
    ))
}

fn signature_cell(state: &str, key: Option<&str>) -> Markup {
    html! {
        @match key {
            Some(k) => { span.verified { "verified" } " by " code title=(k) { (short(k.trim_start_matches("ed25519:"))) } }
            None => { span.unsigned { (state) } }
        }
    }
}

async fn component(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let who = match viewer(&s, &headers) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let (s2, tenant, n2) = (s.clone(), who.tenant.clone(), name.clone());
    let data = blocking(&who, move || {
        let (row, loaded) = s2.component_tools(&tenant, &n2)?;
        let versions = s2.store().policy_versions(&tenant, &n2)?;
        let (checked, version) = s2.policy_at(&tenant, &n2, None)?;
        let report = crate::policy::report::static_report(&loaded.tools, &checked.policy);
        Ok((row, loaded, versions, version, report))
    })
    .await;
    let (row, loaded, versions, version, report) = match data {
        Ok(d) => d,
        Err(r) => return *r,
    };
    let inspect = loaded.tools.inspect_json();
    let tools = inspect["tools"].as_array().cloned().unwrap_or_default();
    html_ok(page(
        &format!("Component {name}"),
        Some(&who),
        html! {
            dl {
                dt { "Digest (sha256)" } dd { code { (row.digest) } }
                dt { "Size" } dd { (row.size) " bytes" }
                dt { "Uploaded" } dd { (utc(row.created_ms)) " by " (row.created_by) }
                dt { "Signature" } dd { (signature_cell(&row.signature, row.signed_by.as_deref())) }
            }
            section aria-labelledby="report" {
                h2 id="report" { "Capabilities (policy version " (version) ")" }
                p { "Imports: " @for (i, c) in report.requested.iter().enumerate() { @if i > 0 { ", " } code { (format!("{c:?}")) } } }
                @if report.findings.is_empty() {
                    p { "No findings: every import is granted as needed and nothing more." }
                } @else {
                    ul.findings {
                        @for f in &report.findings {
                            li class=(format!("{:?}", f.severity).to_lowercase()) {
                                strong { (format!("{:?}", f.severity)) } " " code { (f.subject) } ": " (f.message)
                            }
                        }
                    }
                }
            }
            section aria-labelledby="tools" {
                h2 id="tools" { "Tools" }
                @for t in &tools {
                    article {
                        h3 { code { (t["name"].as_str().unwrap_or("")) } }
                        @if let Some(d) = t["description"].as_str() { p { (d) } }
                        details {
                            summary { "Parameters (JSON Schema)" }
                            pre { (serde_json::to_string_pretty(&t["parameters"]).unwrap_or_default()) }
                        }
                    }
                }
            }
            section aria-labelledby="versions" {
                h2 id="versions" { "Policy versions" }
                @if versions.is_empty() {
                    p { "No policy: the component is granted nothing." }
                } @else {
                    table {
                        thead { tr { th scope="col" { "Version" } th scope="col" { "sha256" } th scope="col" { "By" } th scope="col" { "When" } th scope="col" { "Signed by" } th scope="col" { "Diff" } } }
                        tbody {
                            @for v in &versions {
                                tr {
                                    th scope="row" { (v.version) }
                                    td { code { (short(&v.sha256)) } }
                                    td { (v.created_by) }
                                    td { (utc(v.created_ms)) }
                                    td { (signature_cell("unsigned", v.signed_by.as_deref())) }
                                    td { @if v.version > 1 { a href=(format!("/console/components/{name}/diff?from={}&to={}", v.version - 1, v.version)) { "from " (v.version - 1) } } }
                                }
                            }
                        }
                    }
                    form method="get" action=(format!("/console/components/{name}/diff")) {
                        label for="from" { "Compare version" }
                        input id="from" name="from" type="number" min="1" required;
                        label for="to" { "with version" }
                        input id="to" name="to" type="number" min="1" required;
                        button type="submit" { "Show the diff" }
                    }
                }
            }
            p { a href=(format!("/console/audit?component={name}")) { "This component's audit trail" } }
        },
    ))
}

#[derive(Deserialize)]
struct DiffQuery {
    from: i64,
    to: i64,
}

async fn diff(
    State(s): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    q: Result<Query<DiffQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let who = match viewer(&s, &headers) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let Ok(Query(q)) = q else {
        return error_page(
            Some(&who),
            &super::bad(
                "invalid_query",
                Some("from".into()),
                "give from and to, two policy versions",
            ),
        );
    };
    let (s2, tenant, n2) = (s.clone(), who.tenant.clone(), name.clone());
    let data = blocking(&who, move || {
        let a = s2.store().policy(&tenant, &n2, Some(q.from))?;
        let b = s2.store().policy(&tenant, &n2, Some(q.to))?;
        // The stored versions, each read once, checked as calls see them.
        let pa = s2.checked_stored(&tenant, &a)?;
        let pb = s2.checked_stored(&tenant, &b)?;
        let mut changes = Vec::new();
        super::api::json_diff(
            "",
            &serde_json::to_value(pa.policy).unwrap_or_default(),
            &serde_json::to_value(pb.policy).unwrap_or_default(),
            &mut changes,
        );
        Ok((a, b, changes))
    })
    .await;
    let (a, b, changes) = match data {
        Ok(d) => d,
        Err(r) => return *r,
    };
    let show = |v: &Value| serde_json::to_string(v).unwrap_or_default();
    html_ok(page(
        &format!("Policy of {name}: version {} → {}", a.version, b.version),
        Some(&who),
        html! {
            section aria-labelledby="changes" {
                h2 id="changes" { "What changed" }
                @if changes.is_empty() {
                    p { "Nothing: both versions grant the same." }
                } @else {
                    table {
                        thead { tr { th scope="col" { "Field" } th scope="col" { "Version " (a.version) } th scope="col" { "Version " (b.version) } } }
                        tbody {
                            @for c in &changes {
                                tr {
                                    th scope="row" { code { (c["field"].as_str().unwrap_or("")) } }
                                    td.from { code { (show(&c["from"])) } }
                                    td.to { code { (show(&c["to"])) } }
                                }
                            }
                        }
                    }
                }
            }
            div.side {
                section aria-labelledby="text-a" { h2 id="text-a" { "Version " (a.version) " text" } pre { (a.text) } }
                section aria-labelledby="text-b" { h2 id="text-b" { "Version " (b.version) " text" } pre { (b.text) } }
            }
            p { a href=(format!("/console/components/{name}")) { "Back to " (name) } }
        },
    ))
}

#[derive(Deserialize, Default)]
struct AuditQuery {
    component: Option<String>,
    decision: Option<String>,
    actor: Option<String>,
    /// Minutes back (empty: all time).
    within: Option<String>,
    after_seq: Option<i64>,
}

fn nonempty(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

async fn audit(
    State(s): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let who = match viewer(&s, &headers) {
        Ok(w) => w,
        Err(r) => return *r,
    };
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => {
            return error_page(
                Some(&who),
                &super::bad("invalid_query", Some("query".into()), e.body_text()),
            );
        }
    };
    let decision = nonempty(&q.decision);
    if let Some(d) = &decision
        && !matches!(d.as_str(), "allow" | "deny" | "error")
    {
        return error_page(
            Some(&who),
            &super::bad(
                "invalid_query",
                Some("decision".into()),
                "decision must be allow, deny or error",
            ),
        );
    }
    let within = match nonempty(&q.within).map(|w| w.parse::<i64>()) {
        None => None,
        Some(Ok(m)) if m > 0 => Some(m),
        Some(_) => {
            return error_page(
                Some(&who),
                &super::bad(
                    "invalid_query",
                    Some("within".into()),
                    "within is a number of minutes",
                ),
            );
        }
    };
    let filter = Filter {
        component: nonempty(&q.component),
        decision: decision.clone(),
        actor: nonempty(&q.actor),
        since_ms: within.map(|m| now_ms() - m * 60_000),
        after_seq: q.after_seq,
        limit: Some(200),
        ..Filter::default()
    };
    let (s2, tenant, f2) = (s.clone(), who.tenant.clone(), filter.clone());
    let records = match blocking(&who, move || Ok(s2.store().audit_query(&tenant, &f2)?)).await {
        Ok(r) => r,
        Err(r) => return *r,
    };
    let next = records
        .last()
        .map(|r| r.seq)
        .filter(|_| records.len() == 200);
    let selected = |v: &str| decision.as_deref() == Some(v);
    let within_sel = |m: i64| within == Some(m);
    html_ok(page(
        "Audit trail",
        Some(&who),
        html! {
            form method="get" action="/console/audit" {
                fieldset {
                    legend { "Filter" }
                    label for="f-component" { "Component" }
                    input id="f-component" name="component" type="text" value=(filter.component.clone().unwrap_or_default());
                    label for="f-decision" { "Decision" }
                    select id="f-decision" name="decision" {
                        option value="" { "any" }
                        option value="allow" selected[selected("allow")] { "allow" }
                        option value="deny" selected[selected("deny")] { "deny" }
                        option value="error" selected[selected("error")] { "error" }
                    }
                    label for="f-actor" { "Actor (token name)" }
                    input id="f-actor" name="actor" type="text" value=(filter.actor.clone().unwrap_or_default());
                    label for="f-within" { "Time" }
                    select id="f-within" name="within" {
                        option value="" { "all time" }
                        option value="60" selected[within_sel(60)] { "last hour" }
                        option value="1440" selected[within_sel(1440)] { "last day" }
                        option value="10080" selected[within_sel(10080)] { "last week" }
                    }
                    button type="submit" { "Apply" }
                }
            }
            p { (records.len()) " records" @if next.is_some() { " (more after these)" } "." }
            table.audit {
                thead { tr { th scope="col" { "#" } th scope="col" { "When" } th scope="col" { "Actor" } th scope="col" { "Kind" } th scope="col" { "Target" } th scope="col" { "Decision" } th scope="col" { "Details" } } }
                tbody {
                    @for r in &records {
                        tr class=(format!("d-{}", r.decision)) {
                            th scope="row" { (r.seq) }
                            td { (utc(r.ts_ms)) }
                            td { (r.actor) }
                            td { (r.kind) }
                            td { code { (r.component) @if !r.tool.is_empty() { "__" (r.tool) } } }
                            td { @if r.decision == "deny" { strong { "DENIED" } } @else { (r.decision) } }
                            td { details { summary { "record" } pre { (serde_json::to_string_pretty(&r.body).unwrap_or_default()) } } }
                        }
                    }
                }
            }
            @if let Some(seq) = next {
                p { a href=(format!("/console/audit?{}", next_query(&filter, &q, seq))) { "Next records" } }
            }
        },
    ))
}

/// The query string of the next page of the same filter.
fn next_query(f: &Filter, q: &AuditQuery, after: i64) -> String {
    let mut parts = vec![format!("after_seq={after}")];
    for (k, v) in [
        ("component", &f.component),
        ("decision", &f.decision),
        ("actor", &f.actor),
        ("within", &nonempty(&q.within)),
    ] {
        if let Some(v) = v {
            parts.push(format!(
                "{k}={}",
                url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()
            ));
        }
    }
    parts.join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(
            utc(1_796_169_600_000 + 3_723_000),
            "2026-12-02 01:02:03 UTC"
        );
    }

    #[test]
    fn state_changes_from_another_site_are_refused() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(
                    axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            m
        };
        assert!(same_site(&h(&[("host", "127.0.0.1:8420")])));
        assert!(same_site(&h(&[
            ("host", "127.0.0.1:8420"),
            ("origin", "http://127.0.0.1:8420")
        ])));
        assert!(!same_site(&h(&[
            ("host", "127.0.0.1:8420"),
            ("origin", "http://evil.test")
        ])));
        assert!(!same_site(&h(&[
            ("host", "127.0.0.1:8420"),
            ("origin", "http://127.0.0.1:8420.evil.test")
        ])));
        assert!(!same_site(&h(&[
            ("host", "a"),
            ("sec-fetch-site", "cross-site")
        ])));
        assert!(!same_site(&h(&[("origin", "http://a")])));
    }

    #[test]
    fn sessions_expire_are_bounded_and_close() {
        let s = Sessions::default();
        let who = Principal {
            name: "a".into(),
            tenant: "t".into(),
            role: super::super::config::Role::Auditor,
        };
        let id = s.open(who.clone()).unwrap();
        assert_eq!(s.get(&id).unwrap().name, "a");
        assert!(s.get("forged").is_none());
        s.close(&id);
        assert!(s.get(&id).is_none());
        for _ in 0..MAX_SESSIONS + 10 {
            s.open(who.clone()).unwrap();
        }
        assert!(s.lock().len() <= MAX_SESSIONS);
    }
}
