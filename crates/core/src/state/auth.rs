//! Who may apply what. Every entry says which node proposed it, which leader
//! appended it and on which user's authority (`Envelope`); applying it checks,
//! the same way on every replica:
//! - node-scoped commands (capacity, a node's own drain, trial reports and
//!   checkpoint copies) only from that node, or from a node the trial runs on;
//! - leader-scoped commands (leases, the clock) only from the leader;
//! - user-scoped commands (experiments, pools, users and tokens) only on the
//!   authority of an active user with the role, once the cluster has users
//!   (`UserCommand::Bootstrap`, from `resolute cluster init`). A cluster
//!   without users (the simulator, the core's unit tests) checks node and
//!   leader scope only.
//!
//! A refused entry still applies (as a `Reply::Forbidden`) and is counted in
//! `forbidden`: it changes nothing else.

use super::*;
use crate::command::{NewToken, Role, UserCommand};

/// The workspace of an experiment whose config names none (Determined's).
pub const DEFAULT_WORKSPACE: &str = "Uncategorized";

/// The workspace an experiment config names (`workspace:`), or the default.
pub fn workspace_or_default(configured: &str) -> &str {
    if configured.is_empty() {
        DEFAULT_WORKSPACE
    } else {
        configured
    }
}
/// Longest user name, in bytes.
pub const USER_NAME_BYTES_MAX: usize = 64;
/// Longest token id, in bytes.
pub const TOKEN_ID_BYTES_MAX: usize = 64;
/// Longest token hash (PHC string), in bytes.
pub const TOKEN_HASH_BYTES_MAX: usize = 256;
/// Longest token label, in bytes.
pub const TOKEN_LABEL_BYTES_MAX: usize = 256;
/// Users a cluster may have.
pub const USERS_MAX: usize = 10_000;
/// Tokens (live or revoked) one user may have.
pub const TOKENS_PER_USER_MAX: usize = 100;
/// Workspaces one user may hold roles in.
pub const ROLES_PER_USER_MAX: usize = 1_000;
/// Join tokens (live or used up) a cluster keeps.
pub const JOIN_TOKENS_MAX: usize = 1_000;
/// Approved nodes that have not joined yet, at most.
pub const APPROVED_NODES_MAX: usize = 1_000;
/// Removed nodes remembered, at most (past it the lowest id is forgotten: a
/// forgotten node still needs a join token or an approval to come back).
pub const REMOVED_NODES_MAX: usize = 100_000;
/// What every join token starts with.
pub const JOIN_TOKEN_PREFIX: &str = "rsj_";

/// A join token (its secret is never stored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinToken {
    /// BLAKE3 of the secret, hex.
    pub hash: String,
    /// When it stops working (milliseconds since the Unix epoch), if ever.
    pub expires_ms: Option<u64>,
    /// Nodes that may still join with it.
    pub uses_left: u32,
    /// What it is for.
    pub label: String,
}

/// Splits `rsj_<id>_<secret>`.
pub fn parse_join_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(JOIN_TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id) && hex(secret)).then_some((id, secret))
}

/// A user of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// Deactivated users can do nothing; their tokens stop working.
    pub active: bool,
    /// Administers the cluster: nodes, users, pools, every workspace.
    pub cluster_admin: bool,
    /// Roles by workspace.
    pub roles: BTreeMap<String, Role>,
}

/// An API token (its secret is never stored: see `NewToken`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Token {
    /// Whose it is.
    pub user: String,
    /// The argon2 hash of its secret (PHC string).
    pub hash: String,
    /// When it stops working (milliseconds since the Unix epoch), if ever.
    pub expires_ms: Option<u64>,
    /// What it is for.
    pub label: String,
    /// Revoked tokens stay listed, and never work again.
    pub revoked: bool,
}

/// What a request wants to do.
#[derive(Debug, Clone)]
pub enum Access {
    /// Read an experiment (and its trials).
    ReadExperiment(u64),
    /// Pause, activate, cancel or kill an experiment.
    ControlExperiment(u64),
    /// Read a trial (its metrics, logs).
    ReadTrial(u64),
    /// Kill a trial (whoever may control its experiment).
    ControlTrial(u64),
    /// Download a checkpoint.
    ReadCheckpoint(String),
    /// Write anything at all (upload a model directory): a user role somewhere.
    Write,
    /// Administer the cluster.
    ClusterAdmin,
}

/// Why a request may not do what it wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// What it names does not exist (or is not the caller's to know about).
    NotFound(String),
    /// The caller lacks the role.
    Forbidden(String),
}

fn forbidden(reason: impl Into<String>) -> Reply {
    Reply::Forbidden {
        reason: reason.into(),
    }
}

/// Whether `name` is a valid user name: 1 to 64 of `a-z 0-9 _ . -`, starting
/// with a letter or digit.
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= USER_NAME_BYTES_MAX
        && name.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || (i > 0 && matches!(b, b'_' | b'.' | b'-'))
        })
}

fn valid_token(t: &NewToken) -> Result<(), String> {
    if t.id.is_empty()
        || t.id.len() > TOKEN_ID_BYTES_MAX
        || !t.id.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err("a token id is 1 to 64 ASCII letters and digits".into());
    }
    if t.hash.is_empty() || t.hash.len() > TOKEN_HASH_BYTES_MAX {
        return Err("a token hash is 1 to 256 bytes".into());
    }
    if t.label.len() > TOKEN_LABEL_BYTES_MAX {
        return Err("a token label is at most 256 bytes".into());
    }
    Ok(())
}

impl ClusterState {
    /// Whether the cluster has users: from then on, user-scoped commands need
    /// a user's authority.
    pub fn secured(&self) -> bool {
        !self.users.is_empty()
    }

    /// An active user.
    pub fn active_user(&self, name: &str) -> Option<&User> {
        self.users.get(name).filter(|u| u.active)
    }

    /// Whether `user` is an active cluster administrator.
    pub fn is_cluster_admin(&self, user: Option<&str>) -> bool {
        user.and_then(|u| self.active_user(u))
            .is_some_and(|u| u.cluster_admin)
    }

    /// `user`'s role in `workspace` (a cluster admin is every workspace's admin).
    pub fn role_in(&self, user: &str, workspace: &str) -> Option<Role> {
        let u = self.active_user(user)?;
        if u.cluster_admin {
            return Some(Role::Admin);
        }
        u.roles.get(workspace).copied()
    }

    /// Whether `user` holds at least `need` in `workspace` (anyone may, in a
    /// cluster without users).
    pub fn may(&self, user: Option<&str>, workspace: &str, need: Role) -> bool {
        if !self.secured() {
            return true;
        }
        user.and_then(|u| self.role_in(u, workspace))
            .is_some_and(|r| r >= need)
    }

    /// An experiment's workspace.
    pub fn workspace_of(&self, experiment: ExperimentId) -> &str {
        self.experiments
            .get(&experiment)
            .and_then(|e| e.config())
            .map_or(DEFAULT_WORKSPACE, |c| workspace_or_default(&c.workspace))
    }

    /// The workspaces whose experiments `user` may read; None for all of them
    /// (a cluster admin, or a cluster without users).
    pub fn readable_workspaces(&self, user: Option<&str>) -> Option<BTreeSet<String>> {
        if !self.secured() {
            return None;
        }
        let Some(u) = user.and_then(|u| self.active_user(u)) else {
            return Some(BTreeSet::new());
        };
        if u.cluster_admin {
            return None;
        }
        Some(
            u.roles
                .iter()
                .filter(|(_, r)| **r >= Role::Viewer)
                .map(|(w, _)| w.clone())
                .collect(),
        )
    }

    /// Whether `user` may read `experiment` (a viewer of its workspace).
    pub fn may_read(&self, user: Option<&str>, experiment: ExperimentId) -> bool {
        self.may(user, self.workspace_of(experiment), Role::Viewer)
    }

    /// Whether `user` may pause, activate, cancel or kill `experiment`: its
    /// owner with the user role in its workspace, or an editor there.
    pub fn may_control(&self, user: Option<&str>, experiment: ExperimentId) -> bool {
        let workspace = self.workspace_of(experiment);
        if self.may(user, workspace, Role::Editor) {
            return true;
        }
        let owner = self.experiments.get(&experiment).map(|e| e.owner.as_str());
        user.is_some() && owner == user && self.may(user, workspace, Role::User)
    }

    /// A token that works now (not revoked, not expired, its user active), and
    /// its user's name.
    pub fn live_token(&self, id: &str, now_ms: u64) -> Option<&Token> {
        let t = self.tokens.get(id)?;
        let live = !t.revoked
            && t.expires_ms.is_none_or(|e| now_ms < e)
            && self.active_user(&t.user).is_some();
        live.then_some(t)
    }

    /// The id of a join token that admits one more node now (its secret
    /// matches, it has uses left and has not expired).
    pub fn live_join_token(&self, token: &str, now_ms: u64) -> Option<String> {
        let (id, secret) = parse_join_token(token)?;
        let t = self.join_tokens.get(id)?;
        // `blake3::Hash` compares in constant time.
        let expected = blake3::Hash::from_hex(&t.hash).ok()?;
        let ok = blake3::hash(secret.as_bytes()) == expected
            && t.uses_left > 0
            && t.expires_ms.is_none_or(|e| now_ms < e);
        ok.then(|| id.to_string())
    }

    /// A node joined with the join token `id`: one use less.
    pub(crate) fn use_join_token(&mut self, id: &str) {
        if let Some(t) = self.join_tokens.get_mut(id) {
            t.uses_left = t.uses_left.saturating_sub(1);
        }
    }

    /// Whether `user` may do what a request asks (`access`): nothing, or why
    /// not. The REST API asks before it reads or proposes; applying checks
    /// proposals again.
    pub fn check_access(&self, user: &str, access: &Access) -> Result<(), Denied> {
        let u = Some(user);
        let experiment = |id: u64| {
            if self.experiments.contains_key(&id) {
                Ok(id)
            } else {
                Err(Denied::NotFound(format!("no experiment {id}")))
            }
        };
        let of_trial = |id: u64| {
            self.trials
                .get(&id)
                .map(|t| t.experiment)
                .ok_or_else(|| Denied::NotFound(format!("no trial {id}")))
        };
        let (ok, what) = match access {
            Access::ReadExperiment(id) => (
                self.may_read(u, experiment(*id)?),
                format!("read experiment {id}"),
            ),
            Access::ControlExperiment(id) => (
                self.may_control(u, experiment(*id)?),
                format!("control experiment {id}"),
            ),
            Access::ReadTrial(id) => (self.may_read(u, of_trial(*id)?), format!("read trial {id}")),
            Access::ControlTrial(id) => (
                self.may_control(u, of_trial(*id)?),
                format!("control trial {id}"),
            ),
            Access::ReadCheckpoint(uuid) => {
                let trial = self
                    .checkpoints
                    .get(uuid)
                    .map(|c| c.trial)
                    .ok_or_else(|| Denied::NotFound(format!("no checkpoint {uuid}")))?;
                (
                    self.may_read(u, of_trial(trial)?),
                    format!("read checkpoint {uuid}"),
                )
            }
            Access::Write => {
                let writes = self.is_cluster_admin(u)
                    || self
                        .active_user(user)
                        .is_some_and(|x| x.roles.values().any(|r| *r >= Role::User));
                (
                    writes,
                    "write (no workspace gives this user more than viewer)".into(),
                )
            }
            Access::ClusterAdmin => (self.is_cluster_admin(u), "administer the cluster".into()),
        };
        if ok {
            Ok(())
        } else {
            Err(Denied::Forbidden(format!("{user} may not {what}")))
        }
    }

    /// Checks who proposed `envelope` against what it asks (see the module
    /// comment). User-scoped commands whose check needs what they change
    /// (an experiment's workspace, the user table) are checked where applied.
    pub(super) fn authorize(&self, envelope: &Envelope) -> Result<(), String> {
        let (p, leader) = (envelope.proposer, envelope.leader);
        let user = envelope.user.as_deref();
        let node_only = |node: NodeId, what: &str| {
            if p == node {
                Ok(())
            } else {
                Err(format!(
                    "node {p:016x} may not report {what} for node {node:016x}"
                ))
            }
        };
        match &envelope.command {
            Command::Noop => Ok(()),
            Command::Tick | Command::NodeLost { .. } | Command::NodeAlive { .. } => {
                if p == leader {
                    Ok(())
                } else {
                    Err(format!(
                        "only the leader decides leases and time, not node {p:016x}"
                    ))
                }
            }
            Command::NodeCapacity { node, .. } => node_only(*node, "capacity"),
            Command::NodeDisk { node, .. } => node_only(*node, "disk space"),
            Command::NodeDraining { node } => {
                if p == *node || !self.secured() || self.is_cluster_admin(user) {
                    Ok(())
                } else {
                    Err("only the node itself or a cluster admin drains a node".into())
                }
            }
            Command::NodeApproved { .. } | Command::NodeRemoved { .. } => {
                if !self.secured() || self.is_cluster_admin(user) {
                    Ok(())
                } else {
                    Err("only a cluster admin approves or removes a node".into())
                }
            }
            Command::SetPool { .. } => {
                if !self.secured() || self.is_cluster_admin(user) {
                    Ok(())
                } else {
                    Err("only a cluster admin sets a pool's settings".into())
                }
            }
            Command::ExperimentCreated { .. } => {
                if self.secured() && user.is_none() {
                    Err("an experiment is created on a user's authority".into())
                } else {
                    Ok(())
                }
            }
            Command::TrialKill { trial } => {
                let experiment = self.trials.get(trial).map(|t| t.experiment);
                match experiment {
                    Some(e) if self.may_control(user, e) => Ok(()),
                    Some(e) => Err(format!(
                        "{} may not control experiment {e} (trial {trial})",
                        user.unwrap_or("a node")
                    )),
                    None => Ok(()), // apply rejects an unknown trial
                }
            }
            Command::ExperimentControl { experiment, .. } => {
                if self.may_control(user, *experiment) {
                    Ok(())
                } else {
                    Err(format!(
                        "{} may not control experiment {experiment}",
                        user.unwrap_or("a node")
                    ))
                }
            }
            Command::TrialStarted { trial, incarnation }
            | Command::TrialExited {
                trial, incarnation, ..
            } => self.reports_from(p, *trial, *incarnation),
            Command::CheckpointSaved {
                trial,
                incarnation,
                holder,
                ..
            } => {
                node_only(*holder, "a checkpoint")?;
                self.reports_from(p, *trial, *incarnation)
            }
            Command::CheckpointReplicated { holder, .. } => node_only(*holder, "a copy"),
            Command::ModelKept { holder, .. } => node_only(*holder, "a model copy"),
            // Checked record by record (`own_records`).
            Command::Metrics { .. } => Ok(()),
            Command::User(_) => Ok(()),
        }
    }

    /// A report about the current incarnation of a trial comes from a node it
    /// runs on (a stale or unknown one is rejected later, as stale).
    fn reports_from(&self, node: NodeId, trial: TrialId, incarnation: u64) -> Result<(), String> {
        match self.trials.get(&trial) {
            Some(t)
                if t.incarnation == incarnation && !t.layout.iter().any(|(n, _)| *n == node) =>
            {
                Err(format!(
                    "node {node:016x} does not run trial {trial} incarnation {incarnation}"
                ))
            }
            _ => Ok(()),
        }
    }

    /// Keeps the metric records `node` may report; counts the others.
    pub(super) fn own_records(&mut self, node: NodeId, records: &mut Vec<MetricRecord>) {
        let before = records.len();
        records.retain(|r| self.reports_from(node, r.trial, r.incarnation).is_ok());
        self.forbidden += (before - records.len()) as u64;
    }

    /// `NodeApproved`: the leader admits `node` once, without a join token.
    pub(super) fn approve_node(&mut self, node: NodeId) -> Reply {
        if node == 0 {
            return Reply::Rejected {
                reason: "node id 0 is not a node".into(),
            };
        }
        if self.nodes.contains_key(&node) {
            return Reply::Rejected {
                reason: format!("node {node:016x} is a member already"),
            };
        }
        if self.approved_nodes.len() >= APPROVED_NODES_MAX {
            return Reply::Rejected {
                reason: format!("at most {APPROVED_NODES_MAX} approvals may wait for their node"),
            };
        }
        self.removed_nodes.remove(&node);
        self.approved_nodes.insert(node);
        Reply::Ok
    }

    /// `NodeRemoved`: `node` leaves the state now (its trials are requeued) and
    /// is never admitted again unless approved; the leader takes it out of
    /// the Raft membership (`Node::maintain_membership`).
    pub(super) fn remove_for_good(&mut self, node: NodeId, changes: &mut Vec<Change>) -> Reply {
        if !self.nodes.contains_key(&node) && !self.approved_nodes.contains(&node) {
            return Reply::Rejected {
                reason: format!("no node {node:016x}"),
            };
        }
        self.approved_nodes.remove(&node);
        if self.removed_nodes.len() >= REMOVED_NODES_MAX {
            if let Some(oldest) = self.removed_nodes.first().copied() {
                self.removed_nodes.remove(&oldest);
            }
        }
        self.removed_nodes.insert(node);
        self.remove_node(node, changes);
        Reply::Ok
    }

    /// Whether an admin removed `node` (no peer admits it).
    pub fn is_removed(&self, node: NodeId) -> bool {
        self.removed_nodes.contains(&node)
    }

    /// Applies a user-management command on `user`'s authority.
    pub(super) fn apply_user(&mut self, user: Option<&str>, command: UserCommand) -> Reply {
        let admin = self.is_cluster_admin(user);
        match command {
            UserCommand::Bootstrap { admin: name, token } => {
                if self.secured() {
                    return forbidden("the cluster already has users");
                }
                if !valid_user_name(&name) {
                    return rejected(format!("invalid user name {name:?}"));
                }
                if let Err(e) = valid_token(&token) {
                    return rejected(e);
                }
                self.users.insert(
                    name.clone(),
                    User {
                        active: true,
                        cluster_admin: true,
                        roles: BTreeMap::new(),
                    },
                );
                self.insert_token(name, token);
                Reply::Ok
            }
            UserCommand::Create {
                name,
                cluster_admin,
                roles,
            } => {
                if !admin {
                    return forbidden("only a cluster admin creates users");
                }
                if !valid_user_name(&name) {
                    return rejected(format!(
                        "invalid user name {name:?} (1 to 64 of a-z, 0-9, _ . -)"
                    ));
                }
                if self.users.contains_key(&name) {
                    return rejected(format!("user {name} exists"));
                }
                if self.users.len() >= USERS_MAX || roles.len() > ROLES_PER_USER_MAX {
                    return rejected(format!(
                        "at most {USERS_MAX} users of at most {ROLES_PER_USER_MAX} roles"
                    ));
                }
                self.users.insert(
                    name,
                    User {
                        active: true,
                        cluster_admin,
                        roles,
                    },
                );
                Reply::Ok
            }
            UserCommand::Deactivate { name } => {
                if !admin {
                    return forbidden("only a cluster admin deactivates users");
                }
                let admins = self
                    .users
                    .iter()
                    .filter(|(n, u)| u.active && u.cluster_admin && **n != name)
                    .count();
                let Some(u) = self.users.get_mut(&name) else {
                    return rejected(format!("no user {name}"));
                };
                if u.cluster_admin && admins == 0 {
                    return rejected("the last cluster admin cannot be deactivated".into());
                }
                u.active = false;
                Reply::Ok
            }
            UserCommand::Grant {
                name,
                workspace,
                role,
            } => {
                let may =
                    admin || user.is_some_and(|u| self.role_in(u, &workspace) == Some(Role::Admin));
                if !may {
                    return forbidden(format!("only an admin of {workspace} grants roles there"));
                }
                let Some(u) = self.users.get_mut(&name) else {
                    return rejected(format!("no user {name}"));
                };
                match role {
                    Some(r)
                        if u.roles.len() < ROLES_PER_USER_MAX
                            || u.roles.contains_key(&workspace) =>
                    {
                        u.roles.insert(workspace, r);
                    }
                    Some(_) => return rejected(format!("at most {ROLES_PER_USER_MAX} roles")),
                    None => {
                        u.roles.remove(&workspace);
                    }
                }
                Reply::Ok
            }
            UserCommand::CreateToken { user: owner, token } => {
                if !(admin || user == Some(owner.as_str())) || self.active_user(&owner).is_none() {
                    return forbidden(format!(
                        "a token for {owner} is made by {owner} or a cluster admin"
                    ));
                }
                if let Err(e) = valid_token(&token) {
                    return rejected(e);
                }
                if self.tokens.contains_key(&token.id) {
                    return rejected(format!("token {} exists", token.id));
                }
                let held = self.tokens.values().filter(|t| t.user == owner).count();
                if held >= TOKENS_PER_USER_MAX {
                    return rejected(format!("at most {TOKENS_PER_USER_MAX} tokens per user"));
                }
                self.insert_token(owner, token);
                Reply::Ok
            }
            UserCommand::CreateJoinToken { token, uses } => {
                if !admin {
                    return forbidden("only a cluster admin makes join tokens");
                }
                if let Err(e) = valid_token(&token) {
                    return rejected(e);
                }
                if blake3::Hash::from_hex(&token.hash).is_err() {
                    return rejected("a join token's hash is 64 hex characters".into());
                }
                if self.join_tokens.contains_key(&token.id) {
                    return rejected(format!("join token {} exists", token.id));
                }
                if self.join_tokens.len() >= JOIN_TOKENS_MAX {
                    // The used-up and expired ones make room first.
                    let now = self.now_ms;
                    self.join_tokens
                        .retain(|_, t| t.uses_left > 0 && t.expires_ms.is_none_or(|e| now < e));
                    if self.join_tokens.len() >= JOIN_TOKENS_MAX {
                        return rejected(format!("at most {JOIN_TOKENS_MAX} live join tokens"));
                    }
                }
                self.join_tokens.insert(
                    token.id,
                    JoinToken {
                        hash: token.hash,
                        expires_ms: token.expires_ms,
                        uses_left: uses,
                        label: token.label,
                    },
                );
                Reply::Ok
            }
            UserCommand::RevokeToken { id } => {
                let Some(t) = self.tokens.get_mut(&id) else {
                    return rejected(format!("no token {id}"));
                };
                if !(admin || user == Some(t.user.as_str())) {
                    return forbidden("a token is revoked by its user or a cluster admin");
                }
                t.revoked = true;
                Reply::Ok
            }
        }
    }

    fn insert_token(&mut self, user: String, token: NewToken) {
        self.tokens.insert(
            token.id,
            Token {
                user,
                hash: token.hash,
                expires_ms: token.expires_ms,
                label: token.label,
                revoked: false,
            },
        );
    }
}
