//! The deterministic simulator.
//!
//! Many real nodes (each a [`resolute_agent::Driver`]: the unchanged
//! `core::Node` and node agent that production runs) share one virtual clock
//! with simulated stores ([`resolute_storage::SimStore`]), network, GPUs and
//! training processes. One seed
//! drives everything; the same seed and binary replay the same run, event for
//! event (the trace digest proves it). Faults are injected from the scenario's
//! plan, invariants are checked as the run goes, and a liveness phase heals every
//! fault and requires every experiment to finish.
//!
//! - [`scenario`]: the TOML format.
//! - [`world`]: the event loop and everything simulated, one module per part.
//! - `curve`: learning curves with a known optimum.
//! - [`report`]: what a run reports, and the Chrome trace.

mod curve;
pub mod report;
pub mod scenario;
pub mod world;

pub use report::Report;
pub use scenario::Scenario;
pub use world::{run, Options};
