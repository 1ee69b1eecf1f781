//! Reading an experiment config from disk (the parsing itself is pure and lives
//! in `resolute_types::config`, which the node core uses without any file I/O).

use std::path::Path;

use resolute_types::config::{self, ConfigErrors, Diagnostic, Loaded, CONFIG_BYTES_MAX};

/// Reads and parses the config at `path`, applying `overrides` (`key.path=value`).
/// A file that cannot be read, or is larger than a config may be, is an error
/// that names it.
pub fn load(path: &Path, overrides: &[String]) -> Result<Loaded, ConfigErrors> {
    let name = path.display().to_string();
    let fail = |message: String| ConfigErrors {
        errors: vec![Diagnostic {
            location: name.clone(),
            path: String::new(),
            message,
        }],
        warnings: Vec::new(),
    };
    let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    if meta.len() > CONFIG_BYTES_MAX {
        return Err(fail(format!(
            "file is {} bytes; a config may be at most {CONFIG_BYTES_MAX}",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    config::parse_bytes(&name, &bytes, overrides)
}
