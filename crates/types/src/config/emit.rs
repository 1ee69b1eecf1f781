//! A small YAML emitter for printing normalized configs (`resolute config check`).
//!
//! It writes block-style YAML from a JSON value, quoting strings only when a plain
//! scalar would be read back as something else.

use serde::Serialize;

/// Renders any serializable value as YAML.
pub fn to_yaml<T: Serialize>(value: &T) -> String {
    let json = serde_json::to_value(value).unwrap_or(serde_json::Value::Null);
    let mut out = String::new();
    emit(&json, 0, &mut out);
    out
}

fn emit(value: &serde_json::Value, indent: usize, out: &mut String) {
    use serde_json::Value as J;
    let pad = " ".repeat(indent);
    match value {
        J::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                out.push_str(&pad);
                out.push_str(&scalar_str(k));
                out.push(':');
                write_child(v, indent, out);
            }
        }
        J::Array(items) if !items.is_empty() => {
            for v in items {
                out.push_str(&pad);
                out.push('-');
                write_child(v, indent, out);
            }
        }
        other => {
            out.push_str(&pad);
            out.push_str(&inline(other));
            out.push('\n');
        }
    }
}

fn write_child(v: &serde_json::Value, indent: usize, out: &mut String) {
    use serde_json::Value as J;
    match v {
        J::Object(m) if !m.is_empty() => {
            out.push('\n');
            emit(v, indent + 2, out);
        }
        J::Array(a) if !a.is_empty() => {
            out.push('\n');
            emit(v, indent + 2, out);
        }
        _ => {
            out.push(' ');
            out.push_str(&inline(v));
            out.push('\n');
        }
    }
}

fn inline(v: &serde_json::Value) -> String {
    use serde_json::Value as J;
    match v {
        J::Null => "null".to_string(),
        J::Bool(b) => b.to_string(),
        J::Number(n) => n.to_string(),
        J::String(s) => scalar_str(s),
        J::Array(_) => "[]".to_string(),
        J::Object(_) => "{}".to_string(),
    }
}

/// Quotes a string when plain YAML would not read it back as the same string.
fn scalar_str(s: &str) -> String {
    let reread = crate::yaml::parse(s, 0).ok().map(|n| n.kind);
    let plain_ok = matches!(reread, Some(crate::yaml::NodeKind::Str(ref t)) if t == s)
        && !s.contains(": ")
        && !s.contains(" #")
        && !s.starts_with([
            ' ', '-', '?', '[', '{', '&', '*', '!', '|', '>', '\'', '"', '%', '@', '`',
        ])
        && !s.ends_with([' ', ':']);
    if plain_ok {
        s.to_string()
    } else {
        serde_json::to_string(s).unwrap_or_default()
    }
}
