//! The experiment-tracking store: an SQLite database in the node's data dir.
//!
//! The replicated log still carries every metrics report (so every node can
//! answer every query), but applying them no longer grows the in-memory state:
//! the node's core hands its shell a [`TrackBatch`] per applied batch
//! (`resolute_core::track`), and [`Tracker::write`] turns it into rows in one
//! transaction together with the batch's applied index. Queries for the CLI
//! and REST are answered from the same file through read-only connections
//! ([`Reader`]), on the API's threads, never the node's.
//!
//! Crash safety: the store records the index its rows cover and is never ahead
//! of it. A restarted node replays its log from its last snapshot, and the
//! store skips what it already holds (reports and runs by entry index). Before
//! the node persists a snapshot, which compacts the log, the store's last
//! transaction is fsynced (`durable`), so the log never loses an entry the
//! store has not seen. A node that caught up from a leader's snapshot (or lost
//! its store) rewrites every experiment, trial and checkpoint row from the
//! state; the reports between its index and the snapshot's are recorded as a
//! gap (`gaps`), which the queries report.
//!
//! Why SQLite (rusqlite, bundled): one file users open with any tool, WAL mode
//! for readers beside the one writer, transactions, indexes, JSON functions,
//! and no server to run; the bundled build needs no system library.

#![deny(missing_docs)]

use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use resolute_core::state::{ClusterState, TrialState};
use resolute_core::track::TrackBatch;

pub mod background;
mod query;
mod rows;
pub mod schema;
mod write;

pub use rows::Slice;

pub use query::{
    ExperimentFilter, ExperimentSort, MetricsQuery, Page, Reader, SortOrder, TrialSort,
    EXPERIMENTS_PAGE_MAX, METRIC_POINTS_PAGE_MAX,
};

/// The database's file name in the data dir.
pub const FILE_NAME: &str = "tracking.sqlite";
/// How long a node may gather applied batches before it writes them in one
/// transaction (sooner before a snapshot, a client's reply, or
/// `WRITE_BATCHES_MAX` batches): a page that many reports touch is written
/// once, not once per batch. The store only lags; a crash loses nothing (the
/// log replays).
pub const WRITE_EVERY_MS: u64 = 100;
/// Batches gathered at most before they are written.
pub const WRITE_BATCHES_MAX: usize = 1_000;

/// What went wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// SQLite refused (a full disk, a broken file, a bad query).
    #[error("tracking store {path}: {source}")]
    Sql {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The file's mode could not be set.
    #[error("tracking store {path}: {source}")]
    Io {
        /// The database file.
        path: PathBuf,
        /// The OS's error.
        source: std::io::Error,
    },
    /// A query's parameter is not one the store knows.
    #[error("{field}: {message}")]
    Query {
        /// The parameter.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// What a store holds: for comparing replicas and for operators.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// The applied index its rows cover.
    pub applied_index: u64,
    /// Rows per table, in the order of `schema::DIGESTED`.
    pub rows: Vec<(String, u64)>,
    /// A digest over every row of those tables in a canonical order: two
    /// stores with the same digest hold the same history.
    pub digest: String,
    /// Reports that never reached this store (it caught up from a snapshot
    /// instead of the entries that carried them).
    pub gaps: Vec<Gap>,
}

/// Reports a store lacks: it caught up from a snapshot over entries that
/// carried them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Gap {
    /// The first entry the snapshot covered that the store had not seen.
    pub from_index: u64,
    /// The snapshot's index.
    pub to_index: u64,
    /// How many reports those entries carried.
    pub reports: u64,
}

/// The writer: owned by the node actor, the one connection that writes.
pub struct Tracker {
    conn: Connection,
    path: PathBuf,
    applied_index: u64,
    written: write::Written,
    /// Set when this store records a gap (see [`Tracker::wants_copy`]).
    wants_copy: Option<u64>,
}

impl Tracker {
    /// Opens (or creates) the store at `path`. A store of another schema
    /// version is emptied: the node rebuilds it from its log and snapshot.
    pub fn open(path: &Path) -> Result<Tracker, Error> {
        let sql = |source| Error::Sql {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(sql)?;
        // The node's alone (it holds every user's metrics); SQLite gives its
        // WAL and shared-memory files the same mode.
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| Error::Io {
                path: path.to_path_buf(),
                source: e,
            })?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql)?;
        conn.pragma_update(None, "cache_size", -schema::PAGE_CACHE_KIB)
            .map_err(sql)?;
        let mut t = Tracker {
            conn,
            path: path.to_path_buf(),
            applied_index: 0,
            written: write::Written::default(),
            wants_copy: None,
        };
        t.migrate()?;
        t.applied_index = t.meta("applied_index")?.unwrap_or(0);
        // A store that stopped while it waited for a copy still wants one.
        t.wants_copy = t
            .conn
            .query_row("SELECT max(to_index) FROM gaps", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .map_err(|e| t.sql(e))?
            .map(|i| i as u64);
        Ok(t)
    }

    /// The applied index the store's rows cover.
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sql(&self, source: rusqlite::Error) -> Error {
        Error::Sql {
            path: self.path.clone(),
            source,
        }
    }

    fn migrate(&mut self) -> Result<(), Error> {
        let has_meta: bool = self
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(|e| self.sql(e))?
            > 0;
        if has_meta {
            let version = self.meta("schema_version")?;
            if version == Some(SCHEMA_VERSION_U64) {
                return Ok(());
            }
            // Another version: start over (the log and the snapshot rebuild it).
            let tables: Vec<String> = {
                let mut stmt = self
                    .conn
                    .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
                    .map_err(|e| self.sql(e))?;
                let rows = stmt.query_map([], |r| r.get(0)).map_err(|e| self.sql(e))?;
                rows.collect::<Result<_, _>>().map_err(|e| self.sql(e))?
            };
            for table in tables {
                self.conn
                    .execute_batch(&format!("DROP TABLE IF EXISTS \"{table}\""))
                    .map_err(|e| self.sql(e))?;
            }
        }
        self.conn
            .execute_batch(schema::SCHEMA)
            .map_err(|e| self.sql(e))?;
        self.set_meta("schema_version", SCHEMA_VERSION_U64)
    }

    fn meta(&self, key: &str) -> Result<Option<u64>, Error> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
                r.get::<_, i64>(0)
            })
            .optional()
            .map(|v| v.map(|v| v as u64))
            .map_err(|e| self.sql(e))
    }

    fn set_meta(&self, key: &str, value: u64) -> Result<(), Error> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value as i64],
            )
            .map(|_| ())
            .map_err(|e| self.sql(e))
    }

    /// Writes `batches` (in log order) in one transaction; `state` is the
    /// replicated state after the last of them. With `durable` the transaction
    /// is fsynced before this returns (the node is about to compact its log).
    /// Batches the store already covers are skipped: a restarted node replays
    /// them.
    pub fn write(
        &mut self,
        batches: &[TrackBatch],
        state: &ClusterState,
        durable: bool,
    ) -> Result<(), Error> {
        self.write_slice(batches, &Slice::of(batches, state), durable)
    }

    /// [`Tracker::write`] with the rows already taken from the state
    /// ([`Slice::of`], on the node's thread): what a writer on a thread of
    /// its own is given.
    pub fn write_slice(
        &mut self,
        batches: &[TrackBatch],
        slice: &Slice,
        durable: bool,
    ) -> Result<(), Error> {
        let stored = self.applied_index;
        let last = batches.iter().map(|b| b.applied_index).max().unwrap_or(0);
        if last <= stored && !durable {
            return Ok(());
        }
        if durable {
            self.conn
                .pragma_update(None, "synchronous", "FULL")
                .map_err(|e| self.sql(e))?;
        }
        let result = self.write_batches(batches, slice, stored);
        if result.is_err() {
            // What it remembers may name rows the failed transaction never wrote.
            self.written = write::Written::default();
        }
        if durable {
            self.conn
                .pragma_update(None, "synchronous", "NORMAL")
                .map_err(|e| self.sql(e))?;
        }
        result?;
        self.applied_index = self.applied_index.max(last);
        Ok(())
    }

    fn write_batches(
        &mut self,
        batches: &[TrackBatch],
        slice: &Slice,
        stored: u64,
    ) -> Result<(), Error> {
        let path = self.path.clone();
        let sql = |source| Error::Sql {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        let mut w = write::Rows::new(&tx, &mut self.written);
        let mut gap_at = None;
        let fresh: Vec<&TrackBatch> = batches
            .iter()
            .filter(|b| b.applied_index > stored)
            .collect();
        // A snapshot's gap is counted against the rows before it: then the
        // reports go in batch by batch.
        let one_go = !fresh.iter().any(|b| b.replaced);
        if one_go {
            w.reports(&fresh, stored).map_err(sql)?;
        }
        for batch in fresh {
            if !one_go {
                w.reports(&[batch], stored).map_err(sql)?;
            }
            for run in &batch.runs {
                w.run(run, stored).map_err(sql)?;
            }
            if batch.replaced && w.gap(batch, stored).map_err(sql)? {
                gap_at = Some(batch.applied_index);
            }
        }
        // A replayed batch's rows are older than the store's: only what is
        // past the store is written.
        if last_index(batches) > stored {
            w.rows(slice).map_err(sql)?;
        }
        w.applied(stored.max(last_index(batches))).map_err(sql)?;
        tx.commit().map_err(sql)?;
        if gap_at.is_some() {
            self.wants_copy = gap_at;
        }
        Ok(())
    }

    /// Catches up with a state that is ahead of the store (a restart from a
    /// snapshot newer than the store, or a store that was deleted): every row
    /// is rewritten from it and the missing reports recorded as a gap.
    pub fn catch_up(&mut self, state: &ClusterState) -> Result<(), Error> {
        if state.applied_index <= self.applied_index {
            return Ok(());
        }
        let batch = TrackBatch {
            applied_index: state.applied_index,
            reports_applied: state.reports_applied,
            replaced: true,
            ..TrackBatch::default()
        };
        self.write(&[batch], state, true)
    }

    /// The snapshot index past which this store wants a copy of a peer's
    /// store: it recorded a gap (it caught up from a snapshot over reports it
    /// never saw) since it was opened or last replaced by a copy.
    pub fn wants_copy(&self) -> Option<u64> {
        self.wants_copy
    }

    /// Replaces the store with `copy` (a consistent copy of a peer's store,
    /// made by [`copy_store`]) when the copy reaches `at_least` (the snapshot
    /// index of the gap it is to fill); its rows are every replica's rows up
    /// to its index. The store's index may move back to the copy's: the
    /// caller writes the batches it applied since again (those past the
    /// copy's index are written, the rest skipped). Returns the copy's index,
    /// or None when it does not reach `at_least`.
    pub fn install_copy(&mut self, copy: &Path, at_least: u64) -> Result<Option<u64>, Error> {
        let index = read_copy_index(copy)?;
        if index < at_least {
            return Ok(None);
        }
        let incoming = self.path.with_extension("sqlite.incoming");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        std::fs::copy(copy, &incoming).map_err(io(&incoming))?;
        std::fs::File::open(&incoming)
            .and_then(|f| f.sync_all())
            .map_err(io(&incoming))?;
        // Close this store before its files are replaced.
        self.conn = Connection::open_in_memory().map_err(|e| self.sql(e))?;
        for suffix in ["-wal", "-shm"] {
            let side = PathBuf::from(format!("{}{suffix}", self.path.display()));
            match std::fs::remove_file(&side) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&side)(e)),
                _ => {}
            }
        }
        std::fs::rename(&incoming, &self.path).map_err(io(&self.path))?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
        }
        *self = Tracker::open(&self.path.clone())?;
        self.wants_copy = None;
        Ok(Some(index))
    }

    /// Row counts, the digest and the gaps.
    pub fn summary(&self) -> Result<Summary, Error> {
        write::summary(&self.conn, self.applied_index).map_err(|e| self.sql(e))
    }
}

const SCHEMA_VERSION_U64: u64 = schema::SCHEMA_VERSION as u64;

fn last_index(batches: &[TrackBatch]) -> u64 {
    batches.iter().map(|b| b.applied_index).max().unwrap_or(0)
}

/// A trial's state as the store writes it.
fn trial_state(state: &TrialState) -> (String, Option<String>) {
    match state {
        TrialState::Queued => ("Queued".into(), None),
        TrialState::Assigned { node } => ("Assigned".into(), Some(node_hex(*node))),
        TrialState::Running { node } => ("Running".into(), Some(node_hex(*node))),
        TrialState::Paused => ("Paused".into(), None),
        TrialState::Done(outcome) => (format!("Done({})", outcome_name(outcome)), None),
    }
}

fn outcome_name(outcome: &resolute_core::command::TrialOutcome) -> &'static str {
    use resolute_core::command::TrialOutcome as O;
    match outcome {
        O::Completed => "Completed",
        O::Stopped => "Stopped",
        O::Errored { .. } => "Errored",
        O::Preempted => "Preempted",
        O::InvalidHyperparameters => "InvalidHyperparameters",
    }
}

/// A node id as the CLI shows it.
pub fn node_hex(node: u64) -> String {
    format!("{node:016x}")
}

/// Opens a read-only connection (for [`Reader`]).
fn open_read_only(path: &Path) -> Result<Connection, Error> {
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| Error::Sql {
        path: path.to_path_buf(),
        source,
    })
}

/// Makes a consistent copy of the store at `src` in `dest` (SQLite's `VACUUM
/// INTO`, through a read-only connection, so the node's writer goes on); the
/// applied index the copy covers.
pub fn copy_store(src: &Path, dest: &Path) -> Result<u64, Error> {
    let conn = open_read_only(src)?;
    let _ = std::fs::remove_file(dest);
    let target = dest.to_string_lossy().into_owned();
    conn.execute("VACUUM INTO ?1", [target])
        .map_err(|source| Error::Sql {
            path: src.to_path_buf(),
            source,
        })?;
    read_copy_index(dest)
}

/// A copy's applied index, after checking it is a store of this version.
fn read_copy_index(copy: &Path) -> Result<u64, Error> {
    let conn = open_read_only(copy)?;
    let sql = |source| Error::Sql {
        path: copy.to_path_buf(),
        source,
    };
    let value = |key: &str| -> Result<Option<i64>, Error> {
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(sql)
    };
    if value("schema_version")? != Some(schema::SCHEMA_VERSION) {
        return Err(Error::Query {
            field: "copy",
            message: format!(
                "{} is not a tracking store of schema {}",
                copy.display(),
                schema::SCHEMA_VERSION
            ),
        });
    }
    Ok(value("applied_index")?.unwrap_or(0) as u64)
}
