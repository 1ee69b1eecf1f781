//! Bringing nodes up: `resolute node init` writes a node's config for its
//! role with the cluster key and a join token beside it; `node systemd`
//! prints the unit that runs it on a server; `node cloud-init` prints the
//! user-data that installs and starts one on a fresh VM. The configs are the
//! shipped `config/*.toml`, compiled in, with the data dir and the peers to
//! join filled in, and every one is parsed by the node's own config reader
//! before it is written or printed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// A node's role: which shipped config it starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// An on-prem GPU server (`config/onprem.toml`).
    Onprem,
    /// A cloud VM (`config/cloud.toml`).
    Cloud,
    /// A laptop or workstation on loopback (`config/laptop.toml`).
    Laptop,
}

impl Role {
    fn template(self) -> &'static str {
        match self {
            Role::Onprem => include_str!("../../../config/onprem.toml"),
            Role::Cloud => include_str!("../../../config/cloud.toml"),
            Role::Laptop => include_str!("../../../config/laptop.toml"),
        }
    }
}

/// The file in a data dir that holds the join token for the unit's
/// `EnvironmentFile` (`RESOLUTE_JOIN_TOKEN=...`).
pub const JOIN_TOKEN_FILE: &str = "join-token.env";
/// The cluster key's file in a data dir (what `node start` reads).
pub const CLUSTER_KEY_FILE: &str = "cluster.key";
/// Where `node cloud-init` puts things on the VM.
const VM_CONFIG: &str = "/etc/resolute/node.toml";
const VM_DATA_DIR: &str = "/var/lib/resolute";
const VM_BINARY: &str = "/usr/local/bin/resolute";
const VM_UNIT: &str = "/etc/systemd/system/resolute.service";

/// The role's config with `data_dir` and `net.bootstrap` set, checked by the
/// node's own config reader.
pub fn node_config(role: Role, data_dir: &Path, join: &[String]) -> anyhow::Result<String> {
    let template = role.template();
    let toml_str = |s: &str| format!("{s:?}");
    let data_line = "data_dir = \"resolute-data\"";
    let bootstrap_line = "bootstrap = []";
    if !template.contains(data_line) || !template.contains(bootstrap_line) {
        bail!("the shipped {role:?} config lost its data_dir or bootstrap line");
    }
    let joins: Vec<String> = join.iter().map(|j| toml_str(j)).collect();
    let text = template
        .replacen(
            data_line,
            &format!("data_dir = {}", toml_str(&data_dir.display().to_string())),
            1,
        )
        .replacen(
            bootstrap_line,
            &format!("bootstrap = [{}]", joins.join(", ")),
            1,
        );
    resolute_node::config::parse("node.toml", &text).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(text)
}

/// A cluster key file's 64 hex characters (checked).
fn read_key(path: &Path) -> anyhow::Result<String> {
    let key = std::fs::read_to_string(path)
        .with_context(|| format!("--cluster-key {}", path.display()))?;
    let key = key.trim().to_string();
    if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "--cluster-key {}: expected 64 hex characters",
            path.display()
        );
    }
    Ok(key)
}

/// Writes `text` to `path` readable by its owner only, refusing to replace a file.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("{} (it is not replaced)", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| path.display().to_string())
}

/// What `node init` was asked.
pub struct Init<'a> {
    pub role: Role,
    pub data_dir: &'a Path,
    pub config: Option<&'a Path>,
    pub join: &'a [String],
    pub cluster_key: Option<&'a Path>,
    pub join_token: Option<&'a str>,
}

/// `resolute node init`: the config (default DATA_DIR/node.toml), the
/// cluster key and the join token in the data dir; prints how to start it.
pub fn init(a: &Init<'_>) -> anyhow::Result<()> {
    std::fs::create_dir_all(a.data_dir).with_context(|| a.data_dir.display().to_string())?;
    let data_dir = std::path::absolute(a.data_dir)?;
    let config = a
        .config
        .map(Path::to_path_buf)
        .unwrap_or_else(|| data_dir.join("node.toml"));
    let text = node_config(a.role, &data_dir, a.join)?;
    write_private(&config, &text)?;
    if let Some(key) = a.cluster_key {
        write_private(&data_dir.join(CLUSTER_KEY_FILE), &(read_key(key)? + "\n"))?;
    }
    if let Some(token) = a.join_token {
        write_private(
            &data_dir.join(JOIN_TOKEN_FILE),
            &format!("RESOLUTE_JOIN_TOKEN={token}\n"),
        )?;
    }
    println!("wrote {}", config.display());
    println!(
        "start it: resolute node start --config {}{}",
        config.display(),
        if a.join_token.is_some() {
            format!(
                " (with RESOLUTE_JOIN_TOKEN from {})",
                data_dir.join(JOIN_TOKEN_FILE).display()
            )
        } else {
            String::new()
        }
    );
    println!(
        "or as a service: resolute node systemd --config {} --data-dir {}",
        config.display(),
        data_dir.display()
    );
    Ok(())
}

/// The systemd unit that runs a node from `config` (restarted on failure;
/// stopped with SIGTERM, which drains it: its trials checkpoint and move).
pub fn systemd_unit(binary: &Path, config: &Path, data_dir: &Path, user: Option<&str>) -> String {
    let user = user.map_or(String::new(), |u| format!("User={u}\n"));
    format!(
        "[Unit]\n\
         Description=Resolute training node\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         Type=simple\n\
         {user}\
         EnvironmentFile=-{token}\n\
         ExecStart={binary} node start --config {config} --data-dir {data}\n\
         Restart=on-failure\n\
         RestartSec=5\n\
         # SIGTERM drains the node (its trials checkpoint and move) before it exits.\n\
         KillSignal=SIGTERM\n\
         TimeoutStopSec=3700\n\
         LimitNOFILE=65536\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        token = data_dir.join(JOIN_TOKEN_FILE).display(),
        binary = binary.display(),
        config = config.display(),
        data = data_dir.display(),
    )
}

/// `resolute node systemd`: prints the unit.
pub fn systemd(
    config: &Path,
    data_dir: &Path,
    binary: Option<&Path>,
    user: Option<&str>,
) -> anyhow::Result<()> {
    let binary = match binary {
        Some(b) => b.to_path_buf(),
        None => std::env::current_exe().context("the resolute binary's path")?,
    };
    let config = std::path::absolute(config)?;
    let data_dir = std::path::absolute(data_dir)?;
    print!("{}", systemd_unit(&binary, &config, &data_dir, user));
    Ok(())
}

/// What `node cloud-init` was asked.
pub struct CloudInit<'a> {
    pub role: Role,
    pub join: &'a [String],
    pub cluster_key: &'a Path,
    pub join_token: Option<&'a str>,
    pub binary_url: &'a str,
}

/// Indents every line of `text` by `n` spaces (a YAML block scalar).
fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{pad}{l}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The `#cloud-config` user-data that installs a node on a fresh VM: its
/// config, key and join token, the binary from `binary_url`, the systemd
/// unit, enabled and started.
pub fn cloud_init_text(a: &CloudInit<'_>) -> anyhow::Result<String> {
    let config = node_config(a.role, Path::new(VM_DATA_DIR), a.join)?;
    let key = read_key(a.cluster_key)?;
    let unit = systemd_unit(
        Path::new(VM_BINARY),
        Path::new(VM_CONFIG),
        Path::new(VM_DATA_DIR),
        None,
    );
    let url_ok = a.binary_url.starts_with("https://") || a.binary_url.starts_with("http://");
    if !url_ok || a.binary_url.contains(['\'', '"', ' ', '\n']) {
        bail!(
            "--binary-url {:?}: expected an http(s) URL of the resolute binary",
            a.binary_url
        );
    }
    let mut files = vec![
        (VM_CONFIG.to_string(), "0644", config),
        (
            format!("{VM_DATA_DIR}/{CLUSTER_KEY_FILE}"),
            "0600",
            key + "\n",
        ),
        (VM_UNIT.to_string(), "0644", unit),
    ];
    if let Some(t) = a.join_token {
        if t.contains(['\n', '\'', '"', ' ']) {
            bail!("--join-token: not a join token");
        }
        files.push((
            format!("{VM_DATA_DIR}/{JOIN_TOKEN_FILE}"),
            "0600",
            format!("RESOLUTE_JOIN_TOKEN={t}\n"),
        ));
    }
    let mut out = String::from(
        "#cloud-config\n# A Resolute node: `resolute node cloud-init` made this.\nwrite_files:\n",
    );
    for (path, mode, content) in &files {
        out.push_str(&format!(
            "  - path: {path}\n    permissions: '{mode}'\n    content: |\n{}\n",
            indent(content, 6)
        ));
    }
    out.push_str(&format!(
        "runcmd:\n  - [mkdir, -p, {VM_DATA_DIR}]\n  - [chmod, '700', {VM_DATA_DIR}]\n  \
         - [curl, -fsSL, -o, {VM_BINARY}, '{}']\n  - [chmod, '755', {VM_BINARY}]\n  \
         - [systemctl, daemon-reload]\n  - [systemctl, enable, --now, resolute.service]\n",
        a.binary_url
    ));
    Ok(out)
}

/// `resolute node cloud-init`: prints the user-data.
pub fn cloud_init(a: &CloudInit<'_>) -> anyhow::Result<()> {
    print!("{}", cloud_init_text(a)?);
    Ok(())
}

/// The data dir a `node systemd` without `--data-dir` assumes.
pub fn default_data_dir() -> PathBuf {
    PathBuf::from(VM_DATA_DIR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use resolute_types::Value;

    #[test]
    fn every_role_gets_a_config_the_node_reads() {
        let join = ["/ip4/203.0.113.10/tcp/4001".to_string()];
        for role in [Role::Onprem, Role::Cloud, Role::Laptop] {
            let text = node_config(role, Path::new("/var/lib/resolute"), &join).expect("config");
            let parsed = resolute_node::config::parse("node.toml", &text).expect("parses");
            assert_eq!(
                parsed.data_dir.as_deref(),
                Some(Path::new("/var/lib/resolute"))
            );
            assert_eq!(parsed.net.bootstrap, join.to_vec(), "{role:?}");
        }
    }

    #[test]
    fn cloud_init_is_yaml_with_every_file_and_the_unit_started() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("cluster.key");
        std::fs::write(&key, "ab".repeat(32)).expect("key");
        let args = CloudInit {
            role: Role::Cloud,
            join: &["/ip4/203.0.113.10/tcp/4001".to_string()],
            cluster_key: &key,
            join_token: Some("rsl_jt_0123"),
            binary_url: "https://example.org/resolute",
        };
        let text = cloud_init_text(&args).expect("user-data");
        assert!(text.starts_with("#cloud-config\n"));
        let doc = resolute_types::yaml::parse(&text, 0)
            .expect("yaml")
            .to_value();
        let Value::Map(doc) = doc else {
            panic!("{doc:?}")
        };
        let Some(Value::List(files)) = doc.get("write_files") else {
            panic!("{doc:?}")
        };
        let file = |path: &str| -> String {
            files
                .iter()
                .find_map(|f| match f {
                    Value::Map(m) if m.get("path") == Some(&Value::String(path.into())) => {
                        match m.get("content") {
                            Some(Value::String(s)) => Some(s.clone()),
                            _ => None,
                        }
                    }
                    _ => None,
                })
                .unwrap_or_else(|| panic!("no {path} in {files:?}"))
        };
        // The config survives the YAML block whole: the node reads it.
        let config = file(VM_CONFIG);
        let parsed = resolute_node::config::parse("node.toml", &config).expect("config");
        assert_eq!(
            parsed.net.bootstrap,
            vec!["/ip4/203.0.113.10/tcp/4001".to_string()]
        );
        assert_eq!(
            file("/var/lib/resolute/cluster.key").trim(),
            "ab".repeat(32)
        );
        assert_eq!(
            file("/var/lib/resolute/join-token.env").trim(),
            "RESOLUTE_JOIN_TOKEN=rsl_jt_0123"
        );
        let unit = file(VM_UNIT);
        assert!(
            unit.contains("Restart=on-failure")
                && unit.contains(
                    "ExecStart=/usr/local/bin/resolute node start --config /etc/resolute/node.toml"
                ),
            "{unit}"
        );
        let runcmd = format!("{:?}", doc.get("runcmd"));
        assert!(
            runcmd.contains("https://example.org/resolute") && runcmd.contains("resolute.service"),
            "{runcmd}"
        );
        // Bad input is refused with the flag's name.
        let bad = CloudInit {
            binary_url: "ftp://x",
            ..args
        };
        assert!(cloud_init_text(&bad)
            .expect_err("url")
            .to_string()
            .contains("--binary-url"));
        std::fs::write(&key, "short").expect("key");
        let err = cloud_init_text(&CloudInit {
            binary_url: "https://x",
            ..bad
        })
        .expect_err("key");
        assert!(err.to_string().contains("64 hex characters"), "{err}");
    }
}
