//! Who is calling the REST API, and whether the request may come in at all.
//!
//! Every route sits behind [`gate`], an axum middleware that, in order:
//! 1. refuses a request whose `Host` is not a loopback name when the API
//!    listens on loopback (DNS rebinding: a web page's own host name resolving
//!    to 127.0.0.1), or whose `Origin` is not the API's own (a web page in the
//!    user's browser);
//! 2. refuses a `POST` whose `Content-Type` is not the route's
//!    (`application/json`, or `application/octet-stream` for blobs): a browser
//!    sends neither across sites without asking first, and we never answer;
//! 3. refuses a client that failed to authenticate too often lately (429);
//! 4. authenticates the bearer token against the replicated token table (see
//!    [`tokens`]) and hands the handler a [`Caller`], or answers 401.
//!
//! What a caller may do is the state's to say (`ClusterState::may_read` and
//! friends), and applying an entry checks it again on every replica.

pub mod tokens;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use actix::Addr;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::node_actor::{self, NodeActor};

/// Failed authentications one client address may make per window.
pub const AUTH_FAILURES_MAX: u32 = 20;
/// The window those failures are counted over, in milliseconds.
pub const AUTH_FAILURE_WINDOW_MS: u64 = 60_000;
/// Client addresses whose failures are remembered (the oldest window is
/// forgotten first).
const FAILING_CLIENTS_MAX: usize = 10_000;
/// Verified token fingerprints remembered.
const VERIFIED_TOKENS_MAX: usize = 10_000;

/// The authenticated user of a request.
#[derive(Clone, PartialEq, Eq)]
pub struct Caller {
    /// Their name.
    pub user: String,
    /// Whether they administer the cluster.
    pub cluster_admin: bool,
    /// The bearer token they sent (passed on when this node asks its peers
    /// for their share of an answer, so that the peer checks the same rights).
    pub token: String,
}

/// What the gate keeps between requests.
#[derive(Clone)]
pub struct Gate {
    node: Addr<NodeActor>,
    /// Whether the API listens on loopback only (then `Host` must name it).
    loopback: bool,
    /// Token id to the fingerprint of the secret verified for it.
    verified: Arc<Mutex<BTreeMap<String, blake3::Hash>>>,
    /// Client address to (window start, failures in it).
    failures: Arc<Mutex<BTreeMap<IpAddr, (u64, u32)>>>,
}

impl Gate {
    /// A gate in front of `node`'s API, listening on `listen`.
    pub fn new(node: Addr<NodeActor>, listen: SocketAddr) -> Gate {
        Gate {
            node,
            loopback: listen.ip().is_loopback(),
            verified: Arc::default(),
            failures: Arc::default(),
        }
    }
}

fn refuse(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let mut r = (
        status,
        Json(json!({"code": code, "message": message.into()})),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    r
}

/// The host name of a `Host` header value (`name:port`, `[v6]:port`).
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn is_loopback_name(name: &str) -> bool {
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Step 1 and 2 of the module comment.
/// Why a request may not come in: its status, code and message.
type Refusal = (StatusCode, &'static str, String);

fn check_origin(gate: &Gate, req: &Request) -> Result<(), Refusal> {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if gate.loopback && !is_loopback_name(host_name(host)) {
        return Err((
            StatusCode::FORBIDDEN,
            "bad_host",
            format!("Host {host:?} is not this node's loopback address"),
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let own = [format!("http://{host}"), format!("https://{host}")];
        if !own.iter().any(|o| o == origin) {
            return Err((
                StatusCode::FORBIDDEN,
                "bad_origin",
                format!("requests from {origin:?} are not accepted"),
            ));
        }
    }
    if req.method() == Method::POST {
        let want = if req.uri().path() == "/api/v1/blobs" {
            "application/octet-stream"
        } else {
            "application/json"
        };
        let got = headers
            .get(header::CONTENT_TYPE)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        let media = got.split(';').next().unwrap_or("").trim();
        if !media.eq_ignore_ascii_case(want) {
            return Err((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "bad_content_type",
                format!("this route takes Content-Type: {want}, not {got:?}"),
            ));
        }
    }
    Ok(())
}

impl Gate {
    fn throttled(&self, ip: IpAddr, now: u64) -> bool {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.get(&ip).is_some_and(|(start, n)| {
            now < start + AUTH_FAILURE_WINDOW_MS && *n >= AUTH_FAILURES_MAX
        })
    }

    fn failed(&self, ip: IpAddr, now: u64) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let entry = failures.entry(ip).or_insert((now, 0));
        if now >= entry.0 + AUTH_FAILURE_WINDOW_MS {
            *entry = (now, 0);
        }
        entry.1 += 1;
        if failures.len() > FAILING_CLIENTS_MAX {
            failures.retain(|_, (start, _)| now < *start + AUTH_FAILURE_WINDOW_MS);
        }
    }

    /// The caller a bearer token stands for, if it is live.
    async fn authenticate(&self, token: &str) -> Option<Caller> {
        let parsed = tokens::parse(token)?;
        let owner = self
            .node
            .send(node_actor::TokenOwner(parsed.id.to_string()))
            .await
            .ok()??;
        let fingerprint = tokens::fingerprint(parsed.secret);
        let known = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(parsed.id)
            .copied();
        // `blake3::Hash` compares in constant time.
        let ok = if known == Some(fingerprint) {
            true
        } else {
            let (secret, hash) = (parsed.secret.to_string(), owner.hash.clone());
            let ok = tokio::task::spawn_blocking(move || tokens::verify_slow(&secret, &hash))
                .await
                .unwrap_or(false);
            if ok {
                let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
                if verified.len() >= VERIFIED_TOKENS_MAX {
                    verified.clear();
                }
                verified.insert(parsed.id.to_string(), fingerprint);
            }
            ok
        };
        ok.then(|| Caller {
            user: owner.user,
            cluster_admin: owner.cluster_admin,
            token: token.to_string(),
        })
    }
}

/// The middleware in front of every route (see the module comment).
pub async fn gate(
    State(gate): State<Gate>,
    ConnectInfo(crate::tls::ClientAddr(peer)): ConnectInfo<crate::tls::ClientAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    if let Err((status, code, message)) = check_origin(&gate, &req) {
        return refuse(status, code, message);
    }
    let now = crate::wall_ms();
    if gate.throttled(peer.ip(), now) {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            "too many failed authentications from this address; wait a minute",
        );
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_string);
    let Some(token) = token else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "no token: run `resolute login` or set RESOLUTE_TOKEN",
        );
    };
    match gate.authenticate(&token).await {
        Some(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        None => {
            gate.failed(peer.ip(), now);
            refuse(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "the token is unknown, revoked or expired, or its user is deactivated",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_read_from_host_headers() {
        for (h, name, loopback) in [
            ("127.0.0.1:8080", "127.0.0.1", true),
            ("localhost:1", "localhost", true),
            ("[::1]:8080", "::1", true),
            ("evil.example:8080", "evil.example", false),
            ("127.0.0.1.evil.example", "127.0.0.1.evil.example", false),
            ("", "", false),
        ] {
            assert_eq!(host_name(h), name);
            assert_eq!(is_loopback_name(host_name(h)), loopback, "{h}");
        }
    }
}
