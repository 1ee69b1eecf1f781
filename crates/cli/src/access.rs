//! Who the CLI is: `resolute cluster init`, `login`/`logout`, and the `user`
//! and `token` commands. The saved token lives in the user's config dir
//! (`$RESOLUTE_CONFIG_DIR`, else `$XDG_CONFIG_HOME/resolute`, else
//! `~/.config/resolute`), in a file only they can read.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{json, Value};

use crate::client::{call, finish, print, Failure, Target};

/// The saved token's file name in the config dir.
const TOKEN_FILE: &str = "token";

/// The CLI's config dir.
pub fn config_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("RESOLUTE_CONFIG_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("resolute"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config").join("resolute"))
}

/// The token `resolute login` saved, if any.
pub fn saved_token() -> Option<String> {
    let text = std::fs::read_to_string(config_dir()?.join(TOKEN_FILE)).ok()?;
    let t = text.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Saves `token` as the CLI's token; the file's path.
pub fn save_token(token: &str) -> Result<PathBuf, String> {
    let dir = config_dir().ok_or("no config dir: set RESOLUTE_CONFIG_DIR or HOME")?;
    resolute_node::bootstrap::private_dir(&dir)?;
    let path = dir.join(TOKEN_FILE);
    resolute_node::bootstrap::write_private(&path, format!("{}\n", token.trim()).as_bytes())?;
    Ok(path)
}

/// `resolute cluster init` arguments.
#[derive(clap::Args)]
pub struct InitArgs {
    /// The data dir of the node that will bootstrap the cluster.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The first administrator's user name.
    #[arg(long, default_value = "admin")]
    pub admin: String,
    /// Print the admin token only; do not save it as this CLI's token.
    #[arg(long)]
    pub no_save: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `resolute cluster init`.
pub fn init(args: &InitArgs) -> anyhow::Result<ExitCode> {
    let made = match resolute_node::bootstrap::init(&args.data_dir, &args.admin) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let saved = if args.no_save {
        None
    } else {
        match save_token(&made.token) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("error: saving the token: {e}");
                return Ok(ExitCode::from(1));
            }
        }
    };
    if args.json {
        println!(
            "{}",
            json!({"admin": args.admin, "token": made.token,
                "cluster_key_file": made.key_path.display().to_string(),
                "new_key": made.new_key,
                "saved_to": saved.as_ref().map(|p| p.display().to_string())})
        );
    } else {
        println!("administrator: {}", args.admin);
        println!("token (shown once): {}", made.token);
        match &saved {
            Some(p) => println!("  saved for this CLI in {}", p.display()),
            None => println!("  not saved: use `resolute login` or RESOLUTE_TOKEN"),
        }
        println!(
            "cluster key: {}{}",
            made.key_path.display(),
            if made.new_key { " (new)" } else { " (kept)" }
        );
        println!("  copy it into every other node's data dir (or net.cluster_key) before it joins");
        println!(
            "next: resolute node start --config config/laptop.toml --data-dir {}",
            args.data_dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `resolute login`: checks a token against the node, then saves it.
pub fn login(t: &Target, token: Option<&str>) -> anyhow::Result<ExitCode> {
    let token = match token {
        Some(x) => x.trim().to_string(),
        None => {
            eprintln!("paste the token, then press enter:");
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            line.trim().to_string()
        }
    };
    let checked = Target {
        token: Some(token.clone()),
        ..t.clone()
    };
    let r = call(&checked, "GET", "/me", None).and_then(|me| {
        let path = save_token(&token).map_err(Failure::User)?;
        print(t, &me, |me| {
            println!(
                "logged in as {}{}; token saved in {}",
                me["user"].as_str().unwrap_or("?"),
                if me["cluster_admin"] == json!(true) {
                    " (cluster admin)"
                } else {
                    ""
                },
                path.display()
            )
        });
        Ok(())
    });
    finish(r)
}

/// Runs `resolute cluster join-token`.
pub fn join_token(t: &Target, ttl: &str, uses: u32, label: &str) -> anyhow::Result<ExitCode> {
    let r = parse_ttl_s(ttl).map_err(Failure::User).and_then(|ttl_s| {
        let body = json!({"ttl_s": ttl_s, "uses": uses, "label": label});
        let v = call(t, "POST", "/join-tokens", Some(body))?;
        print(t, &v, |v| {
            println!("{}", v["token"].as_str().unwrap_or(""));
            eprintln!(
                "join token {} for {uses} node(s), shown once: resolute node start ... --join <addr> --join-token <it>",
                v["id"].as_str().unwrap_or("")
            );
        });
        Ok(())
    });
    finish(r)
}

/// Runs `resolute whoami`.
pub fn whoami(t: &Target) -> anyhow::Result<ExitCode> {
    let r = call(t, "GET", "/me", None).map(|me| {
        print(t, &me, |me| {
            println!(
                "{}{}",
                me["user"].as_str().unwrap_or("?"),
                if me["cluster_admin"] == json!(true) {
                    " (cluster admin)"
                } else {
                    ""
                }
            )
        })
    });
    finish(r)
}

/// Runs `resolute logout`: forgets the saved token.
pub fn logout() -> anyhow::Result<ExitCode> {
    if let Some(d) = config_dir() {
        let _ = std::fs::remove_file(d.join(TOKEN_FILE));
    }
    Ok(ExitCode::SUCCESS)
}

/// `resolute user ...`
#[derive(Subcommand)]
pub enum UserCommand {
    /// Creates a user (cluster admin).
    Create {
        /// The user name (a-z, 0-9, _ . -).
        name: String,
        /// Make them a cluster admin (nodes, users, pools, every workspace).
        #[arg(long)]
        cluster_admin: bool,
        /// A role in a workspace: `WORKSPACE=ROLE` (viewer, user, editor,
        /// admin); repeatable.
        #[arg(long = "role", value_name = "WORKSPACE=ROLE")]
        roles: Vec<String>,
    },
    /// Lists users and tokens (a cluster admin sees everyone's).
    List,
    /// Deactivates a user: their tokens stop working (cluster admin).
    Deactivate {
        /// The user name.
        name: String,
    },
    /// Grants a role in a workspace (`none` takes it away).
    Grant {
        /// The user name.
        name: String,
        /// The workspace.
        workspace: String,
        /// viewer, user, editor, admin or none.
        role: String,
    },
}

/// `resolute token ...`
#[derive(Subcommand)]
pub enum TokenCommand {
    /// Creates a token (for yourself, or for a user if you are a cluster
    /// admin); prints it once.
    Create {
        /// Whose token.
        #[arg(long)]
        user: Option<String>,
        /// What it is for.
        #[arg(long, default_value = "")]
        label: String,
        /// Lifetime: `90s`, `30m`, `12h`, `7d` (default: until revoked).
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Lists tokens (ids and labels, never secrets).
    List,
    /// Revokes a token.
    Revoke {
        /// The token's id (`token list`).
        id: String,
    },
}

/// Parses `90s`, `30m`, `12h`, `7d` or plain seconds.
pub fn parse_ttl_s(text: &str) -> Result<u64, String> {
    let (num, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("--ttl {text:?}: a number and s, m, h or d"))?;
    let unit_s = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("--ttl {text:?}: the unit is s, m, h or d")),
    };
    n.checked_mul(unit_s)
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("--ttl {text:?}: out of range"))
}

fn path_segment(s: &str) -> Result<&str, Failure> {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        Ok(s)
    } else {
        Err(Failure::User(format!("{s:?}: letters, digits, _ . - only")))
    }
}

fn print_users(v: &Value) {
    for u in v["users"].as_array().into_iter().flatten() {
        println!(
            "{:<20} {}{} {}",
            u["name"].as_str().unwrap_or(""),
            if u["active"] == json!(true) {
                "active"
            } else {
                "deactivated"
            },
            if u["cluster_admin"] == json!(true) {
                " cluster-admin"
            } else {
                ""
            },
            u["roles"]
        );
    }
}

fn print_tokens(v: &Value) {
    for t in v["tokens"].as_array().into_iter().flatten() {
        println!(
            "{:<18} {:<20} {}{}",
            t["id"].as_str().unwrap_or(""),
            t["user"].as_str().unwrap_or(""),
            t["label"].as_str().unwrap_or(""),
            if t["revoked"] == json!(true) {
                " (revoked)"
            } else {
                ""
            }
        );
    }
}

/// Runs `resolute user ...`.
pub fn user(t: &Target, cmd: &UserCommand) -> anyhow::Result<ExitCode> {
    let ok = |v: Value| print(t, &v, |_| println!("done"));
    let r = match cmd {
        UserCommand::Create {
            name,
            cluster_admin,
            roles,
        } => (|| {
            let mut map = serde_json::Map::new();
            for r in roles {
                let (w, role) = r
                    .split_once('=')
                    .ok_or_else(|| Failure::User(format!("--role {r:?}: WORKSPACE=ROLE")))?;
                map.insert(w.to_string(), json!(role));
            }
            let body = json!({"name": name, "cluster_admin": cluster_admin, "roles": map});
            call(t, "POST", "/users", Some(body)).map(ok)
        })(),
        UserCommand::List => call(t, "GET", "/users", None).map(|v| print(t, &v, print_users)),
        UserCommand::Deactivate { name } => path_segment(name)
            .and_then(|n| call(t, "POST", &format!("/users/{n}/deactivate"), None))
            .map(ok),
        UserCommand::Grant {
            name,
            workspace,
            role,
        } => {
            let role = if role == "none" {
                Value::Null
            } else {
                json!(role)
            };
            path_segment(name)
                .and_then(|n| {
                    call(
                        t,
                        "POST",
                        &format!("/users/{n}/roles"),
                        Some(json!({"workspace": workspace, "role": role})),
                    )
                })
                .map(ok)
        }
    };
    finish(r)
}

/// Runs `resolute token ...`.
pub fn token(t: &Target, cmd: &TokenCommand) -> anyhow::Result<ExitCode> {
    let r = match cmd {
        TokenCommand::Create { user, label, ttl } => (|| {
            let ttl_s = ttl
                .as_deref()
                .map(parse_ttl_s)
                .transpose()
                .map_err(Failure::User)?;
            let body = json!({"user": user, "label": label, "ttl_s": ttl_s});
            let v = call(t, "POST", "/tokens", Some(body))?;
            print(t, &v, |v| {
                println!("{}", v["token"].as_str().unwrap_or(""));
                eprintln!(
                    "token {} for {} (shown once; `resolute login` saves it)",
                    v["id"].as_str().unwrap_or(""),
                    v["user"].as_str().unwrap_or("")
                );
            });
            Ok(())
        })(),
        TokenCommand::List => call(t, "GET", "/users", None).map(|v| print(t, &v, print_tokens)),
        TokenCommand::Revoke { id } => path_segment(id)
            .and_then(|id| call(t, "POST", &format!("/tokens/{id}/revoke"), None))
            .map(|v| print(t, &v, |_| println!("revoked"))),
    };
    finish(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse_with_their_units() {
        for (text, s) in [
            ("90", 90),
            ("90s", 90),
            ("30m", 1800),
            ("12h", 43_200),
            ("7d", 604_800),
        ] {
            assert_eq!(parse_ttl_s(text), Ok(s), "{text}");
        }
        for bad in ["", "h", "0", "5w", "-1h", "99999999999999999999d"] {
            assert!(parse_ttl_s(bad).is_err(), "{bad}");
        }
    }
}
