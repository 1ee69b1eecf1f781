//! Types shared by every Resolute crate.
//!
//! - [`value`]: a JSON-like value with deterministic (sorted) maps, used for
//!   hyperparameter samples, metrics and free-form config sections.
//! - [`yaml`]: a YAML reader that keeps the line and column of every node, so that
//!   configuration errors can point at the exact place in the user's file.
//! - [`config`]: Determined's experiment configuration, parsed, validated and
//!   normalized (defaults filled in).
//! - [`codec`]: the one place that decides how values become bytes.

pub mod codec;
pub mod config;
pub mod value;
pub mod yaml;

pub use value::Value;
