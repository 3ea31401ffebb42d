//! The former classification walk over a `serde_json::Value` copy of the
//! parse tree, kept for tests only: the differential test in `tests.rs`
//! checks the direct walk (`walk.rs`) against it on a corpus.

use std::collections::BTreeSet;
use std::ops::Range;

use pg_query::NodeEnum;
use serde_json::Value;

use super::{changes_owner, dropped_relations, top_kind, Relation, SqlError, Statement, StatementKind};

/// Classifies every statement of `query` (`standard_conforming_strings` on)
/// with the JSON walk.
pub(super) fn classify_json(query: &str) -> Result<Vec<Statement>, SqlError> {
    super::classify_parsed(query, true, classify_node_json)
}

/// The former `classify_node`, verbatim.
fn classify_node_json(node: &NodeEnum, span: Range<usize>) -> Result<Statement, SqlError> {
    let tree = serde_json::to_value(node).map_err(|e| SqlError::Tree(e.to_string()))?;
    let mut relations = BTreeSet::new();
    collect_relations(&tree, &mut relations);
    if let NodeEnum::DropStmt(d) = node {
        dropped_relations(d, &mut relations);
    }
    let (kind, has_where, carried) = top_kind(node);
    let mut inner = match carried {
        Some(inner) => match inner.node.as_ref() {
            Some(n) => vec![classify_node_json(n, span.clone())?],
            None => Vec::new(),
        },
        None => {
            let mut inner = Vec::new();
            nested_modifications(&tree, true, &span, &mut inner);
            inner
        }
    };
    if kind == StatementKind::Ddl && changes_owner(node) {
        let relations = relations.iter().cloned().collect();
        inner.push(Statement {
            kind: StatementKind::Grant,
            relations,
            has_where: None,
            span: span.clone(),
            inner: vec![],
            columns: Default::default(),
        });
    }
    // Column references are the direct walk's alone (the comparison ignores them).
    Ok(Statement {
        kind,
        relations: relations.into_iter().collect(),
        has_where,
        span,
        inner,
        columns: Default::default(),
    })
}

/// Every `RangeVar` in a serialised parse tree, except unqualified
/// references to a common table expression in scope. The JSON walk reaches
/// every node whatever its type, so no statement type can hide a relation
/// from a hand-written traversal that forgot it.
fn collect_relations(v: &Value, out: &mut BTreeSet<Relation>) {
    walk_relations(v, &mut Vec::new(), out);
}

/// `scope`: the CTE names an unqualified `RangeVar` here would refer to, as
/// PostgreSQL scopes them: a `WITH`'s statement sees all of its CTEs; a
/// CTE's own query sees the ones before it, or all of them with
/// `RECURSIVE`. Tables written or created (`relation`: the target of
/// `INSERT`, `UPDATE`, `DELETE`, `MERGE`, `COPY`...; `into_clause`) are
/// never CTEs, so they are always listed.
fn walk_relations(v: &Value, scope: &mut Vec<String>, out: &mut BTreeSet<Relation>) {
    match v {
        Value::Object(map) => {
            // RangeVar is the only node with these three fields.
            if let (Some(Value::String(name)), Some(Value::String(schema)), Some(_)) =
                (map.get("relname"), map.get("schemaname"), map.get("catalogname"))
            {
                let cte = schema.is_empty() && scope.iter().any(|n| n == name);
                if !name.is_empty() && !cte {
                    let schema = (!schema.is_empty()).then(|| schema.clone());
                    out.insert(Relation { schema, name: name.clone() });
                }
            }
            let base = scope.len();
            let with = map.get("with_clause").filter(|w| !w.is_null());
            if let Some(with) = with {
                let ctes: Vec<(String, &Value)> = with
                    .get("ctes")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c.get("node")?.get("CommonTableExpr"))
                    .map(|c| (c.get("ctename").and_then(Value::as_str).unwrap_or("").to_owned(), c))
                    .collect();
                let recursive = with.get("recursive").and_then(Value::as_bool).unwrap_or(false);
                for (i, (_, cte)) in ctes.iter().enumerate() {
                    let visible = if recursive { &ctes[..] } else { &ctes[..i] };
                    scope.extend(visible.iter().map(|(n, _)| n.clone()));
                    walk_relations(cte, scope, out);
                    scope.truncate(base);
                }
                scope.extend(ctes.iter().map(|(n, _)| n.clone()));
            }
            for (key, value) in map {
                match key.as_str() {
                    "with_clause" if with.is_some() => {}
                    "relation" | "into_clause" => walk_relations(value, &mut Vec::new(), out),
                    _ => walk_relations(value, scope, out),
                }
            }
            scope.truncate(base);
        }
        Value::Array(items) => items.iter().for_each(|v| walk_relations(v, scope, out)),
        _ => {}
    }
}

/// Data-modifying statements nested in a serialised tree (CTEs, rule
/// actions), each classified with its own nested ones. `top` skips the
/// statement itself.
fn nested_modifications(v: &Value, top: bool, span: &Range<usize>, out: &mut Vec<Statement>) {
    match v {
        Value::Object(map) => {
            if !top && map.len() == 1 {
                if let Some((tag, body)) = map.iter().next() {
                    let kind = match tag.as_str() {
                        "InsertStmt" => Some(StatementKind::Insert),
                        "UpdateStmt" => Some(StatementKind::Update),
                        "DeleteStmt" => Some(StatementKind::Delete),
                        "MergeStmt" => Some(StatementKind::Merge),
                        _ => None,
                    };
                    if let Some(kind) = kind {
                        let mut relations = BTreeSet::new();
                        collect_relations(body, &mut relations);
                        let has_where =
                            kind.filters_rows().then(|| body.get("where_clause").is_some_and(|w| !w.is_null()));
                        let mut inner = Vec::new();
                        nested_modifications(body, false, span, &mut inner);
                        out.push(Statement {
                            kind,
                            relations: relations.into_iter().collect(),
                            has_where,
                            span: span.clone(),
                            inner,
                            columns: Default::default(),
                        });
                        return;
                    }
                }
            }
            map.values().for_each(|v| nested_modifications(v, false, span, out));
        }
        Value::Array(items) => items.iter().for_each(|v| nested_modifications(v, false, span, out)),
        _ => {}
    }
}
