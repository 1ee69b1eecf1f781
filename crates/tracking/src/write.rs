//! Rows from applied batches, and the digest over them.

use std::collections::BTreeSet;

use rusqlite::{params, Connection, Transaction};

use resolute_core::command::MetricRecord;
use resolute_core::track::{RunEvent, TrackBatch};

use crate::rows::{CheckpointRow, ExperimentRow, Slice, TrialRow};
use crate::{node_hex, schema, Gap, Summary};

/// What the writer remembers between transactions, so that it does not
/// rewrite what it wrote already: the trials whose hyperparameters are in, and
/// each experiment row's fingerprint. Cleared when a transaction fails.
#[derive(Debug, Default)]
pub(crate) struct Written {
    hparams: BTreeSet<u64>,
    experiments: std::collections::BTreeMap<u64, blake3::Hash>,
    /// Each trial row's fingerprint, progress left out: a report that only
    /// moves `steps_completed` updates that one column.
    trials: std::collections::BTreeMap<u64, blake3::Hash>,
}

/// The writes of one transaction.
pub(crate) struct Rows<'t> {
    tx: &'t Transaction<'t>,
    written: &'t mut Written,
}

impl<'t> Rows<'t> {
    pub(crate) fn new(tx: &'t Transaction<'t>, written: &'t mut Written) -> Self {
        Rows { tx, written }
    }

    /// The batches' reports the store does not hold yet (entries past
    /// `stored`), inserted in key order: reports of many trials arrive
    /// interleaved, and sorted they touch each B-tree page once rather than
    /// once a report.
    pub(crate) fn reports(&mut self, batches: &[&TrackBatch], stored: u64) -> rusqlite::Result<()> {
        let mut insert = self.tx.prepare_cached(
            "INSERT INTO metrics (trial_id, grp, steps_completed, entry_index, seq, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        type Key<'a> = (u64, &'a str, u64, u64, u64);
        let mut rows: Vec<(Key<'_>, &MetricRecord)> = Vec::new();
        for batch in batches {
            let mut seq = 0u64;
            let mut entry = 0u64;
            for report in &batch.reports {
                if report.index != entry {
                    entry = report.index;
                    seq = 0;
                }
                if report.index > stored {
                    let r = &report.record;
                    let key = (r.trial, r.kind.group(), r.steps_completed, entry, seq);
                    rows.push((key, r));
                }
                seq += 1;
            }
        }
        rows.sort_unstable_by_key(|(key, _)| *key);
        let mut body = Vec::new();
        for ((trial, group, steps, index, seq), r) in rows {
            body.clear();
            if serde_json::to_writer(&mut body, &r.metrics).is_err() {
                body.clear();
                body.extend_from_slice(b"{}");
            }
            let text = std::str::from_utf8(&body).unwrap_or("{}");
            insert.execute(params![
                trial as i64,
                group,
                steps as i64,
                index as i64,
                seq as i64,
                text
            ])?;
        }
        Ok(())
    }

    /// One run-history event, unless the store holds it already.
    pub(crate) fn run(&mut self, run: &RunEvent, stored: u64) -> rusqlite::Result<()> {
        match run {
            RunEvent::Started {
                index,
                trial,
                incarnation,
                node,
                at_ms,
            } if *index > stored => {
                self.tx
                    .prepare_cached(
                        "INSERT INTO runs (trial_id, incarnation, node, started_index, started_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (trial_id, incarnation) DO UPDATE SET
                           node = excluded.node, started_index = excluded.started_index,
                           started_ms = excluded.started_ms",
                    )?
                    .execute(params![
                        *trial as i64,
                        *incarnation as i64,
                        node_hex(*node),
                        *index as i64,
                        *at_ms as i64
                    ])?;
            }
            RunEvent::Ended {
                index,
                trial,
                incarnation,
                why,
                at_ms,
            } if *index > stored => {
                self.tx
                    .prepare_cached(
                        "UPDATE runs SET ended_index = ?3, ended_ms = ?4, why = ?5
                         WHERE trial_id = ?1 AND incarnation = ?2 AND ended_index IS NULL",
                    )?
                    .execute(params![
                        *trial as i64,
                        *incarnation as i64,
                        *index as i64,
                        *at_ms as i64,
                        why
                    ])?;
            }
            _ => {}
        }
        Ok(())
    }

    /// After a snapshot replaced the state at index `to`: records that the
    /// reports of entries `stored + 1 ..= to` never came, if any did (the
    /// state counts the reports ever accepted; the store, those it holds).
    pub(crate) fn gap(&mut self, batch: &TrackBatch, stored: u64) -> rusqlite::Result<bool> {
        let to = batch.applied_index;
        let held: i64 = self
            .tx
            .query_row("SELECT count(*) FROM metrics", [], |r| r.get(0))?;
        let missing = batch.reports_applied.saturating_sub(held as u64);
        if missing > 0 {
            self.tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO gaps (from_index, to_index, reports)
                     VALUES (?1, ?2, ?3)",
                )?
                .execute(params![(stored + 1) as i64, to as i64, missing as i64])?;
        }
        Ok(missing > 0)
    }

    /// The applied index the rows now cover.
    pub(crate) fn applied(&mut self, index: u64) -> rusqlite::Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('applied_index', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![index as i64])?;
        Ok(())
    }

    /// Writes the rows of `slice` (removing those whose record is gone; with
    /// `resync`, also every row whose record is not in it).
    pub(crate) fn rows(&mut self, slice: &Slice) -> rusqlite::Result<()> {
        for (uuid, row) in &slice.checkpoints {
            match row {
                Some(r) => self.checkpoint(uuid, r)?,
                None => self.delete("checkpoints", "uuid", uuid)?,
            }
        }
        for (id, row) in &slice.trials {
            match row {
                Some(r) => self.trial(*id, r)?,
                None => self.delete_trial(*id)?,
            }
        }
        for (id, row) in &slice.experiments {
            match row {
                Some(r) => self.experiment(*id, r)?,
                None => {
                    self.written.experiments.remove(id);
                    self.delete("experiments", "id", &(*id as i64))?
                }
            }
        }
        if slice.resync {
            for id in self.ids("trials", "id")? {
                if !slice.trials.contains_key(&(id as u64)) {
                    self.delete_trial(id as u64)?;
                }
            }
            for id in self.ids("experiments", "id")? {
                if !slice.experiments.contains_key(&(id as u64)) {
                    self.written.experiments.remove(&(id as u64));
                    self.delete("experiments", "id", &id)?;
                }
            }
            let uuids: Vec<String> = {
                let mut stmt = self.tx.prepare("SELECT uuid FROM checkpoints")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for uuid in uuids {
                if !slice.checkpoints.contains_key(&uuid) {
                    self.delete("checkpoints", "uuid", &uuid)?;
                }
            }
        }
        Ok(())
    }

    fn ids(&self, table: &str, column: &str) -> rusqlite::Result<Vec<i64>> {
        let mut stmt = self.tx.prepare(&format!("SELECT {column} FROM {table}"))?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect()
    }

    fn delete(&self, table: &str, column: &str, key: &dyn rusqlite::ToSql) -> rusqlite::Result<()> {
        self.tx
            .prepare_cached(&format!("DELETE FROM {table} WHERE {column} = ?1"))?
            .execute([key])?;
        Ok(())
    }

    fn delete_trial(&mut self, id: u64) -> rusqlite::Result<()> {
        self.written.hparams.remove(&id);
        self.written.trials.remove(&id);
        let id = id as i64;
        for table in ["metrics", "hyperparameters", "runs", "checkpoints"] {
            self.delete(table, "trial_id", &id)?;
        }
        self.delete("trials", "id", &id)
    }

    fn trial(&mut self, id: u64, t: &TrialRow) -> rusqlite::Result<()> {
        let mut h = blake3::Hasher::new();
        h.update(t.state.as_bytes());
        h.update(t.node.as_deref().unwrap_or("").as_bytes());
        for n in [
            t.incarnation,
            u64::from(t.restarts),
            t.target.unwrap_or(u64::MAX),
        ] {
            h.update(&n.to_le_bytes());
        }
        for v in [t.latest_validation, t.best_validation] {
            h.update(&v.map_or(u64::MAX, f64::to_bits).to_le_bytes());
        }
        h.update(t.latest_checkpoint.as_deref().unwrap_or("").as_bytes());
        let fingerprint = h.finalize();
        if self.written.trials.get(&id) == Some(&fingerprint) {
            self.tx
                .prepare_cached("UPDATE trials SET steps_completed = ?2 WHERE id = ?1")?
                .execute(params![id as i64, t.steps_completed as i64])?;
            return Ok(());
        }
        self.written.trials.insert(id, fingerprint);
        self.tx
            .prepare_cached(
                "INSERT OR REPLACE INTO trials (id, experiment_id, request_id, state, node,
                   incarnation, restarts, steps_completed, target, seed, hparams,
                   latest_checkpoint, latest_validation, best_validation)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            )?
            .execute(params![
                id as i64,
                t.experiment as i64,
                t.request_id,
                t.state,
                t.node,
                t.incarnation as i64,
                i64::from(t.restarts),
                t.steps_completed as i64,
                t.target.map(|x| x as i64),
                i64::from(t.seed),
                t.hparams,
                t.latest_checkpoint,
                t.latest_validation,
                t.best_validation,
            ])?;
        // Hyperparameters never change once drawn: the first write stays.
        if !self.written.hparams.insert(id) {
            return Ok(());
        }
        let mut insert = self.tx.prepare_cached(
            "INSERT OR IGNORE INTO hyperparameters (trial_id, name, value, number)
             VALUES (?1, ?2, ?3, ?4)",
        )?;
        for (name, text, number) in &t.flat {
            insert.execute(params![id as i64, name, text, number])?;
        }
        Ok(())
    }

    fn checkpoint(&self, uuid: &str, c: &CheckpointRow) -> rusqlite::Result<()> {
        self.tx
            .prepare_cached(
                "INSERT OR REPLACE INTO checkpoints (uuid, trial_id, steps_completed, size,
                   digest, holders) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                uuid,
                c.trial as i64,
                c.steps_completed as i64,
                c.size as i64,
                c.digest,
                c.holders,
            ])?;
        Ok(())
    }

    fn experiment(&mut self, id: u64, e: &ExperimentRow) -> rusqlite::Result<()> {
        // Most batches change an experiment's trials, not the experiment: a
        // fingerprint of what the row holds skips the rewrite.
        let mut h = blake3::Hasher::new();
        h.update(e.state.as_bytes());
        h.update(&e.progress.to_bits().to_le_bytes());
        h.update(
            &e.best_validation
                .map_or(u64::MAX, f64::to_bits)
                .to_le_bytes(),
        );
        h.update(&e.trials.to_le_bytes());
        h.update(&e.ended_ms.unwrap_or(u64::MAX).to_le_bytes());
        h.update(e.last_error.as_deref().unwrap_or("").as_bytes());
        h.update(&[u8::from(e.archived)]);
        let fingerprint = h.finalize();
        if self.written.experiments.get(&id) == Some(&fingerprint) {
            return Ok(());
        }
        self.written.experiments.insert(id, fingerprint);
        self.tx
            .prepare_cached(
                "INSERT OR REPLACE INTO experiments (id, name, owner, workspace, project, state,
                   searcher, searcher_metric, smaller_is_better, progress, best_validation,
                   trials, created_ms, ended_ms, seed, model_digest, last_error, config_yaml,
                   archived)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15,
                   ?16, ?17, ?18, ?19)",
            )?
            .execute(params![
                id as i64,
                e.name,
                e.owner,
                e.workspace,
                e.project,
                e.state,
                e.searcher,
                e.searcher_metric,
                e.smaller_is_better,
                e.progress,
                e.best_validation,
                e.trials as i64,
                e.created_ms as i64,
                e.ended_ms.map(|x| x as i64),
                i64::from(e.seed),
                e.model_digest,
                e.last_error,
                e.config_yaml,
                e.archived,
            ])?;
        Ok(())
    }
}

/// Row counts, digest and gaps of a store.
pub(crate) fn summary(conn: &Connection, applied_index: u64) -> rusqlite::Result<Summary> {
    let mut hasher = blake3::Hasher::new();
    let mut rows = Vec::new();
    for (table, order) in schema::DIGESTED {
        let mut stmt = conn.prepare(&format!("SELECT * FROM {table} ORDER BY {order}"))?;
        let columns = stmt.column_count();
        let mut cursor = stmt.query([])?;
        let mut count = 0u64;
        hasher.update(table.as_bytes());
        while let Some(row) = cursor.next()? {
            count += 1;
            for i in 0..columns {
                let cell: rusqlite::types::Value = row.get(i)?;
                hash_cell(&mut hasher, &cell);
            }
        }
        rows.push((table.to_string(), count));
    }
    let mut stmt =
        conn.prepare("SELECT from_index, to_index, reports FROM gaps ORDER BY from_index")?;
    let gaps = stmt
        .query_map([], |r| {
            Ok(Gap {
                from_index: r.get::<_, i64>(0)? as u64,
                to_index: r.get::<_, i64>(1)? as u64,
                reports: r.get::<_, i64>(2)? as u64,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(Summary {
        applied_index,
        rows,
        digest: hasher.finalize().to_hex()[..32].to_string(),
        gaps,
    })
}

fn hash_cell(hasher: &mut blake3::Hasher, cell: &rusqlite::types::Value) {
    use rusqlite::types::Value as V;
    match cell {
        V::Null => hasher.update(&[0]),
        V::Integer(i) => hasher.update(&[1]).update(&i.to_le_bytes()),
        V::Real(f) => hasher.update(&[2]).update(&f.to_bits().to_le_bytes()),
        V::Text(s) => hasher
            .update(&[3])
            .update(&(s.len() as u64).to_le_bytes())
            .update(s.as_bytes()),
        V::Blob(b) => hasher
            .update(&[4])
            .update(&(b.len() as u64).to_le_bytes())
            .update(b),
    };
}
