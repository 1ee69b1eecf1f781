//! What the cluster keeps of an experiment once it has ended: Determined's
//! checkpoint policy (`checkpoint_storage.save_experiment_best`,
//! `save_trial_best`, `save_trial_latest`), applied on every replica when the
//! entry that ends the experiment's last running trial applies, so every
//! holder deletes the same blobs; and a user's archive (hidden from lists,
//! kept) and delete (checkpoints and metrics gone).
//!
//! A deleted checkpoint's blob is released on its holders (`Change::Released`,
//! turned by the node into `Effect::DeleteBlob` where it holds a copy). A kept
//! checkpoint is never released, so it never loses its last copy.

use super::*;

impl ClusterState {
    /// Cuts an ended experiment's checkpoints to what its policy keeps, once,
    /// when none of its trials holds slots any more (a stopping trial may still
    /// save one).
    pub(super) fn maybe_collect(&mut self, experiment: ExperimentId, changes: &mut Vec<Change>) {
        let Some(e) = self.experiments.get(&experiment) else {
            return;
        };
        if e.collected || !e.state.is_finished() {
            return;
        }
        let trials: BTreeSet<TrialId> = e.trials.values().copied().collect();
        if trials
            .iter()
            .any(|t| self.trials.get(t).is_some_and(Trial::is_placed))
        {
            return;
        }
        let Some(config) = e.config() else {
            return;
        };
        let policy = &config.checkpoint_storage;
        let (best_n, trial_best_n, trial_latest_n) = (
            policy.save_experiment_best as usize,
            policy.save_trial_best as usize,
            policy.save_trial_latest as usize,
        );
        let smaller = config.searcher.smaller_is_better;
        let mine: Vec<(&String, &Checkpoint)> = self
            .checkpoints
            .iter()
            .filter(|(_, c)| trials.contains(&c.trial))
            .collect();
        let better = |a: &&(&String, &Checkpoint), b: &&(&String, &Checkpoint)| {
            let (x, y) = (
                a.1.validation.unwrap_or(f64::NAN),
                b.1.validation.unwrap_or(f64::NAN),
            );
            let by = if smaller {
                x.total_cmp(&y)
            } else {
                y.total_cmp(&x)
            };
            // Ties: the later checkpoint first, then the uuid (deterministic).
            by.then(b.1.steps_completed.cmp(&a.1.steps_completed))
                .then(a.0.cmp(b.0))
        };
        let mut keep: BTreeSet<String> = BTreeSet::new();
        let mut scored: Vec<&(&String, &Checkpoint)> = mine
            .iter()
            .filter(|(_, c)| c.validation.is_some())
            .collect();
        scored.sort_by(better);
        keep.extend(scored.iter().take(best_n).map(|(u, _)| (*u).clone()));
        for trial in &trials {
            let mut of_trial: Vec<&(&String, &Checkpoint)> = scored
                .iter()
                .copied()
                .filter(|(_, c)| c.trial == *trial)
                .collect();
            of_trial.sort_by(better);
            keep.extend(
                of_trial
                    .iter()
                    .take(trial_best_n)
                    .map(|(u, _)| (*u).clone()),
            );
            let mut latest: Vec<&(&String, &Checkpoint)> =
                mine.iter().filter(|(_, c)| c.trial == *trial).collect();
            latest.sort_by(|a, b| {
                b.1.steps_completed
                    .cmp(&a.1.steps_completed)
                    .then(a.0.cmp(b.0))
            });
            keep.extend(
                latest
                    .iter()
                    .take(trial_latest_n)
                    .map(|(u, _)| (*u).clone()),
            );
        }
        let drop: Vec<String> = mine
            .iter()
            .map(|(u, _)| (*u).clone())
            .filter(|u| !keep.contains(u))
            .collect();
        if let Some(e) = experiment_mut(&mut self.experiments, &mut self.touched, experiment) {
            e.collected = true;
        }
        self.drop_checkpoints(drop, changes);
    }

    /// Removes checkpoints and releases their blobs on their holders; a
    /// trial whose latest checkpoint went falls back to its newest kept one.
    fn drop_checkpoints(&mut self, uuids: Vec<String>, changes: &mut Vec<Change>) {
        let mut trials = BTreeSet::new();
        for uuid in uuids {
            let Some(c) = self.checkpoints.remove(&uuid) else {
                continue;
            };
            trials.insert(c.trial);
            changes.push(Change::Checkpoint { uuid: uuid.clone() });
            changes.push(Change::Released {
                digest: uuid,
                holders: c.holders.into_iter().collect(),
            });
        }
        // Each trial's newest kept checkpoint (the smaller uuid on a tie), in
        // one pass.
        let mut newest: BTreeMap<TrialId, (u64, String)> = BTreeMap::new();
        for (uuid, c) in self
            .checkpoints
            .iter()
            .filter(|(_, c)| trials.contains(&c.trial))
        {
            let better = newest.get(&c.trial).is_none_or(|(steps, u)| {
                c.steps_completed > *steps || (c.steps_completed == *steps && uuid < u)
            });
            if better {
                newest.insert(c.trial, (c.steps_completed, uuid.clone()));
            }
        }
        for trial in trials {
            let newest = newest.remove(&trial).map(|(_, u)| u);
            if let Some(t) = trial_mut(&mut self.trials, &mut self.touched, trial) {
                if t.latest_checkpoint
                    .as_ref()
                    .is_some_and(|l| !self.checkpoints.contains_key(l))
                {
                    t.latest_checkpoint = newest;
                }
            }
            self.refresh_replication(trial);
        }
    }

    /// Archives (hides from lists, keeps everything) or unarchives an
    /// experiment that has ended.
    pub(super) fn archive(&mut self, experiment: ExperimentId, archived: bool) -> Reply {
        let Some(e) = experiment_mut(&mut self.experiments, &mut self.touched, experiment) else {
            return rejected(format!("unknown experiment {experiment}"));
        };
        if !e.state.is_finished() {
            return rejected(format!(
                "experiment {experiment} is {:?}: only an ended experiment is archived",
                e.state
            ));
        }
        e.archived = archived;
        Reply::Ok
    }

    /// Deletes an ended experiment whose trials hold no slots: its trials,
    /// their checkpoints (blobs released), its model directory unless another
    /// experiment has the same, and its metrics (the tracking store drops the
    /// rows of records that are gone).
    pub(super) fn delete_experiment(
        &mut self,
        experiment: ExperimentId,
        changes: &mut Vec<Change>,
    ) -> Reply {
        let Some(e) = self.experiments.get(&experiment) else {
            return rejected(format!("unknown experiment {experiment}"));
        };
        if !e.state.is_finished() {
            return rejected(format!(
                "experiment {experiment} is {:?}: cancel it first",
                e.state
            ));
        }
        let trials: BTreeSet<TrialId> = e.trials.values().copied().collect();
        if trials
            .iter()
            .any(|t| self.trials.get(t).is_some_and(Trial::is_placed))
        {
            return rejected(format!(
                "experiment {experiment} still has trials stopping: try again"
            ));
        }
        let uuids: Vec<String> = self
            .checkpoints
            .iter()
            .filter(|(_, c)| trials.contains(&c.trial))
            .map(|(u, _)| u.clone())
            .collect();
        self.drop_checkpoints(uuids, changes);
        for id in &trials {
            if let Some(t) = self.trials.remove(id) {
                // The tracking store drops this trial's reports with it.
                self.reports_applied = self.reports_applied.saturating_sub(t.reports);
            }
            self.live.remove(id);
            self.touched.trial(*id);
            self.refresh_replication(*id);
        }
        if let Some(e) = self.experiments.remove(&experiment) {
            self.release_model(&e.model_digest, changes);
        }
        self.touched.experiment(experiment);
        self.placement_dirty = true;
        self.replication_generation += 1;
        Reply::Ok
    }
}
