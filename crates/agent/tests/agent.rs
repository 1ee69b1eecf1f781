//! The node agent through its driver: a one-node cluster whose writes are
//! acknowledged at once, fed trial reports, fetch results and NVML answers by
//! hand, as a shell would.

use std::collections::BTreeMap;

use resolute_agent::{
    Action, AgentConfig, Driver, Event, ProcessExit, SlotHealth, TrialReport, BLOB_ORPHAN_GRACE_MS,
    BLOB_SWEEP_MS, DISK_CHECK_MS, FETCH_ATTEMPTS, FETCH_RETRY_MAX_MS, GPU_HEALTH_CHECK_MS,
    KILL_GRACE_DEFAULT_MS,
};
use resolute_core::command::{Command, Control, MetricKind, ProposalId, Reply, TrialOutcome};
use resolute_core::log_store::Recovered;
use resolute_core::state::TrialState;
use resolute_core::{NodeConfig, NodeInfo};
use resolute_types::Value;

const TICK_MS: u64 = 100;

/// A random search of `trials` one-slot trials of 100 batches.
fn random(trials: u32, model_digest: &str) -> Command {
    experiment(
        &format!("{{name: random, metric: loss, max_trials: {trials}, max_concurrent_trials: {trials}, max_time: 100, time_metric: batches}}"),
        model_digest,
    )
}

fn experiment(searcher: &str, model_digest: &str) -> Command {
    Command::ExperimentCreated {
        config_yaml: format!(
            "entrypoint: python3 train.py\nhyperparameters: {{lr: {{type: double, minval: 0.01, maxval: 0.1}}}}\nsearcher: {searcher}\nenvironment: {{environment_variables: [MY_VAR=1]}}\n"
        ),
        overrides: vec![],
        owner: "o".into(),
        model_digest: model_digest.into(),
        default_seed: 3,
    }
}

/// One node, leader of its own cluster, whose shell acknowledges every write at
/// once and keeps every other action for the test to look at.
struct Shell {
    driver: Driver,
    now: u64,
    seen: Vec<Action>,
    next_client: u128,
    /// The notes for an operator.
    notes: Vec<String>,
    /// Writes are held back, not acknowledged (`release` acknowledges them).
    hold: bool,
    held: Option<u64>,
}

impl Shell {
    fn new(gpus: &[&str], cpu_slots: u32) -> Shell {
        Shell::with_low_water(gpus, cpu_slots, 0)
    }

    /// A node that watches its disk against a low-water mark of `bytes`.
    fn with_low_water(gpus: &[&str], cpu_slots: u32, bytes: u64) -> Shell {
        Shell::with(gpus, cpu_slots, bytes, Vec::new())
    }

    /// A node whose store holds `blobs` when it starts.
    fn with(gpus: &[&str], cpu_slots: u32, bytes: u64, blobs: Vec<String>) -> Shell {
        let gpus: Vec<String> = gpus.iter().map(|g| g.to_string()).collect();
        let slots = if gpus.is_empty() {
            cpu_slots
        } else {
            gpus.len() as u32
        };
        let info = NodeInfo {
            site: "a".into(),
            slots,
            ..Default::default()
        };
        let node = NodeConfig::new(1, info);
        let mut agent = AgentConfig::new(1, gpus, cpu_slots, 1 << 64);
        agent.disk_low_water_bytes = bytes;
        let (driver, first) =
            Driver::new(node, agent, &Recovered::default(), true, blobs, 0).expect("start");
        let mut shell = Shell {
            driver,
            now: 0,
            seen: Vec::new(),
            next_client: 1,
            notes: Vec::new(),
            hold: false,
            held: None,
        };
        shell.carry(first);
        for _ in 0..30 {
            shell.tick();
        }
        assert!(
            shell.driver.node().is_leader(),
            "a one-node cluster elects itself"
        );
        shell
    }

    /// Steps the driver, acknowledging writes at once.
    fn step(&mut self, event: Event) {
        let actions = self.driver.step(self.now, event);
        self.carry(actions);
    }

    fn carry(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Persist { seq, .. } if seq > 0 && self.hold => self.held = Some(seq),
                Action::Persist { seq, .. } if seq > 0 => self.step(Event::Persisted { seq }),
                Action::Persist { .. } => {}
                Action::Note(text) => self.notes.push(text),
                other => self.seen.push(other),
            }
        }
    }

    /// Acknowledges the writes held back (each acknowledgement covers every
    /// earlier write), and acknowledges at once from now on.
    fn release(&mut self) {
        self.hold = false;
        if let Some(seq) = self.held.take() {
            self.step(Event::Persisted { seq });
        }
    }

    fn tick(&mut self) {
        self.now += TICK_MS;
        self.step(Event::Tick);
    }

    /// Ticks until `ms` have passed.
    fn wait(&mut self, ms: u64) {
        let until = self.now + ms;
        while self.now < until {
            self.tick();
        }
    }

    /// A client's proposal; its reply.
    fn propose(&mut self, command: Command) -> Reply {
        let id = ProposalId(self.next_client);
        self.next_client += 1;
        self.step(Event::Propose {
            id,
            command,
            user: None,
        });
        let reply = self.seen.iter().find_map(|a| match a {
            Action::Reply { id: r, result } if *r == id => Some(result.clone()),
            _ => None,
        });
        match reply {
            Some(Ok(r)) => r,
            other => panic!("no reply to {id:?}: {other:?}"),
        }
    }

    /// Takes the actions seen so far.
    fn take(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.seen)
    }

    fn launches(actions: &[Action]) -> Vec<resolute_agent::LaunchSpec> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Launch(spec) => Some((**spec).clone()),
                _ => None,
            })
            .collect()
    }

    fn report(&mut self, report: TrialReport) {
        self.step(Event::Trial(report));
    }

    /// A one-trial search whose trial launches here and starts.
    fn launch_one(&mut self) -> resolute_agent::LaunchSpec {
        self.propose(random(1, ""));
        let l = Shell::launches(&self.take()).remove(0);
        self.report(TrialReport::Launched {
            trial: l.trial,
            incarnation: l.incarnation,
        });
        l
    }

    /// The process of an incarnation exited.
    fn exited(&mut self, trial: u64, incarnation: u64, code: Option<i32>, signal: Option<i32>) {
        self.report(TrialReport::Exited {
            trial,
            incarnation,
            exit: exit(code, signal),
        });
    }

    fn trial_state(&self, trial: u64) -> TrialState {
        self.driver.node().state().trials[&trial].state.clone()
    }
}

fn exit(code: Option<i32>, signal: Option<i32>) -> ProcessExit {
    ProcessExit {
        code,
        signal,
        last_lines: vec!["last words".into()],
    }
}

#[test]
fn a_trial_placed_here_launches_on_free_slots_with_its_environment() {
    let mut s = Shell::new(&[], 2);
    s.propose(random(3, ""));
    let launched = Shell::launches(&s.take());
    assert_eq!(launched.len(), 2, "two slots, three trials: two launch");
    let mut slots: Vec<usize> = launched.iter().flat_map(|l| l.slots.clone()).collect();
    slots.sort_unstable();
    assert_eq!(slots, vec![0, 1], "each on its own slot");
    let l = &launched[0];
    assert_eq!(l.entrypoint, "python3 train.py");
    assert_eq!(l.env.get("MY_VAR").map(String::as_str), Some("1"));
    assert_eq!(l.target, Some(100));
    assert_eq!(l.time_metric, "batches");
    assert!(l.gpus.is_empty() && l.gang.is_none());
    s.report(TrialReport::Launched {
        trial: l.trial,
        incarnation: l.incarnation,
    });
    assert!(matches!(s.trial_state(l.trial), TrialState::Running { .. }));
    // It completes: its slot frees and the third trial launches there.
    s.report(TrialReport::Exited {
        trial: l.trial,
        incarnation: l.incarnation,
        exit: exit(Some(0), None),
    });
    // The trial reached no target (no progress was reported): requeued, so
    // it takes the free slot again, or the third one does.
    let next = Shell::launches(&s.take());
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!(next[0].slots, l.slots, "the freed slot");
}

#[test]
fn a_launch_waits_for_its_model_directory_and_gives_up_after_the_last_try() {
    let mut s = Shell::new(&[], 1);
    s.propose(random(1, "m0del"));
    let first = s.take();
    assert!(
        Shell::launches(&first).is_empty(),
        "nothing unverified reaches a trial"
    );
    let fetches = |actions: &[Action]| {
        actions
            .iter()
            .filter(|a| matches!(a, Action::Fetch { digest, .. } if digest == "m0del"))
            .count()
    };
    assert_eq!(fetches(&first), 1, "{first:?}");
    for attempt in 1..FETCH_ATTEMPTS {
        s.step(Event::Fetched {
            digest: "m0del".into(),
            result: Err("no holder reachable".into()),
        });
        assert_eq!(fetches(&s.take()), 0, "no retry before the pause");
        s.wait(FETCH_RETRY_MAX_MS);
        assert_eq!(fetches(&s.take()), 1, "try {} after a pause", attempt + 1);
    }
    s.step(Event::Fetched {
        digest: "m0del".into(),
        result: Err("no holder reachable".into()),
    });
    // Given up: an error charged to the trial (bounded by max_restarts), which
    // is placed again; this time the model directory arrives.
    let t = &s.driver.node().state().trials[&1];
    assert_eq!(t.restarts, 1, "{:?}", t.state);
    s.wait(TICK_MS);
    s.step(Event::Fetched {
        digest: "m0del".into(),
        result: Ok(()),
    });
    let launched = Shell::launches(&s.take());
    assert_eq!(launched.len(), 1);
    assert_eq!(launched[0].model_digest.as_deref(), Some("m0del"));
}

#[test]
fn a_kill_is_sigterm_then_sigkill_after_the_grace_and_counts_as_a_stop() {
    let mut s = Shell::new(&[], 1);
    let l = s.launch_one();
    let (trial, incarnation) = (l.trial, l.incarnation);
    s.take();
    s.propose(Command::ExperimentControl {
        experiment: 1,
        action: Control::Kill,
    });
    let seen = s.take();
    assert!(
        seen.contains(&Action::Terminate { trial, incarnation }),
        "{seen:?}"
    );
    s.wait(KILL_GRACE_DEFAULT_MS - 2 * TICK_MS);
    assert!(!s.take().contains(&Action::Kill { trial, incarnation }));
    s.wait(3 * TICK_MS);
    assert!(s.take().contains(&Action::Kill { trial, incarnation }));
    s.report(TrialReport::Exited {
        trial,
        incarnation,
        exit: exit(None, Some(9)),
    });
    assert_eq!(
        s.trial_state(trial),
        TrialState::Done(TrialOutcome::Stopped)
    );
    assert_eq!(s.driver.node().state().trials[&trial].restarts, 0);
}

#[test]
fn a_stop_before_the_process_exists_starts_nothing() {
    let mut s = Shell::new(&[], 1);
    s.propose(random(1, "m0del"));
    s.take();
    // Cancelled while its model directory is on its way.
    s.propose(Command::ExperimentControl {
        experiment: 1,
        action: Control::Cancel,
    });
    s.step(Event::Fetched {
        digest: "m0del".into(),
        result: Ok(()),
    });
    assert!(Shell::launches(&s.take()).is_empty());
    assert_eq!(s.trial_state(1), TrialState::Done(TrialOutcome::Stopped));
}

/// Trains a launched incarnation to `steps` with `loss`, asks whether to go
/// on, and returns the answer.
fn reach(s: &mut Shell, trial: u64, incarnation: u64, steps: u64, loss: f64) -> Option<u64> {
    let mut metrics = BTreeMap::new();
    metrics.insert("loss".to_string(), Value::Float(loss));
    metrics.insert("batches".to_string(), Value::Int(steps as i64));
    s.report(TrialReport::Metrics {
        trial,
        incarnation,
        kind: MetricKind::Validation,
        steps_completed: steps,
        metrics,
    });
    // At its target it asks; the answer waits for that validation to apply.
    s.report(TrialReport::Reached {
        trial,
        incarnation,
        steps,
    });
    assert!(
        !s.seen.iter().any(|a| matches!(a, Action::Proceed { .. })),
        "no answer before the validation applied"
    );
    s.tick();
    let answers: Vec<Option<u64>> = s
        .seen
        .iter()
        .filter_map(|a| match a {
            Action::Proceed { target, .. } => Some(*target),
            _ => None,
        })
        .collect();
    assert_eq!(answers.len(), 1, "{:?}", s.seen);
    answers[0]
}

#[test]
fn a_trial_promoted_at_its_target_goes_on_in_the_same_process() {
    // Promotion ASHA, one trial at a time, rungs at 10 and 30 batches: the first
    // two trials pause at the first rung; the third arrives best of three and is
    // promoted on arrival (the top third), so it trains on without a relaunch.
    let mut s = Shell::new(&[], 1);
    s.propose(experiment(
        "{name: asha, metric: loss, num_rungs: 2, max_trials: 3, divisor: 3, max_time: 30, time_metric: batches, max_concurrent_trials: 1}",
        "",
    ));
    for (loss, promoted) in [(0.5, false), (0.4, false), (0.1, true)] {
        let l = Shell::launches(&s.take()).remove(0);
        let (trial, incarnation) = (l.trial, l.incarnation);
        assert_eq!(l.target, Some(10));
        s.report(TrialReport::Launched { trial, incarnation });
        let answer = reach(&mut s, trial, incarnation, 10, loss);
        if !promoted {
            assert_eq!(answer, None, "paused at the rung");
            assert!(s.take().contains(&Action::Preempt { trial, incarnation }));
            s.report(TrialReport::Exited {
                trial,
                incarnation,
                exit: exit(Some(0), None),
            });
            assert_eq!(s.trial_state(trial), TrialState::Paused);
            continue;
        }
        assert_eq!(answer, Some(30), "it trains on to the next rung");
        s.take();
        let t = &s.driver.node().state().trials[&trial];
        assert_eq!(t.incarnation, incarnation, "the same incarnation");
        assert!(matches!(t.state, TrialState::Running { .. }));
        // At the last rung it is told to finish.
        assert_eq!(reach(&mut s, trial, incarnation, 30, loss), None);
        s.report(TrialReport::Exited {
            trial,
            incarnation,
            exit: exit(Some(0), None),
        });
        // Its last rung's validation also stopped it (the searcher is done
        // with it): a stop, and no relaunch.
        assert!(matches!(s.trial_state(trial), TrialState::Done(_)));
        assert_eq!(s.driver.node().state().unfinished_exits, 0);
    }
}

#[test]
fn an_error_on_a_gpu_that_failed_is_not_the_trials_fault() {
    let mut s = Shell::new(&["GPU-a", "GPU-b"], 0);
    let l = s.launch_one();
    assert_eq!(l.gpus, vec!["GPU-a".to_string()]);
    let (trial, incarnation) = (l.trial, l.incarnation);
    s.exited(trial, incarnation, Some(1), None);
    // The exit waits for NVML.
    assert!(s.take().contains(&Action::CheckGpus));
    assert!(matches!(s.trial_state(trial), TrialState::Running { .. }));
    s.step(Event::GpuHealth(Some(vec![
        SlotHealth::Failed("uncorrected ECC errors".into()),
        SlotHealth::Healthy,
    ])));
    let state = s.driver.node().state();
    assert_eq!(
        state.nodes[&1].info.slots, 1,
        "capacity without the failed GPU"
    );
    assert_eq!(state.trials[&trial].restarts, 0, "no restart charged");
    assert_eq!(s.driver.agent().gpu_failures().len(), 1);
    // It runs again on the healthy GPU.
    let again = Shell::launches(&s.take());
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].gpus, vec!["GPU-b".to_string()]);
    // The GPU comes back at the next periodic check.
    s.wait(GPU_HEALTH_CHECK_MS);
    assert!(s.take().contains(&Action::CheckGpus));
    s.step(Event::GpuHealth(Some(vec![
        SlotHealth::Healthy,
        SlotHealth::Healthy,
    ])));
    assert_eq!(s.driver.node().state().nodes[&1].info.slots, 2);
}

#[test]
fn an_error_on_a_healthy_gpu_is_charged() {
    let mut s = Shell::new(&["GPU-a"], 0);
    let l = s.launch_one();
    let (trial, incarnation) = (l.trial, l.incarnation);
    s.exited(trial, incarnation, Some(1), None);
    s.step(Event::GpuHealth(Some(vec![SlotHealth::Healthy])));
    assert_eq!(s.driver.node().state().trials[&trial].restarts, 1);
}

#[test]
fn exits_are_classified_from_the_code_the_signal_and_what_was_asked() {
    // (exit code, signal, stopped first, early exit) -> outcome
    type Case = (
        Option<i32>,
        Option<i32>,
        bool,
        bool,
        fn(&TrialOutcome) -> bool,
    );
    let cases: [Case; 6] = [
        (Some(0), None, false, false, |o| {
            *o == TrialOutcome::Completed
        }),
        (Some(0), None, true, false, |o| *o == TrialOutcome::Stopped),
        (None, Some(15), true, false, |o| *o == TrialOutcome::Stopped),
        (
            None,
            Some(9),
            false,
            false,
            |o| matches!(o, TrialOutcome::Errored { message, exit_code: None } if message.starts_with("killed by signal 9")),
        ),
        (Some(3), None, false, false, |o| {
            matches!(
                o,
                TrialOutcome::Errored {
                    exit_code: Some(3),
                    ..
                }
            )
        }),
        (Some(1), None, false, true, |o| {
            *o == TrialOutcome::InvalidHyperparameters
        }),
    ];
    for (i, (code, signal, stopped, invalid_hp, expect)) in cases.into_iter().enumerate() {
        let mut s = Shell::new(&[], 1);
        let l = s.launch_one();
        let (trial, incarnation) = (l.trial, l.incarnation);
        if stopped {
            s.propose(Command::ExperimentControl {
                experiment: 1,
                action: Control::Cancel,
            });
            assert!(s.take().contains(&Action::Preempt { trial, incarnation }));
        }
        if invalid_hp {
            s.report(TrialReport::EarlyExit {
                trial,
                incarnation,
                reason: resolute_agent::EarlyExit::InvalidHyperparameters,
            });
        }
        s.exited(trial, incarnation, code, signal);
        let settled = s.take().into_iter().find_map(|a| match a {
            Action::Settled {
                command: Command::TrialExited { outcome, .. },
                ..
            } => Some(outcome),
            _ => None,
        });
        let outcome = settled.unwrap_or_else(|| panic!("case {i}: no exit reported"));
        assert!(expect(&outcome), "case {i}: {outcome:?}");
    }
}

#[test]
fn a_node_low_on_disk_records_it_refuses_a_launch_without_a_charge_and_recovers() {
    const MIB: u64 = 1024 * 1024;
    let mut s = Shell::with_low_water(&[], 2, 100 * MIB);
    assert!(
        s.take().contains(&Action::CheckDisk),
        "checked from the start"
    );
    s.step(Event::DiskSpace {
        free_bytes: Some(500 * MIB),
    });
    assert!(s.driver.node().state().nodes[&1].disk_low.is_none());
    // The experiment's entry and the node's word that its disk is low are
    // appended in that order before either applies: the trial is placed here,
    // and its launch arrives at an agent that knows better.
    s.hold = true;
    let id = ProposalId(999);
    s.step(Event::Propose {
        id,
        command: random(1, ""),
        user: None,
    });
    s.wait(DISK_CHECK_MS);
    assert!(
        s.take().contains(&Action::CheckDisk),
        "checked every few seconds"
    );
    s.step(Event::DiskSpace {
        free_bytes: Some(40 * MIB),
    });
    s.release();
    assert!(
        Shell::launches(&s.take()).is_empty(),
        "no launch below the mark"
    );
    assert!(
        s.notes.iter().any(|n| n.contains("not launched here")
            && n.contains("40 MiB free, under its low-water mark of 100 MiB")),
        "{:?}",
        s.notes
    );
    let state = s.driver.node().state();
    let low = state.nodes[&1].disk_low.expect("recorded low");
    assert_eq!(low.free_bytes, 40 * MIB);
    let trial = *state.trials.keys().next().expect("a trial");
    assert_eq!(
        s.trial_state(trial),
        TrialState::Queued,
        "back to the queue"
    );
    assert_eq!(state.trials[&trial].restarts, 0, "no restart charged");
    // Just above the mark is not enough (no flapping); 10% above it is.
    s.wait(DISK_CHECK_MS);
    s.step(Event::DiskSpace {
        free_bytes: Some(105 * MIB),
    });
    assert!(s.driver.node().state().nodes[&1].disk_low.is_some());
    assert!(Shell::launches(&s.take()).is_empty());
    s.wait(DISK_CHECK_MS);
    s.step(Event::DiskSpace {
        free_bytes: Some(111 * MIB),
    });
    assert!(s.driver.node().state().nodes[&1].disk_low.is_none());
    assert_eq!(
        Shell::launches(&s.take()).len(),
        1,
        "the trial launches now"
    );
}

#[test]
fn a_blob_no_record_names_is_deleted_after_the_grace_and_a_named_one_kept() {
    // A store as a crash leaves it: the experiment's model directory, a
    // checkpoint whose `CheckpointSaved` never committed, and nothing else.
    let blobs = vec!["model".to_string(), "lost".to_string()];
    let mut s = Shell::with(&[], 1, 0, blobs);
    s.propose(random(1, "model"));
    let l = Shell::launches(&s.take()).remove(0);
    let deleted = |s: &mut Shell| -> Vec<String> {
        s.take()
            .into_iter()
            .filter_map(|a| match a {
                Action::DeleteBlob { digest } => Some(digest),
                _ => None,
            })
            .collect()
    };
    s.wait(BLOB_ORPHAN_GRACE_MS);
    assert!(
        deleted(&mut s).is_empty(),
        "nothing before the grace is over"
    );
    s.wait(2 * BLOB_SWEEP_MS);
    assert_eq!(deleted(&mut s), vec!["lost".to_string()]);
    assert!(
        s.notes
            .iter()
            .any(|n| n.contains("blob lost was in no record")),
        "{:?}",
        s.notes
    );
    // A checkpoint the log records here stays for as long as it is recorded,
    // and so does the model directory of an experiment the state has.
    s.report(TrialReport::Launched {
        trial: l.trial,
        incarnation: l.incarnation,
    });
    s.report(TrialReport::CheckpointSaved {
        trial: l.trial,
        incarnation: l.incarnation,
        uuid: "kept".into(),
        steps_completed: 10,
        size: 1,
    });
    assert!(s.driver.node().state().checkpoints.contains_key("kept"));
    s.wait(BLOB_ORPHAN_GRACE_MS + 2 * BLOB_SWEEP_MS);
    assert!(
        deleted(&mut s).is_empty(),
        "the model and the checkpoint stay"
    );
}

#[test]
fn an_ended_experiments_model_directory_is_recorded_by_a_node_chosen_to_keep_it() {
    // No slots: the trial stays queued and the experiment ends when canceled.
    let mut s = Shell::with(&[], 0, 0, vec!["model".to_string()]);
    let id = match s.propose(random(1, "model")) {
        Reply::ExperimentCreated { experiment, .. } => experiment,
        other => panic!("{other:?}"),
    };
    s.wait(10 * TICK_MS);
    assert!(
        s.driver.node().state().models.is_empty(),
        "an unfinished experiment's directory is on every node, unrecorded"
    );
    s.propose(Command::ExperimentControl {
        experiment: id,
        action: Control::Cancel,
    });
    s.wait(10 * TICK_MS);
    let holders = s.driver.node().state().models.get("model").cloned();
    assert_eq!(holders, Some([1].into()), "the only node keeps it");
    // Recorded: the sweep leaves it alone.
    s.wait(BLOB_ORPHAN_GRACE_MS + 2 * BLOB_SWEEP_MS);
    assert!(
        !s.take()
            .iter()
            .any(|a| matches!(a, Action::DeleteBlob { .. })),
        "the kept model directory stays"
    );
}
