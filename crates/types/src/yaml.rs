//! A YAML reader that remembers where every node came from.
//!
//! Configuration errors must name the file, line and column of the offending key
//! (`exp.yaml:8:3: searcher.max_trails: unknown field`). Serde-based YAML crates lose
//! positions once a value is deserialized, so this module builds its own small tree
//! from yaml-rust2's event stream, with a [`Pos`] on every node and map key.
//!
//! Scalars are resolved with the YAML 1.2 core schema (`true`, `null`, `1e-4`, `0x1f`,
//! `.inf`); quoted scalars are always strings. Anchors and aliases are expanded.
//! Limits on nesting depth and node count keep hostile input from exhausting the
//! stack or memory: every input yields a tree or an error, never a panic.

use std::collections::BTreeMap;
use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::value::Value;

/// Deepest nesting of sequences and maps accepted; real configs use fewer than ten.
pub const DEPTH_MAX: usize = 64;
/// Most nodes accepted in one document after alias expansion ("billion laughs" guard).
pub const NODES_MAX: usize = 200_000;

/// Where a node came from: a line and column (both 1-based) in a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// 1-based line.
    pub line: u32,
    /// 1-based column.
    pub col: u32,
    /// Which source: 0 is the file, `n > 0` is the n-th `--config` override.
    pub source: u16,
}

/// A YAML node and its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// What the node holds.
    pub kind: NodeKind,
    /// Where it starts.
    pub pos: Pos,
}

/// A map key and its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    /// The key as text (scalar keys such as `1` or `true` are kept as written).
    pub name: String,
    /// Where the key starts.
    pub pos: Pos,
}

/// The content of a node.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// `null`, `~` or nothing.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A whole number.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// A string (any quoted scalar, or a plain one that is nothing else).
    Str(String),
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in the order written; keys are unique.
    Map(Vec<(Key, Node)>),
}

impl Node {
    /// A short description of the node's type for error messages.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            NodeKind::Null => "null",
            NodeKind::Bool(_) => "a boolean",
            NodeKind::Int(_) => "an integer",
            NodeKind::Float(_) => "a number",
            NodeKind::Str(_) => "a string",
            NodeKind::Seq(_) => "a list",
            NodeKind::Map(_) => "a map",
        }
    }

    /// Converts the node into a position-free [`Value`].
    pub fn to_value(&self) -> Value {
        match &self.kind {
            NodeKind::Null => Value::Null,
            NodeKind::Bool(b) => Value::Bool(*b),
            NodeKind::Int(i) => Value::Int(*i),
            NodeKind::Float(f) => Value::Float(*f),
            NodeKind::Str(s) => Value::String(s.clone()),
            NodeKind::Seq(items) => Value::List(items.iter().map(Node::to_value).collect()),
            NodeKind::Map(entries) => Value::Map(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_value()))
                    .collect::<BTreeMap<_, _>>(),
            ),
        }
    }

    /// The entry for `key`, if this is a map that has it.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match &self.kind {
            NodeKind::Map(entries) => entries.iter().find(|(k, _)| k.name == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

/// A YAML syntax or structure error with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    /// Where the problem was found.
    pub pos: Pos,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for YamlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.pos.line, self.pos.col, self.message)
    }
}

impl std::error::Error for YamlError {}

/// Parses one YAML document. An empty document is `Null`.
pub fn parse(text: &str, source: u16) -> Result<Node, YamlError> {
    let mut builder = Builder::new(source);
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, true) {
        return Err(YamlError {
            pos: pos_of(e.marker(), source),
            message: format!("YAML syntax error: {}", e.info()),
        });
    }
    if let Some(err) = builder.error {
        return Err(err);
    }
    Ok(builder.root.unwrap_or(Node {
        kind: NodeKind::Null,
        pos: Pos {
            line: 1,
            col: 1,
            source,
        },
    }))
}

fn pos_of(mark: &Marker, source: u16) -> Pos {
    // yaml-rust2 lines are 1-based and columns 0-based.
    Pos {
        line: u32::try_from(mark.line()).unwrap_or(u32::MAX),
        col: u32::try_from(mark.col() + 1).unwrap_or(u32::MAX),
        source,
    }
}

/// A collection under construction.
enum Frame {
    Seq {
        pos: Pos,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        pos: Pos,
        anchor: usize,
        entries: Vec<(Key, Node)>,
        pending_key: Option<Key>,
    },
}

/// Turns parser events into a [`Node`] tree, enforcing the limits.
struct Builder {
    source: u16,
    stack: Vec<Frame>,
    anchors: BTreeMap<usize, Node>,
    root: Option<Node>,
    documents: usize,
    nodes: usize,
    error: Option<YamlError>,
}

impl Builder {
    fn new(source: u16) -> Self {
        Builder {
            source,
            stack: Vec::new(),
            anchors: BTreeMap::new(),
            root: None,
            documents: 0,
            nodes: 0,
            error: None,
        }
    }

    fn fail(&mut self, pos: Pos, message: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(YamlError {
                pos,
                message: message.into(),
            });
        }
    }

    fn count(&mut self, node: &Node) -> bool {
        self.nodes = self.nodes.saturating_add(count_nodes(node));
        if self.nodes > NODES_MAX {
            self.fail(
                node.pos,
                format!("document too large: more than {NODES_MAX} nodes after expanding aliases"),
            );
            return false;
        }
        true
    }

    /// Places a finished node into its parent (or makes it the root).
    fn push(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map {
                entries,
                pending_key,
                ..
            }) => match pending_key.take() {
                None => match key_text(&node) {
                    Some(name) => {
                        *pending_key = Some(Key {
                            name,
                            pos: node.pos,
                        })
                    }
                    None => {
                        let pos = node.pos;
                        self.fail(pos, "map keys must be scalars (strings or numbers)");
                    }
                },
                Some(key) => {
                    if entries.iter().any(|(k, _)| k.name == key.name) {
                        let message = format!("duplicate key `{}`", key.name);
                        self.fail(key.pos, message);
                    } else {
                        entries.push((key, node));
                    }
                }
            },
        }
    }
}

fn key_text(node: &Node) -> Option<String> {
    match &node.kind {
        NodeKind::Str(s) => Some(s.clone()),
        NodeKind::Int(i) => Some(i.to_string()),
        NodeKind::Float(f) => Some(f.to_string()),
        NodeKind::Bool(b) => Some(b.to_string()),
        NodeKind::Null => Some(String::new()),
        NodeKind::Seq(_) | NodeKind::Map(_) => None,
    }
}

fn count_nodes(node: &Node) -> usize {
    match &node.kind {
        NodeKind::Seq(items) => 1 + items.iter().map(count_nodes).sum::<usize>(),
        NodeKind::Map(entries) => {
            1 + entries
                .iter()
                .map(|(_, v)| 1 + count_nodes(v))
                .sum::<usize>()
        }
        _ => 1,
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let pos = pos_of(&mark, self.source);
        match ev {
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents > 1 {
                    self.fail(pos, "only one YAML document is allowed in a config file");
                }
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(mut node) => {
                    node.pos = pos;
                    if self.count(&node) {
                        self.push(node, 0);
                    }
                }
                None => self.fail(pos, "alias refers to an unknown anchor"),
            },
            Event::Scalar(text, style, anchor, tag) => {
                let node = Node {
                    kind: resolve_scalar(text, style, tag.as_ref()),
                    pos,
                };
                if self.count(&node) {
                    self.push(node, anchor);
                }
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if self.stack.len() >= DEPTH_MAX {
                    self.fail(pos, format!("nesting deeper than {DEPTH_MAX} levels"));
                    return;
                }
                let frame = if matches!(ev, Event::SequenceStart(..)) {
                    Frame::Seq {
                        pos,
                        anchor,
                        items: Vec::new(),
                    }
                } else {
                    Frame::Map {
                        pos,
                        anchor,
                        entries: Vec::new(),
                        pending_key: None,
                    }
                };
                self.stack.push(frame);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Frame::Seq { pos, anchor, items }) => (
                        Node {
                            kind: NodeKind::Seq(items),
                            pos,
                        },
                        anchor,
                    ),
                    Some(Frame::Map {
                        pos,
                        anchor,
                        entries,
                        ..
                    }) => (
                        Node {
                            kind: NodeKind::Map(entries),
                            pos,
                        },
                        anchor,
                    ),
                    None => {
                        self.fail(pos, "unbalanced collection end");
                        return;
                    }
                };
                // The children were already counted; count only the collection itself.
                self.nodes = self.nodes.saturating_add(1);
                self.push(node, anchor);
            }
        }
    }
}

/// Resolves a scalar's type with the YAML 1.2 core schema.
fn resolve_scalar(text: String, style: TScalarStyle, tag: Option<&Tag>) -> NodeKind {
    if let Some(tag) = tag {
        match tag.suffix.as_str() {
            "str" => return NodeKind::Str(text),
            "null" => return NodeKind::Null,
            _ => {}
        }
    }
    if style != TScalarStyle::Plain {
        return NodeKind::Str(text);
    }
    match text.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return NodeKind::Null,
        "true" | "True" | "TRUE" => return NodeKind::Bool(true),
        "false" | "False" | "FALSE" => return NodeKind::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return NodeKind::Float(f64::INFINITY)
        }
        "-.inf" | "-.Inf" | "-.INF" => return NodeKind::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return NodeKind::Float(f64::NAN),
        _ => {}
    }
    if let Some(i) = parse_int(&text) {
        return NodeKind::Int(i);
    }
    if looks_like_float(&text) {
        if let Ok(f) = text.parse::<f64>() {
            return NodeKind::Float(f);
        }
    }
    NodeKind::Str(text)
}

fn parse_int(text: &str) -> Option<i64> {
    if let Some(hex) = text.strip_prefix("0x") {
        return i64::from_str_radix(hex, 16).ok();
    }
    if let Some(oct) = text.strip_prefix("0o") {
        return i64::from_str_radix(oct, 8).ok();
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<i64>().ok()
}

/// `[-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?`
fn looks_like_float(text: &str) -> bool {
    let b = text.strip_prefix(['-', '+']).unwrap_or(text).as_bytes();
    let mut i = 0;
    let int_digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    i += int_digits;
    let mut frac_digits = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        frac_digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        i += frac_digits;
    }
    if int_digits == 0 && frac_digits == 0 {
        return false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        let exp_digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        if exp_digits == 0 {
            return false;
        }
        i += exp_digits;
    }
    i == b.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(text: &str) -> NodeKind {
        parse(text, 0).expect("parses").kind
    }

    #[test]
    fn scalars_resolve_with_the_core_schema() {
        let cases: &[(&str, NodeKind)] = &[
            ("1", NodeKind::Int(1)),
            ("-4", NodeKind::Int(-4)),
            ("0x1f", NodeKind::Int(31)),
            (".0001", NodeKind::Float(0.0001)),
            ("1e-4", NodeKind::Float(1e-4)),
            ("1.", NodeKind::Float(1.0)),
            ("true", NodeKind::Bool(true)),
            ("~", NodeKind::Null),
            ("'1'", NodeKind::Str("1".into())),
            ("\"true\"", NodeKind::Str("true".into())),
            ("1.2.3", NodeKind::Str("1.2.3".into())),
            ("e5", NodeKind::Str("e5".into())),
            ("!!str 12", NodeKind::Str("12".into())),
        ];
        for (text, want) in cases {
            assert_eq!(&kind(text), want, "for {text}");
        }
    }

    #[test]
    fn positions_are_one_based_line_and_column() {
        let node = parse("a: 1\nsearcher:\n  max_trails: 3\n", 0).expect("parses");
        let searcher = node.get("searcher").expect("searcher");
        let NodeKind::Map(entries) = &searcher.kind else {
            panic!("map expected");
        };
        assert_eq!(entries[0].0.name, "max_trails");
        assert_eq!((entries[0].0.pos.line, entries[0].0.pos.col), (3, 3));
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let err = parse("a: 1\na: 2\n", 0).expect_err("duplicate");
        assert_eq!(err.to_string(), "2:1: duplicate key `a`");
    }

    #[test]
    fn aliases_expand_and_are_bounded() {
        let node = parse("a: &x [1, 2]\nb: *x\n", 0).expect("parses");
        assert_eq!(
            node.get("b").map(|n| n.to_value()),
            node.get("a").map(|n| n.to_value())
        );
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..9 {
            let prev = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
            ));
        }
        let err = parse(&bomb, 0).expect_err("too large");
        assert!(err.message.contains("too large"), "{err}");
    }

    #[test]
    fn deep_nesting_is_an_error() {
        let text = "[".repeat(10_000);
        assert!(parse(&text, 0).is_err());
        let text = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        let err = parse(&text, 0).expect_err("too deep");
        assert!(err.message.contains("nesting"), "{err}");
    }

    #[test]
    fn second_document_is_an_error() {
        assert!(parse("a: 1\n---\nb: 2\n", 0).is_err());
    }
}
