//! Users, roles and tokens: `/api/v1/me`, `/users`, `/tokens`. Who may make
//! each change is checked on apply (`core::state::auth`); a token's secret is
//! made here, returned once, and only its hash enters the log.

use std::collections::BTreeMap;

use super::*;
use resolute_core::command::{Role, UserCommand};

use crate::auth::tokens;

/// Longest lifetime a token may be given, in seconds (ten years).
pub const TOKEN_TTL_MAX_S: u64 = 10 * 365 * 24 * 3600;

fn malformed(e: impl std::fmt::Display) -> Res {
    error(StatusCode::BAD_REQUEST, "malformed", format!("body: {e}"))
}

async fn apply(node: &Addr<NodeActor>, caller: &Caller, command: UserCommand) -> Res {
    match propose(node, caller, Command::User(command)).await {
        Ok(_) => (StatusCode::OK, Json(json!({}))),
        Err(e) => e,
    }
}

/// `GET /me`: who the token belongs to.
pub(super) async fn me(Extension(caller): Extension<Caller>) -> Res {
    (
        StatusCode::OK,
        Json(json!({"user": caller.user, "cluster_admin": caller.cluster_admin})),
    )
}

/// `GET /users`: the users and tokens the caller may see.
pub(super) async fn users(
    State(node): State<Addr<NodeActor>>,
    Extension(caller): Extension<Caller>,
) -> Res {
    match node.send(node_actor::UsersView(caller.user)).await {
        Ok(v) => (StatusCode::OK, Json(v)),
        Err(_) => stopping(),
    }
}

fn parse_roles(roles: BTreeMap<String, String>) -> Result<BTreeMap<String, Role>, Res> {
    roles
        .into_iter()
        .map(|(w, r)| match Role::parse(&r) {
            Some(role) => Ok((w, role)),
            None => Err(malformed(format!(
                "roles.{w}: {r:?} is not a role (viewer, user, editor, admin)"
            ))),
        })
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewUser {
    name: String,
    #[serde(default)]
    cluster_admin: bool,
    /// Workspace to role name.
    #[serde(default)]
    roles: BTreeMap<String, String>,
}

/// `POST /users`: creates a user (cluster admin).
pub(super) async fn create_user(
    State(node): State<Addr<NodeActor>>,
    Extension(caller): Extension<Caller>,
    body: String,
) -> Res {
    let b: NewUser = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return e,
    };
    let roles = match parse_roles(b.roles) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let command = UserCommand::Create {
        name: b.name,
        cluster_admin: b.cluster_admin,
        roles,
    };
    apply(&node, &caller, command).await
}

/// `POST /users/{name}/deactivate` (cluster admin).
pub(super) async fn deactivate(
    State(node): State<Addr<NodeActor>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
) -> Res {
    apply(&node, &caller, UserCommand::Deactivate { name }).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct GrantBody {
    workspace: String,
    /// A role's name; `null` takes the role away.
    role: Option<String>,
}

/// `POST /users/{name}/roles`: grants a role in a workspace.
pub(super) async fn grant(
    State(node): State<Addr<NodeActor>>,
    Extension(caller): Extension<Caller>,
    UrlPath(name): UrlPath<String>,
    body: String,
) -> Res {
    let b: GrantBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return e,
    };
    let role = match b.role.as_deref().map(|r| (r, Role::parse(r))) {
        None => None,
        Some((_, Some(role))) => Some(role),
        Some((r, None)) => {
            return malformed(format!(
                "role: {r:?} is not a role (viewer, user, editor, admin)"
            ))
        }
    };
    let command = UserCommand::Grant {
        name,
        workspace: b.workspace,
        role,
    };
    apply(&node, &caller, command).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct TokenBody {
    /// Whose token (default: the caller's own).
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    label: String,
    /// Lifetime in seconds (default: no expiry).
    #[serde(default)]
    ttl_s: Option<u64>,
}

/// `POST /tokens`: a new token, shown once in the answer.
pub(super) async fn create_token(
    State(node): State<Addr<NodeActor>>,
    Extension(caller): Extension<Caller>,
    body: String,
) -> Res {
    let b: TokenBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return e,
    };
    if b.ttl_s.is_some_and(|t| t == 0 || t > TOKEN_TTL_MAX_S) {
        return malformed(format!("ttl_s: between 1 and {TOKEN_TTL_MAX_S}"));
    }
    let expires_ms = b.ttl_s.map(|t| crate::wall_ms() + t * 1000);
    let label = b.label;
    let minted = tokio::task::spawn_blocking(move || tokens::mint(&label, expires_ms)).await;
    let (text, token) = match minted {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, "token", e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "token", e.to_string()),
    };
    let id = token.id.clone();
    let user = b.user.unwrap_or_else(|| caller.user.clone());
    let command = UserCommand::CreateToken {
        user: user.clone(),
        token,
    };
    match propose(&node, &caller, Command::User(command)).await {
        Ok(_) => (
            StatusCode::OK,
            Json(json!({"id": id, "user": user, "token": text, "expires_ms": expires_ms})),
        ),
        Err(e) => e,
    }
}

/// `POST /tokens/{id}/revoke`.
pub(super) async fn revoke_token(
    State(node): State<Addr<NodeActor>>,
    Extension(caller): Extension<Caller>,
    UrlPath(id): UrlPath<String>,
) -> Res {
    apply(&node, &caller, UserCommand::RevokeToken { id }).await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct JoinTokenBody {
    /// Nodes that may join with it (default 1).
    #[serde(default)]
    uses: Option<u32>,
    #[serde(default)]
    label: String,
    /// Lifetime in seconds (default: one hour).
    #[serde(default)]
    ttl_s: Option<u64>,
}

/// Default lifetime of a join token, in seconds.
pub const JOIN_TOKEN_TTL_DEFAULT_S: u64 = 3600;

/// `POST /join-tokens`: a token a new node presents to join (cluster admin),
/// shown once in the answer.
pub(super) async fn create_join_token(
    State(node): State<Addr<NodeActor>>,
    Extension(caller): Extension<Caller>,
    body: String,
) -> Res {
    let b: JoinTokenBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return e,
    };
    let ttl_s = b.ttl_s.unwrap_or(JOIN_TOKEN_TTL_DEFAULT_S);
    if ttl_s == 0 || ttl_s > TOKEN_TTL_MAX_S {
        return malformed(format!("ttl_s: between 1 and {TOKEN_TTL_MAX_S}"));
    }
    let uses = b.uses.unwrap_or(1);
    if uses == 0 {
        return malformed("uses: at least 1");
    }
    let expires_ms = crate::wall_ms() + ttl_s * 1000;
    let (text, token) = match tokens::mint_join(&b.label, Some(expires_ms)) {
        Ok(x) => x,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "token", e.to_string()),
    };
    let id = token.id.clone();
    match propose(
        &node,
        &caller,
        Command::User(UserCommand::CreateJoinToken { token, uses }),
    )
    .await
    {
        Ok(_) => (
            StatusCode::OK,
            Json(json!({"id": id, "token": text, "uses": uses, "expires_ms": expires_ms})),
        ),
        Err(e) => e,
    }
}
