//! The deterministic simulator.
//!
//! Many real [`resolute_core::Node`]s run on one virtual clock with simulated
//! stores ([`resolute_storage::SimStore`]), network, GPUs and trials. One seed
//! drives everything; the same seed and binary replay the same run, event for
//! event (the trace digest proves it). Faults are injected from the scenario's
//! plan, invariants are checked as the run goes, and a liveness phase heals every
//! fault and requires every experiment to finish.
//!
//! - [`scenario`]: the TOML format.
//! - [`world`]: the event loop and everything simulated.
//! - [`report`]: what a run reports, and the Chrome trace.

pub mod report;
pub mod scenario;
mod trial;
pub mod world;

pub use report::Report;
pub use scenario::Scenario;
pub use world::{run, Options};
