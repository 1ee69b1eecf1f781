//! Typed readers for scalar fields: each checks the node's type and range and records
//! an error (returning `None`) when it does not fit.

use super::diag::Diag;
use crate::yaml::{Node, NodeKind};

/// Reads a string.
pub fn string(diag: &mut Diag, node: &Node, path: &str) -> Option<String> {
    match &node.kind {
        NodeKind::Str(s) => Some(s.clone()),
        _ => {
            diag.error(
                node.pos,
                path,
                format!("expected a string, found {}", node.type_name()),
            );
            None
        }
    }
}

/// Reads a boolean.
pub fn boolean(diag: &mut Diag, node: &Node, path: &str) -> Option<bool> {
    match node.kind {
        NodeKind::Bool(b) => Some(b),
        _ => {
            diag.error(
                node.pos,
                path,
                format!("expected true or false, found {}", node.type_name()),
            );
            None
        }
    }
}

/// Reads an integer within `min..=max`.
pub fn int(diag: &mut Diag, node: &Node, path: &str, min: i64, max: i64) -> Option<i64> {
    let value = match node.kind {
        NodeKind::Int(i) => i,
        // Accept 3.0 for an integer field, as JSON schema does; reject 3.5.
        NodeKind::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => f as i64,
        _ => {
            diag.error(
                node.pos,
                path,
                format!("expected an integer, found {}", node.type_name()),
            );
            return None;
        }
    };
    if value < min || value > max {
        let range = if max == i64::MAX {
            format!("at least {min}")
        } else {
            format!("between {min} and {max}")
        };
        diag.error(node.pos, path, format!("must be {range}, found {value}"));
        return None;
    }
    Some(value)
}

/// Reads an integer within `min..=max` as a `u64`.
pub fn uint(diag: &mut Diag, node: &Node, path: &str, min: u64, max: u64) -> Option<u64> {
    let min_i = i64::try_from(min).unwrap_or(i64::MAX);
    let max_i = i64::try_from(max).unwrap_or(i64::MAX);
    int(diag, node, path, min_i, max_i).and_then(|v| u64::try_from(v).ok())
}

/// Reads a finite number (integers are widened).
pub fn number(diag: &mut Diag, node: &Node, path: &str) -> Option<f64> {
    let value = match node.kind {
        NodeKind::Int(i) => i as f64,
        NodeKind::Float(f) => f,
        _ => {
            diag.error(
                node.pos,
                path,
                format!("expected a number, found {}", node.type_name()),
            );
            return None;
        }
    };
    if !value.is_finite() {
        diag.error(
            node.pos,
            path,
            format!("must be a finite number, found {value}"),
        );
        return None;
    }
    Some(value)
}

/// Reads a number and checks `check`, which returns the violated rule's text.
pub fn number_where(
    diag: &mut Diag,
    node: &Node,
    path: &str,
    check: impl Fn(f64) -> Option<&'static str>,
) -> Option<f64> {
    let value = number(diag, node, path)?;
    if let Some(rule) = check(value) {
        diag.error(node.pos, path, format!("must be {rule}, found {value}"));
        return None;
    }
    Some(value)
}

/// Reads a list of strings.
pub fn strings(diag: &mut Diag, node: &Node, path: &str) -> Option<Vec<String>> {
    let NodeKind::Seq(items) = &node.kind else {
        diag.error(
            node.pos,
            path,
            format!("expected a list of strings, found {}", node.type_name()),
        );
        return None;
    };
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        match string(diag, item, &format!("{path}[{i}]")) {
            Some(s) => out.push(s),
            None => ok = false,
        }
    }
    ok.then_some(out)
}
