//! Queries users make, answered from the store through a read-only connection.
//!
//! Every answer is a page: at most a named number of rows, with what it takes
//! to ask for the next. Every parameter a user passes is checked here and an
//! error names it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rusqlite::types::Value as Sql;
use rusqlite::Connection;
use serde_json::{json, Value};

use crate::{open_read_only, Error};

/// Most experiments one page holds.
pub const EXPERIMENTS_PAGE_MAX: usize = 1_000;
/// Most metric points (reports) one page holds.
pub const METRIC_POINTS_PAGE_MAX: usize = 10_000;
/// Most trials one page holds.
pub const TRIALS_PAGE_MAX: usize = 10_000;

/// One page of rows.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Page {
    /// The rows.
    pub items: Vec<Value>,
    /// Rows matching, over all pages.
    pub total: u64,
    /// Offset of the next page, if there is one.
    pub next_offset: Option<u64>,
}

/// Ascending or descending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortOrder {
    /// Smallest first.
    #[default]
    Asc,
    /// Largest first.
    Desc,
}

impl SortOrder {
    /// Parses `asc` or `desc` (the `order` parameter).
    pub fn parse(s: &str) -> Result<SortOrder, Error> {
        match s {
            "asc" => Ok(SortOrder::Asc),
            "desc" => Ok(SortOrder::Desc),
            _ => Err(Error::Query {
                field: "order",
                message: format!("{s:?}: use asc or desc"),
            }),
        }
    }

    fn sql(self) -> &'static str {
        match self {
            SortOrder::Asc => "ASC",
            SortOrder::Desc => "DESC",
        }
    }
}

/// A trial's metric reports to read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsQuery {
    /// `training`, `validation`, or any group a trial reported; all if None.
    pub group: Option<String>,
    /// Only reports at or after this step.
    pub since_step: Option<u64>,
    /// At most this many (default and most: [`METRIC_POINTS_PAGE_MAX`]).
    pub limit: Option<usize>,
    /// By step: ascending (from `since_step`) or descending (the latest first).
    pub order: SortOrder,
}

/// How to sort experiments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExperimentSort {
    /// By id (the default).
    #[default]
    Id,
    /// By name.
    Name,
    /// By state.
    State,
    /// By owner.
    Owner,
    /// By progress.
    Progress,
    /// By the best validation value of the searcher metric (experiments without
    /// one last).
    BestMetric,
    /// By creation time.
    Started,
    /// By end time.
    Ended,
}

impl ExperimentSort {
    /// Parses the `sort` parameter.
    pub fn parse(s: &str) -> Result<ExperimentSort, Error> {
        Ok(match s {
            "id" => ExperimentSort::Id,
            "name" => ExperimentSort::Name,
            "state" => ExperimentSort::State,
            "owner" => ExperimentSort::Owner,
            "progress" => ExperimentSort::Progress,
            "best_metric" => ExperimentSort::BestMetric,
            "started" => ExperimentSort::Started,
            "ended" => ExperimentSort::Ended,
            _ => {
                return Err(Error::Query {
                    field: "sort",
                    message: format!(
                        "{s:?}: use id, name, state, owner, progress, best_metric, started or ended"
                    ),
                })
            }
        })
    }

    fn column(self) -> &'static str {
        match self {
            ExperimentSort::Id => "id",
            ExperimentSort::Name => "name",
            ExperimentSort::State => "state",
            ExperimentSort::Owner => "owner",
            ExperimentSort::Progress => "progress",
            ExperimentSort::BestMetric => "best_validation",
            ExperimentSort::Started => "created_ms",
            ExperimentSort::Ended => "ended_ms",
        }
    }
}

/// Which experiments to list, and how.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExperimentFilter {
    /// Only in this state (`Active`, `Paused`, `Completed`, `Canceled`, `Errored`).
    pub state: Option<String>,
    /// Only of this owner.
    pub owner: Option<String>,
    /// Only in this workspace.
    pub workspace: Option<String>,
    /// Only those whose name contains this.
    pub name: Option<String>,
    /// Only in these workspaces (what the caller may read); all if None.
    pub readable: Option<BTreeSet<String>>,
    /// Archived experiments too (hidden by default).
    pub archived: bool,
    /// Sort key.
    pub sort: ExperimentSort,
    /// Sort order.
    pub order: SortOrder,
    /// Page size (default 100, at most [`EXPERIMENTS_PAGE_MAX`]).
    pub limit: Option<usize>,
    /// Rows to skip.
    pub offset: u64,
}

/// How to sort an experiment's trials.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TrialSort {
    /// By id (the default).
    #[default]
    Id,
    /// By the best validation value of the searcher metric.
    BestMetric,
    /// By the latest validation value of the searcher metric.
    LatestMetric,
    /// By progress.
    Steps,
    /// By a hyperparameter (dotted name for nested ones): `hp.NAME`.
    Hparam(String),
    /// By the latest validation value of any metric: `metric.NAME`.
    Metric(String),
}

impl TrialSort {
    /// Parses the `sort` parameter: `id`, `best_metric`, `latest_metric`,
    /// `steps`, `hp.NAME` or `metric.NAME`.
    pub fn parse(s: &str) -> Result<TrialSort, Error> {
        if let Some(name) = s.strip_prefix("hp.").filter(|n| !n.is_empty()) {
            return Ok(TrialSort::Hparam(name.to_string()));
        }
        if let Some(name) = s.strip_prefix("metric.").filter(|n| !n.is_empty()) {
            return Ok(TrialSort::Metric(name.to_string()));
        }
        Ok(match s {
            "id" => TrialSort::Id,
            "best_metric" => TrialSort::BestMetric,
            "latest_metric" => TrialSort::LatestMetric,
            "steps" => TrialSort::Steps,
            _ => {
                return Err(Error::Query {
                    field: "sort",
                    message: format!(
                        "{s:?}: use id, best_metric, latest_metric, steps, hp.NAME or metric.NAME"
                    ),
                })
            }
        })
    }
}

/// A read-only connection to a store.
pub struct Reader {
    conn: Connection,
    path: PathBuf,
}

impl Reader {
    /// Opens the store at `path` for reading.
    pub fn open(path: &Path) -> Result<Reader, Error> {
        Ok(Reader {
            conn: open_read_only(path)?,
            path: path.to_path_buf(),
        })
    }

    fn sql(&self, source: rusqlite::Error) -> Error {
        Error::Sql {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs `sql` with `args`, each row as a JSON object of its columns (JSON
    /// text columns, named in `json_columns`, parsed).
    fn rows(&self, sql: &str, args: &[Sql], json_columns: &[&str]) -> Result<Vec<Value>, Error> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.sql(e))?;
        let names: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
        let mut cursor = stmt
            .query(rusqlite::params_from_iter(args.iter()))
            .map_err(|e| self.sql(e))?;
        let mut out = Vec::new();
        while let Some(row) = cursor.next().map_err(|e| self.sql(e))? {
            let mut obj = serde_json::Map::new();
            for (i, name) in names.iter().enumerate() {
                let cell: Sql = row.get(i).map_err(|e| self.sql(e))?;
                let v = match cell {
                    Sql::Null => Value::Null,
                    Sql::Integer(n) => json!(n),
                    Sql::Real(f) => json!(f),
                    Sql::Text(s) if json_columns.contains(&name.as_str()) => {
                        serde_json::from_str(&s).unwrap_or(Value::String(s))
                    }
                    Sql::Text(s) => Value::String(s),
                    Sql::Blob(_) => Value::Null,
                };
                obj.insert(name.clone(), v);
            }
            out.push(Value::Object(obj));
        }
        Ok(out)
    }

    fn count(&self, sql: &str, args: &[Sql]) -> Result<u64, Error> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(|e| self.sql(e))?;
        stmt.query_row(rusqlite::params_from_iter(args.iter()), |r| {
            r.get::<_, i64>(0)
        })
        .map(|n| n as u64)
        .map_err(|e| self.sql(e))
    }

    /// A trial's metric reports (`steps_completed`, `group`, `metrics`).
    pub fn trial_metrics(&self, trial: u64, q: &MetricsQuery) -> Result<Page, Error> {
        let limit = page_limit(
            "limit",
            q.limit,
            METRIC_POINTS_PAGE_MAX,
            METRIC_POINTS_PAGE_MAX,
        )?;
        let mut filter = String::from("trial_id = ?1");
        let mut args = vec![Sql::Integer(trial as i64)];
        if let Some(group) = &q.group {
            args.push(Sql::Text(group.clone()));
            filter.push_str(&format!(" AND grp = ?{}", args.len()));
        }
        if let Some(step) = q.since_step {
            args.push(Sql::Integer(step as i64));
            filter.push_str(&format!(" AND steps_completed >= ?{}", args.len()));
        }
        let total = self.count(
            &format!("SELECT count(*) FROM metrics WHERE {filter}"),
            &args,
        )?;
        let order = q.order.sql();
        args.push(Sql::Integer(limit as i64));
        let mut items = self.rows(
            &format!(
                "SELECT grp AS \"group\", steps_completed, body AS metrics FROM metrics
                 WHERE {filter} ORDER BY steps_completed {order}, entry_index {order}, seq {order}
                 LIMIT ?{}",
                args.len()
            ),
            &args,
            &["metrics"],
        )?;
        // Determined's names for the two built-in groups.
        for item in &mut items {
            if let Some(kind) = item.get("group").and_then(Value::as_str).map(kind_name) {
                item["kind"] = json!(kind);
            }
        }
        let next_offset = (total > items.len() as u64).then_some(items.len() as u64);
        Ok(Page {
            items,
            total,
            next_offset,
        })
    }

    /// Experiments, filtered, sorted and paged.
    pub fn experiments(&self, f: &ExperimentFilter) -> Result<Page, Error> {
        let limit = page_limit("limit", f.limit, 100, EXPERIMENTS_PAGE_MAX)?;
        let mut clauses: Vec<String> = Vec::new();
        if !f.archived {
            clauses.push("archived = 0".into());
        }
        let mut args: Vec<Sql> = Vec::new();
        let mut eq = |column: &str, value: &Option<String>, args: &mut Vec<Sql>| {
            if let Some(v) = value {
                args.push(Sql::Text(v.clone()));
                clauses.push(format!("{column} = ?{}", args.len()));
            }
        };
        eq("state", &f.state, &mut args);
        eq("owner", &f.owner, &mut args);
        eq("workspace", &f.workspace, &mut args);
        if let Some(name) = &f.name {
            args.push(Sql::Text(name.clone()));
            clauses.push(format!("instr(name, ?{}) > 0", args.len()));
        }
        if let Some(readable) = &f.readable {
            if readable.is_empty() {
                clauses.push("0".into());
            } else {
                let marks: Vec<String> = readable
                    .iter()
                    .map(|w| {
                        args.push(Sql::Text(w.clone()));
                        format!("?{}", args.len())
                    })
                    .collect();
                clauses.push(format!("workspace IN ({})", marks.join(", ")));
            }
        }
        let filter = if clauses.is_empty() {
            "1".to_string()
        } else {
            clauses.join(" AND ")
        };
        let total = self.count(
            &format!("SELECT count(*) FROM experiments WHERE {filter}"),
            &args,
        )?;
        let column = f.sort.column();
        let order = f.order.sql();
        args.push(Sql::Integer(limit as i64));
        args.push(Sql::Integer(f.offset as i64));
        let n = args.len();
        let items = self.rows(
            &format!(
                "SELECT id, name, owner, workspace, project, state, searcher, searcher_metric,
                   smaller_is_better, progress, best_validation AS best_metric, trials,
                   created_ms, ended_ms, last_error, archived
                 FROM experiments WHERE {filter}
                 ORDER BY {column} {order} NULLS LAST, id {order} LIMIT ?{} OFFSET ?{n}",
                n - 1
            ),
            &args,
            &[],
        )?;
        let next = f.offset + items.len() as u64;
        Ok(Page {
            next_offset: (next < total).then_some(next),
            items,
            total,
        })
    }

    /// An experiment's trials, sorted and paged.
    pub fn trials(
        &self,
        experiment: u64,
        sort: &TrialSort,
        order: SortOrder,
        limit: Option<usize>,
        offset: u64,
    ) -> Result<Page, Error> {
        let limit = page_limit("limit", limit, TRIALS_PAGE_MAX, TRIALS_PAGE_MAX)?;
        let mut args = vec![Sql::Integer(experiment as i64)];
        let total = self.count(
            "SELECT count(*) FROM trials WHERE experiment_id = ?1",
            &args,
        )?;
        let key = match sort {
            TrialSort::Id => "t.id".to_string(),
            TrialSort::BestMetric => "t.best_validation".to_string(),
            TrialSort::LatestMetric => "t.latest_validation".to_string(),
            TrialSort::Steps => "t.steps_completed".to_string(),
            TrialSort::Hparam(name) => {
                args.push(Sql::Text(name.clone()));
                format!(
                    "(SELECT coalesce(h.number, h.value) FROM hyperparameters h
                      WHERE h.trial_id = t.id AND h.name = ?{})",
                    args.len()
                )
            }
            TrialSort::Metric(name) => {
                args.push(Sql::Text(name.clone()));
                format!(
                    "(SELECT json_extract(m.body, '$.' || json_quote(?{})) FROM metrics m
                      WHERE m.trial_id = t.id AND m.grp = 'validation'
                      ORDER BY m.steps_completed DESC, m.entry_index DESC LIMIT 1)",
                    args.len()
                )
            }
        };
        let order = order.sql();
        args.push(Sql::Integer(limit as i64));
        args.push(Sql::Integer(offset as i64));
        let n = args.len();
        let items = self.rows(
            &format!(
                "SELECT t.id, t.experiment_id, t.state, t.node, t.incarnation, t.restarts,
                   t.steps_completed, t.target, t.seed, t.hparams, t.latest_checkpoint,
                   t.latest_validation, t.best_validation AS best_metric, {key} AS sort_key
                 FROM trials t WHERE t.experiment_id = ?1
                 ORDER BY sort_key {order} NULLS LAST, t.id {order} LIMIT ?{} OFFSET ?{n}",
                n - 1
            ),
            &args,
            &["hparams"],
        )?;
        let next = offset + items.len() as u64;
        Ok(Page {
            next_offset: (next < total).then_some(next),
            items,
            total,
        })
    }

    /// A trial's run history: each incarnation, its node, when and why it ended.
    pub fn runs(&self, trial: u64) -> Result<Vec<Value>, Error> {
        self.rows(
            "SELECT incarnation, node, started_index, started_ms, ended_index, ended_ms, why
             FROM runs WHERE trial_id = ?1 ORDER BY incarnation",
            &[Sql::Integer(trial as i64)],
            &[],
        )
    }

    /// A trial's checkpoints, oldest first.
    pub fn checkpoints(&self, trial: u64) -> Result<Vec<Value>, Error> {
        self.rows(
            "SELECT uuid, steps_completed, size, digest, holders FROM checkpoints
             WHERE trial_id = ?1 ORDER BY steps_completed, uuid",
            &[Sql::Integer(trial as i64)],
            &["holders"],
        )
    }

    /// Row counts, the digest and the gaps (as [`crate::Tracker::summary`]).
    pub fn summary(&self) -> Result<crate::Summary, Error> {
        let applied: i64 = self
            .conn
            .query_row(
                "SELECT coalesce((SELECT value FROM meta WHERE key = 'applied_index'), 0)",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.sql(e))?;
        crate::write::summary(&self.conn, applied as u64).map_err(|e| self.sql(e))
    }
}

/// The legacy `kind` of a report (`Training`, `Validation`) for the built-in
/// groups, as the API showed it before groups.
fn kind_name(group: &str) -> Option<&'static str> {
    match group {
        "training" => Some("Training"),
        "validation" => Some("Validation"),
        _ => None,
    }
}

fn page_limit(
    field: &'static str,
    asked: Option<usize>,
    default: usize,
    max: usize,
) -> Result<usize, Error> {
    match asked {
        None => Ok(default),
        Some(0) => Err(Error::Query {
            field,
            message: "must be at least 1".into(),
        }),
        Some(n) if n > max => Err(Error::Query {
            field,
            message: format!("{n} is more than {max}"),
        }),
        Some(n) => Ok(n),
    }
}
