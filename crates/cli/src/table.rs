//! Lists for people and for scripts: an aligned table (comfy-table) on a
//! terminal or a pipe, CSV with `--csv` (a header line, then one record per
//! row), JSON with `--json` (the node's own objects, printed elsewhere).

use comfy_table::presets::NOTHING;
use comfy_table::{CellAlignment, Table};

/// One list: its column names and its rows (cells already text).
pub struct Rows {
    pub headers: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
    /// Columns whose cells are numbers, aligned right in the table.
    pub numeric: Vec<usize>,
}

impl Rows {
    /// A list with these columns and no rows yet.
    pub fn new(headers: &[&'static str]) -> Rows {
        Rows {
            headers: headers.to_vec(),
            rows: Vec::new(),
            numeric: Vec::new(),
        }
    }

    /// Marks columns as numeric.
    pub fn numeric(mut self, columns: &[usize]) -> Rows {
        self.numeric = columns.to_vec();
        self
    }

    /// Adds a row (as many cells as columns).
    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.headers.len());
        self.rows.push(row);
    }

    /// The table as text, its columns aligned.
    pub fn render(&self) -> String {
        let mut table = Table::new();
        table.load_preset(NOTHING).set_header(self.headers.clone());
        for row in &self.rows {
            table.add_row(row.clone());
        }
        for &c in &self.numeric {
            if let Some(column) = table.column_mut(c) {
                column.set_cell_alignment(CellAlignment::Right);
            }
        }
        table.to_string()
    }

    /// The list as CSV.
    pub fn csv(&self) -> String {
        let mut w = csv::Writer::from_writer(Vec::new());
        let _ = w.write_record(&self.headers);
        for row in &self.rows {
            let _ = w.write_record(row);
        }
        String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
    }

    /// Prints it as CSV or as a table.
    pub fn print(&self, csv: bool) {
        if csv {
            print!("{}", self.csv());
        } else {
            println!("{}", self.render());
        }
    }
}

/// A JSON value as a cell: strings bare, null empty, anything else as JSON.
pub fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => String::new(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Milliseconds since the epoch as an RFC 3339 UTC time (to the
/// millisecond), as Determined prints log timestamps.
pub fn timestamp(ms: u64) -> String {
    let at = time::OffsetDateTime::UNIX_EPOCH + time::Duration::milliseconds(ms as i64);
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    at.format(&format).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_it_and_tables_align() {
        let mut r = Rows::new(&["id", "name"]).numeric(&[0]);
        r.push(vec!["1".into(), "a, b".into()]);
        r.push(vec!["12".into(), "say \"hi\"".into()]);
        assert_eq!(r.csv(), "id,name\n1,\"a, b\"\n12,\"say \"\"hi\"\"\"\n");
        let text = r.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[1].contains(" 1 ") || lines[1].starts_with("  1"),
            "{text}"
        );
        assert_eq!(timestamp(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
