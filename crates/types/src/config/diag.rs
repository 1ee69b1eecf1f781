//! Diagnostics: errors and warnings that point at a key in the user's file.
//!
//! Every message has the shape `FILE:LINE:COL: KEY.PATH: message`, or
//! `--config OVERRIDE: KEY.PATH: message` for values that came from the command line.

use std::fmt;

use crate::yaml::{Key, Node, NodeKind, Pos};

/// One error or warning about the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where: `exp.yaml:8:3` or `--config searcher.max_trials=3`.
    pub location: String,
    /// Dotted key path, e.g. `searcher.max_trials` or `entrypoint[1]`; empty for the root.
    pub path: String,
    /// What is wrong, or why a field has no effect.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.location, self.message)
        } else {
            write!(f, "{}: {}: {}", self.location, self.path, self.message)
        }
    }
}

/// Collects diagnostics while a config is read, so that one run reports every error.
#[derive(Debug, Default)]
pub struct Diag {
    file: String,
    overrides: Vec<String>,
    /// Errors found so far.
    pub errors: Vec<Diagnostic>,
    /// Warnings found so far.
    pub warnings: Vec<Diagnostic>,
}

impl Diag {
    /// A collector for `file` with the given `--config` overrides (source 1, 2, ...).
    pub fn new(file: &str, overrides: &[String]) -> Self {
        Diag {
            file: file.to_string(),
            overrides: overrides.to_vec(),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// Formats a position as a location prefix.
    pub fn location(&self, pos: Pos) -> String {
        match pos.source {
            0 => format!("{}:{}:{}", self.file, pos.line, pos.col),
            n => match self.overrides.get(usize::from(n) - 1) {
                Some(text) => format!("--config {text}"),
                None => format!("--config #{n}"),
            },
        }
    }

    /// Records an error at `pos`.
    pub fn error(&mut self, pos: Pos, path: &str, message: impl Into<String>) {
        let location = self.location(pos);
        self.errors.push(Diagnostic {
            location,
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// Records a warning at `pos`.
    pub fn warn(&mut self, pos: Pos, path: &str, message: impl Into<String>) {
        let location = self.location(pos);
        self.warnings.push(Diagnostic {
            location,
            path: path.to_string(),
            message: message.into(),
        });
    }
}

/// Joins a parent path and a key: `searcher` + `metric` is `searcher.metric`.
pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A map's fields, checked against the keys a section allows.
pub struct Fields<'a> {
    /// The path of the map itself.
    pub path: String,
    /// Where the map starts (used for "missing field" errors).
    pub pos: Pos,
    entries: Vec<(&'a Key, &'a Node)>,
}

/// What a section does with a key it recognises.
pub enum Known<'a> {
    /// The key is read by the parser.
    Used(&'a str),
    /// The key is part of Determined's schema but has no effect here; the text says why.
    Ignored(&'a str, &'a str),
}

impl<'a> Fields<'a> {
    /// Reads `node` as a map (null counts as empty). Unknown keys are errors with a
    /// suggestion; ignored keys produce a warning. Returns `None` (after recording an
    /// error) when the node is not a map.
    pub fn read(diag: &mut Diag, node: &'a Node, path: &str, known: &[Known<'_>]) -> Option<Self> {
        let entries: Vec<(&Key, &Node)> = match &node.kind {
            NodeKind::Map(entries) => entries.iter().map(|(k, v)| (k, v)).collect(),
            NodeKind::Null => Vec::new(),
            _ => {
                diag.error(
                    node.pos,
                    path,
                    format!("expected a map, found {}", node.type_name()),
                );
                return None;
            }
        };
        let names: Vec<&str> = known
            .iter()
            .map(|k| match k {
                Known::Used(n) | Known::Ignored(n, _) => *n,
            })
            .collect();
        let mut kept = Vec::new();
        for (key, value) in entries {
            let key_path = join(path, &key.name);
            match known.iter().find(|k| match k {
                Known::Used(n) | Known::Ignored(n, _) => *n == key.name,
            }) {
                Some(Known::Used(_)) => kept.push((key, value)),
                Some(Known::Ignored(_, why)) => diag.warn(
                    key.pos,
                    &key_path,
                    format!("accepted, has no effect here: {why}"),
                ),
                None => {
                    let message = match suggest(&key.name, &names) {
                        Some(s) => format!("unknown field (did you mean {s}?)"),
                        None => format!("unknown field (expected one of: {})", names.join(", ")),
                    };
                    diag.error(key.pos, &key_path, message);
                }
            }
        }
        Some(Fields {
            path: path.to_string(),
            pos: node.pos,
            entries: kept,
        })
    }

    /// The value of `key`, unless absent or null (null means "use the default",
    /// as in Determined's schema).
    pub fn get(&self, key: &str) -> Option<&'a Node> {
        self.entries
            .iter()
            .find(|(k, _)| k.name == key)
            .map(|(_, v)| *v)
            .filter(|v| v.kind != NodeKind::Null)
    }

    /// The path of a field of this map.
    pub fn path_of(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// Records "missing required field" for `key`.
    pub fn missing(&self, diag: &mut Diag, key: &str, why: &str) {
        diag.error(
            self.pos,
            &self.path_of(key),
            format!("missing required field{why}"),
        );
    }
}

/// The closest of `candidates` to `word`, if it is close enough to be a typo.
pub fn suggest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let limit = (word.chars().count() / 3).max(2);
    // `searcher_extra` or `hyperparams`: one name extends or shortens the other.
    let affix = candidates
        .iter()
        .filter(|c| {
            c.len() >= 4 && word.len() >= 4 && (word.starts_with(**c) || c.starts_with(word))
        })
        .max_by_key(|c| c.len());
    if let Some(c) = affix {
        return Some(c);
    }
    candidates
        .iter()
        .map(|c| (levenshtein(word, c), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, c)| (*d, *c))
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_find_typos_only() {
        let keys = ["max_trials", "max_time", "metric", "divisor"];
        assert_eq!(suggest("max_trails", &keys), Some("max_trials"));
        assert_eq!(suggest("metrc", &keys), Some("metric"));
        assert_eq!(suggest("learning_rate", &keys), None);
    }
}
