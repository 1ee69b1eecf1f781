//! A JSON-like value with sorted maps.
//!
//! Hyperparameter samples, `const`/`categorical` values, metrics and the free-form
//! `data` section all use this type. Maps are `BTreeMap`s so that iteration order,
//! and therefore every output derived from a value, is deterministic.
//!
//! Serialization is natural JSON for human-readable formats (`{"lr": 0.1}`) and a
//! tagged enum for binary formats, because bincode cannot deserialize "any".

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A dynamically typed value, as found in YAML or JSON.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Value {
    /// `null`, `~` or an empty YAML scalar.
    #[default]
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A whole number that fits in 64 bits.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A string.
    String(String),
    /// A sequence of values.
    List(Vec<Value>),
    /// A map from string keys to values, sorted by key.
    Map(BTreeMap<String, Value>),
}

impl Value {
    /// The value as a float, if it is a number (integers are widened).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// The value as an integer, if it is an `Int`.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The value as a string slice, if it is a `String`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a map, if it is a `Map`.
    pub fn as_map(&self) -> Option<&BTreeMap<String, Value>> {
        match self {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// A short name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::String(_) => "a string",
            Value::List(_) => "a list",
            Value::Map(_) => "a map",
        }
    }

    /// Converts to a `serde_json::Value` (non-finite floats become `null`, as JSON
    /// has no representation for them).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::String(s) => serde_json::Value::String(s.clone()),
            Value::List(l) => serde_json::Value::Array(l.iter().map(Value::to_json).collect()),
            Value::Map(m) => {
                serde_json::Value::Object(m.iter().map(|(k, v)| (k.clone(), v.to_json())).collect())
            }
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_json())
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::String(v.to_string())
    }
}

/// The binary (tagged) form of a borrowed value.
#[derive(Serialize)]
enum TaggedRef<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(&'a str),
    List(&'a [Value]),
    Map(&'a BTreeMap<String, Value>),
}

/// The binary (tagged) form of an owned value; variant order matches `TaggedRef`.
#[derive(Deserialize)]
enum TaggedOwned {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    List(Vec<Value>),
    Map(BTreeMap<String, Value>),
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            return match self {
                Value::Null => s.serialize_unit(),
                Value::Bool(b) => s.serialize_bool(*b),
                Value::Int(i) => s.serialize_i64(*i),
                Value::Float(f) => s.serialize_f64(*f),
                Value::String(v) => s.serialize_str(v),
                Value::List(l) => l.serialize(s),
                Value::Map(m) => m.serialize(s),
            };
        }
        let tagged = match self {
            Value::Null => TaggedRef::Null,
            Value::Bool(b) => TaggedRef::Bool(*b),
            Value::Int(i) => TaggedRef::Int(*i),
            Value::Float(f) => TaggedRef::Float(*f),
            Value::String(v) => TaggedRef::String(v),
            Value::List(l) => TaggedRef::List(l),
            Value::Map(m) => TaggedRef::Map(m),
        };
        tagged.serialize(s)
    }
}

/// Deepest nesting of lists and maps a decoded value may have: decoding is
/// recursive, and bytes from a peer or a file must not overflow the stack.
pub const VALUE_DEPTH_MAX: usize = 64;

thread_local! {
    /// How deep the value being decoded on this thread is nested so far.
    static DECODE_DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// One level of decoding; leaving it (also by an error) goes back up.
struct DepthGuard;

impl DepthGuard {
    fn enter<E: serde::de::Error>() -> Result<DepthGuard, E> {
        let depth = DECODE_DEPTH.with(|d| {
            d.set(d.get() + 1);
            d.get()
        });
        let guard = DepthGuard;
        if depth > VALUE_DEPTH_MAX {
            return Err(E::custom(format!(
                "a value nested deeper than {VALUE_DEPTH_MAX} levels"
            )));
        }
        Ok(guard)
    }
}

impl Drop for DepthGuard {
    fn drop(&mut self) {
        DECODE_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let _depth = DepthGuard::enter::<D::Error>()?;
        if !d.is_human_readable() {
            return Ok(match TaggedOwned::deserialize(d)? {
                TaggedOwned::Null => Value::Null,
                TaggedOwned::Bool(b) => Value::Bool(b),
                TaggedOwned::Int(i) => Value::Int(i),
                TaggedOwned::Float(f) => Value::Float(f),
                TaggedOwned::String(s) => Value::String(s),
                TaggedOwned::List(l) => Value::List(l),
                TaggedOwned::Map(m) => Value::Map(m),
            });
        }
        d.deserialize_any(AnyVisitor)
    }
}

struct AnyVisitor;

impl<'de> Visitor<'de> for AnyVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(i64::try_from(v).map_or(Value::Float(v as f64), Value::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Value::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::List(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some((k, v)) = map.next_entry::<String, Value>()? {
            out.insert(k, v);
        }
        Ok(Value::Map(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        let mut m = BTreeMap::new();
        m.insert("lr".to_string(), Value::Float(0.1));
        m.insert("layers".to_string(), Value::Int(3));
        m.insert(
            "opt".to_string(),
            Value::List(vec![Value::from("adam"), Value::Null, Value::Bool(true)]),
        );
        Value::Map(m)
    }

    #[test]
    fn deep_nesting_is_refused_not_a_stack_overflow() {
        // Bincode: List tag (5) then a length of one, a million times over.
        let mut bytes = Vec::new();
        for _ in 0..1_000_000 {
            bytes.extend_from_slice(&[5, 1]);
        }
        bytes.push(0);
        let err = crate::codec::decode::<Value>(&bytes).expect_err("too deep");
        assert!(err.to_string().contains("nested deeper"), "{err}");
        // Just deep enough decodes, and the depth count starts over after an error.
        let mut v = Value::Null;
        for _ in 0..VALUE_DEPTH_MAX - 1 {
            v = Value::List(vec![v]);
        }
        let bytes = crate::codec::encode(&v).expect("encode");
        assert_eq!(crate::codec::decode::<Value>(&bytes).expect("decode"), v);
    }

    #[test]
    fn json_is_natural() {
        let json = serde_json::to_string(&sample()).expect("json");
        assert_eq!(json, r#"{"layers":3,"lr":0.1,"opt":["adam",null,true]}"#);
        let back: Value = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, sample());
    }

    #[test]
    fn binary_round_trips() {
        let bytes = crate::codec::encode(&sample()).expect("encode");
        let back: Value = crate::codec::decode(&bytes).expect("decode");
        assert_eq!(back, sample());
    }

    #[test]
    fn binary_garbage_is_an_error_not_a_panic() {
        for len in 0..64u8 {
            let bytes: Vec<u8> = (0..len)
                .map(|i| i.wrapping_mul(37).wrapping_add(len))
                .collect();
            let _ = crate::codec::decode::<Value>(&bytes);
        }
    }
}
