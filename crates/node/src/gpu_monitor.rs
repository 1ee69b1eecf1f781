//! [`GpuMonitor`]: the NVML calls of a node with GPUs, which block (NVML takes
//! milliseconds, a wedged driver much longer), on a thread of their own (a
//! `SyncArbiter`) so that the node's actors never wait for them. What the answer
//! means (capacity, whose fault an error was) is the agent's decision.
//!
//! Failure: a panic in NVML's wrapper kills only this thread's actor, which the
//! arbiter starts again; the node's request fails and its agent learns nothing
//! from that check (`GpuHealth(None)`), so its capacity stays as it was.

use actix::prelude::*;

use resolute_agent::SlotHealth;

/// Ask NVML about the GPUs with these uuids (a node's slots, in order).
#[derive(Debug, Clone)]
pub struct CheckGpus(pub Vec<String>);

impl Message for CheckGpus {
    type Result = Option<Vec<SlotHealth>>;
}

/// The NVML thread's actor.
#[derive(Debug, Default)]
pub struct GpuMonitor;

impl Actor for GpuMonitor {
    type Context = SyncContext<Self>;
}

impl Handler<CheckGpus> for GpuMonitor {
    type Result = Option<Vec<SlotHealth>>;

    fn handle(
        &mut self,
        CheckGpus(uuids): CheckGpus,
        _ctx: &mut SyncContext<Self>,
    ) -> Self::Result {
        let found = resolute_trial::gpu::discover(false);
        let healthy = resolute_trial::gpu::healthy_slots(&uuids, &found)?;
        Some(
            uuids
                .iter()
                .zip(healthy)
                .map(|(uuid, ok)| {
                    if ok {
                        return SlotHealth::Healthy;
                    }
                    let why = found
                        .gpus
                        .iter()
                        .find(|g| g.uuid == *uuid)
                        .and_then(|g| g.reason.clone())
                        .unwrap_or_else(|| "NVML no longer lists it".to_string());
                    SlotHealth::Failed(why)
                })
                .collect(),
        )
    }
}

/// Starts the NVML thread.
pub fn start() -> Addr<GpuMonitor> {
    SyncArbiter::start(1, || GpuMonitor)
}
