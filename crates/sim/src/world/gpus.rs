//! Simulated GPUs: a `gpu_failure` fault breaks one GPU of a node (one running
//! a trial when there is one): the process on it dies with an error, and NVML
//! reports the GPU failed until it recovers. What the node does about it (ask
//! NVML, shrink its capacity, requeue the trial without a charge) is its agent's
//! decision, as in production.

use resolute_agent::{Event, SlotHealth};

use super::{Occurrence, World};

impl World<'_> {
    /// One GPU of `node` fails (and recovers after `recover_after_s`).
    pub(super) fn gpu_failure(&mut self, node: usize, recover_after_s: Option<u64>) {
        let n = &self.nodes[node];
        if n.down || n.gone || n.driver.is_none() {
            return;
        }
        let healthy: Vec<usize> = (0..n.gpu_failed.len())
            .filter(|g| !n.gpu_failed[*g])
            .collect();
        let on_gpu = |g: usize| {
            self.procs
                .by_key
                .iter()
                .find(|(_, p)| p.node == node && p.gpus.contains(&g))
                .map(|(k, p)| (*k, p.trial))
        };
        let gpu = healthy
            .iter()
            .copied()
            .find(|g| on_gpu(*g).is_some())
            .or(healthy.first().copied());
        let Some(gpu) = gpu else {
            return;
        };
        let victim = on_gpu(gpu);
        self.stats.gpu_failures += 1;
        self.nodes[node].gpu_failed[gpu] = true;
        self.note(format!(
            "{} GPU {gpu} failed (trial on it: {:?})",
            self.nodes[node].name,
            victim.map(|v| v.1)
        ));
        let id = self.nodes[node].id;
        self.stats.marker(self.now, id, "GPU failed");
        if let Some((key, _)) = victim {
            self.fail_process(key, "CUDA error: uncorrectable ECC error encountered");
        }
        if let Some(s) = recover_after_s {
            self.schedule(self.now + s * 1000, Occurrence::GpuRecovered { node, gpu });
        }
    }

    /// A failed GPU works again (its node notices at its next health check).
    pub(super) fn gpu_recovered(&mut self, node: usize, gpu: usize) {
        if let Some(f) = self.nodes[node].gpu_failed.get_mut(gpu) {
            *f = false;
            let name = self.nodes[node].name.clone();
            self.note(format!("{name} GPU {gpu} recovered"));
        }
    }

    /// NVML's answer to a node's health check.
    pub(super) fn gpu_answer(&mut self, node: usize, epoch: u64) {
        if self.nodes[node].epoch != epoch || self.nodes[node].down {
            return;
        }
        let health = self.nodes[node]
            .gpu_failed
            .iter()
            .map(|failed| {
                if *failed {
                    SlotHealth::Failed("uncorrected ECC errors".into())
                } else {
                    SlotHealth::Healthy
                }
            })
            .collect();
        self.step(node, Event::GpuHealth(Some(health)));
    }
}
