//! The database's tables, as users see them (`docs/tracking.md` explains each
//! column; any SQLite tool opens the file, `sqlite3 DATA_DIR/tracking.sqlite`).
//!
//! Rows are written only by the node, from applied log entries; every node of
//! a cluster ends with the same rows at the same applied index (compare them
//! with `resolute cluster tracking`). Node ids are 16 hex digits, as the CLI
//! shows them; times are milliseconds of the cluster's clock (the leader's
//! time stamps, as applied); JSON columns hold what the trial reported.

/// Bumped when a table changes shape; a store of another version is rebuilt
/// from the log rather than misread.
pub const SCHEMA_VERSION: i64 = 3;

/// SQLite's page cache per connection, in KiB: the metrics table's B-tree is
/// written in trial order, all over the file, so a larger cache saves reads.
pub const PAGE_CACHE_KIB: i64 = 32 * 1024;

/// The tables and indexes.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS experiments (
    id                INTEGER PRIMARY KEY,
    name              TEXT NOT NULL,
    owner             TEXT NOT NULL,
    workspace         TEXT NOT NULL,
    project           TEXT NOT NULL,
    state             TEXT NOT NULL,
    searcher          TEXT NOT NULL,
    searcher_metric   TEXT NOT NULL,
    smaller_is_better INTEGER NOT NULL,
    progress          REAL NOT NULL,
    best_validation   REAL,
    trials            INTEGER NOT NULL,
    created_ms        INTEGER NOT NULL,
    ended_ms          INTEGER,
    seed              INTEGER NOT NULL,
    model_digest      TEXT NOT NULL,
    last_error        TEXT,
    config_yaml       TEXT NOT NULL,
    archived          INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS experiments_by_best ON experiments (best_validation, id);
CREATE INDEX IF NOT EXISTS experiments_by_state ON experiments (state, id);
CREATE INDEX IF NOT EXISTS experiments_by_owner ON experiments (owner, id);
CREATE TABLE IF NOT EXISTS trials (
    id                INTEGER PRIMARY KEY,
    experiment_id     INTEGER NOT NULL,
    request_id        TEXT NOT NULL,
    state             TEXT NOT NULL,
    node              TEXT,
    incarnation       INTEGER NOT NULL,
    restarts          INTEGER NOT NULL,
    steps_completed   INTEGER NOT NULL,
    target            INTEGER,
    seed              INTEGER NOT NULL,
    hparams           TEXT NOT NULL,
    latest_checkpoint TEXT,
    latest_validation REAL,
    best_validation   REAL
);
CREATE INDEX IF NOT EXISTS trials_by_experiment ON trials (experiment_id, id);
CREATE TABLE IF NOT EXISTS hyperparameters (
    trial_id INTEGER NOT NULL,
    name     TEXT NOT NULL,
    value    TEXT NOT NULL,
    number   REAL,
    PRIMARY KEY (trial_id, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS metrics (
    trial_id        INTEGER NOT NULL,
    grp             TEXT NOT NULL,
    steps_completed INTEGER NOT NULL,
    entry_index     INTEGER NOT NULL,
    seq             INTEGER NOT NULL,
    body            TEXT NOT NULL,
    PRIMARY KEY (trial_id, grp, steps_completed, entry_index, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    uuid            TEXT PRIMARY KEY,
    trial_id        INTEGER NOT NULL,
    steps_completed INTEGER NOT NULL,
    size            INTEGER NOT NULL,
    digest          TEXT NOT NULL,
    holders         TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_by_trial ON checkpoints (trial_id, steps_completed);
CREATE TABLE IF NOT EXISTS runs (
    trial_id      INTEGER NOT NULL,
    incarnation   INTEGER NOT NULL,
    node          TEXT NOT NULL,
    started_index INTEGER NOT NULL,
    started_ms    INTEGER NOT NULL,
    ended_index   INTEGER,
    ended_ms      INTEGER,
    why           TEXT,
    PRIMARY KEY (trial_id, incarnation)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS gaps (
    from_index INTEGER NOT NULL,
    to_index   INTEGER NOT NULL,
    reports    INTEGER NOT NULL,
    PRIMARY KEY (from_index)
) WITHOUT ROWID;
";

/// Every table a digest covers, with the order that makes it canonical.
pub const DIGESTED: &[(&str, &str)] = &[
    ("experiments", "id"),
    ("trials", "id"),
    ("hyperparameters", "trial_id, name"),
    ("metrics", "entry_index, seq"),
    ("checkpoints", "uuid"),
    ("runs", "trial_id, incarnation"),
];
