//! The store's writer on a thread of its own, so that SQLite's writes (and a
//! WAL checkpoint's fsync) never hold up the node: the node takes the rows
//! from its state ([`Slice::of`]) and hands them over with the batches; the
//! thread writes them in order, one transaction per hand-over.
//!
//! The channel is bounded (`WRITES_QUEUED_MAX`): a store that cannot keep up
//! slows the node down rather than grow a queue. A write that fails (a full
//! disk) is kept and tried again before the next one; past
//! `FAILED_WRITES_MAX` they are given up and the node is told to resync the
//! store from its state ([`Status::resync_wanted`]), which records the gap.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use resolute_core::track::TrackBatch;

use crate::{Error, Slice, Tracker};

/// Hand-overs queued at most before the node waits for the writer.
pub const WRITES_QUEUED_MAX: usize = 64;
/// Failed writes kept for another try before they are given up.
pub const FAILED_WRITES_MAX: usize = 1_000;

/// What the node sees of its writer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// The index the store's rows cover.
    pub applied_index: u64,
    /// The snapshot index past which the store wants a peer's copy.
    pub wants_copy: Option<u64>,
    /// The last write's error, while writes fail.
    pub failed: Option<String>,
    /// Writes were given up: rewrite every row from the state.
    pub resync_wanted: bool,
    /// Microseconds the writer spent writing, in all.
    pub busy_us: u64,
    /// Reports it was handed, in all.
    pub reports: u64,
}

enum Job {
    Write {
        batches: Vec<TrackBatch>,
        slice: Slice,
        durable: bool,
        done: Option<SyncSender<()>>,
    },
    Install {
        copy: PathBuf,
        at_least: u64,
        done: SyncSender<Result<Option<u64>, String>>,
    },
}

/// The writer thread's handle (the thread ends when it is dropped).
pub struct Background {
    jobs: Option<SyncSender<Job>>,
    status: Arc<Mutex<Status>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Starts the writer thread for `tracker`.
    pub fn spawn(tracker: Tracker) -> Result<Background, Error> {
        let status = Arc::new(Mutex::new(Status {
            applied_index: tracker.applied_index(),
            wants_copy: tracker.wants_copy(),
            ..Status::default()
        }));
        let (tx, rx) = sync_channel(WRITES_QUEUED_MAX);
        let shared = status.clone();
        let path = tracker.path().to_path_buf();
        let thread = std::thread::Builder::new()
            .name("tracking".into())
            .spawn(move || run(tracker, rx, shared))
            .map_err(|source| Error::Io { path, source })?;
        Ok(Background {
            jobs: Some(tx),
            status,
            thread: Some(thread),
        })
    }

    /// What the writer reports now.
    pub fn status(&self) -> Status {
        self.status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn send(&self, job: Job) {
        if let Some(jobs) = &self.jobs {
            // A writer that is gone has already said why (its status).
            let _ = jobs.send(job);
        }
    }

    /// Hands batches and their rows over to be written.
    pub fn write(&self, batches: Vec<TrackBatch>, slice: Slice) {
        self.send(Job::Write {
            batches,
            slice,
            durable: false,
            done: None,
        });
    }

    /// Hands them over and waits until they, and everything before them, are
    /// written; with `durable`, fsynced too (before a snapshot compacts the
    /// log). Without: before a client that was told its proposal applied may
    /// query the store.
    pub fn write_and_wait(&self, batches: Vec<TrackBatch>, slice: Slice, durable: bool) {
        let (done, wait) = sync_channel(1);
        self.send(Job::Write {
            batches,
            slice,
            durable,
            done: Some(done),
        });
        let _ = wait.recv();
    }

    /// Hands them over; the receiver answers once they, and everything handed
    /// over before, are written (a query that must see what this node applied).
    pub fn write_acked(&self, batches: Vec<TrackBatch>, slice: Slice) -> Receiver<()> {
        let (done, ack) = sync_channel(1);
        self.send(Job::Write {
            batches,
            slice,
            durable: false,
            done: Some(done),
        });
        ack
    }

    /// Replaces the store with a peer's copy (see [`Tracker::install_copy`])
    /// after every write handed over before; the answer comes on the receiver.
    pub fn install_copy(
        &self,
        copy: PathBuf,
        at_least: u64,
    ) -> Receiver<Result<Option<u64>, String>> {
        let (done, answer) = sync_channel(1);
        self.send(Job::Install {
            copy,
            at_least,
            done,
        });
        answer
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(mut tracker: Tracker, jobs: Receiver<Job>, status: Arc<Mutex<Status>>) {
    let mut failed: VecDeque<(Vec<TrackBatch>, Slice)> = VecDeque::new();
    let mut resync_wanted = false;
    let (mut busy_us, mut reports) = (0u64, 0u64);
    while let Ok(job) = jobs.recv() {
        let began = std::time::Instant::now();
        let mut error = None;
        // What failed before goes first, in order.
        while let Some((batches, slice)) = failed.front() {
            match tracker.write_slice(batches, slice, false) {
                Ok(()) => {
                    failed.pop_front();
                }
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        match job {
            Job::Write {
                batches,
                slice,
                durable,
                done,
            } => {
                reports += batches.iter().map(|b| b.reports.len() as u64).sum::<u64>();
                if slice.resync {
                    // Rewrites everything: what failed before is covered.
                    failed.clear();
                    resync_wanted = false;
                }
                if failed.is_empty() {
                    match tracker.write_slice(&batches, &slice, durable) {
                        Ok(()) => error = None,
                        Err(e) => {
                            error = Some(e.to_string());
                            failed.push_back((batches, slice));
                        }
                    }
                } else {
                    failed.push_back((batches, slice));
                }
                if failed.len() > FAILED_WRITES_MAX {
                    failed.clear();
                    resync_wanted = true;
                }
                if let Some(d) = done {
                    let _ = d.send(());
                }
            }
            Job::Install {
                copy,
                at_least,
                done,
            } => {
                let r = tracker
                    .install_copy(&copy, at_least)
                    .map_err(|e| e.to_string());
                let _ = done.send(r);
            }
        }
        busy_us += began.elapsed().as_micros() as u64;
        if let Ok(mut s) = status.lock() {
            *s = Status {
                applied_index: tracker.applied_index(),
                wants_copy: tracker.wants_copy(),
                failed: error,
                resync_wanted,
                busy_us,
                reports,
            };
        }
    }
}
