//! SQL statements classified for the policy with PostgreSQL's own grammar.
//!
//! [`classify`] parses a query string with libpg_query (the `pg_query`
//! crate: the server's parser, compiled in) and returns one [`Statement`]
//! per statement of the query: its [`StatementKind`], every relation it
//! touches, whether an `UPDATE`/`DELETE` has a `WHERE` clause, and the
//! statements it carries inside that run too ([`Statement::inner`]). A
//! parser that disagreed with the server would be a bypass, hence the real
//! grammar; text it cannot parse is an error, and the caller refuses it.
//!
//! What the policy sees, and why:
//! - Each statement of a multi-statement query is classified on its own.
//! - Statements that carry another statement are judged for it too:
//!   `EXPLAIN [ANALYZE] <stmt>`, `PREPARE x AS <stmt>`,
//!   `DECLARE c CURSOR FOR <query>`, `COPY (<query>) TO`, and every
//!   data-modifying statement nested anywhere (`WITH d AS (DELETE ...)
//!   SELECT ...`, rule actions): each becomes an entry of
//!   [`Statement::inner`], classified like a top-level statement.
//! - Relations are collected from the whole parse tree, subqueries, CTEs
//!   and inner statements included, as PostgreSQL resolves identifiers:
//!   unquoted names folded to lower case, quoted ones as written. An
//!   unqualified name referring to a CTE in scope (PostgreSQL's scoping:
//!   a CTE's query sees earlier CTEs only, unless `RECURSIVE`) is not a
//!   relation; the table a statement writes or creates always is.
//! - Column references are recorded for column masks ([`ColumnReads`]):
//!   every column named other than as a plain output column of the
//!   top-level select list, and whether whole rows are read. The gate
//!   refuses such reads of masked columns, which a mask matching result
//!   column names could not follow.
//! - `SELECT ... INTO t` creates a table: it is [`StatementKind::Ddl`].
//! - `SET ROLE` and `SET SESSION AUTHORIZATION` change the privileges the
//!   session acts with: [`StatementKind::Grant`], like `GRANT`, `ALTER ROLE`
//!   and `ALTER ... OWNER TO`.
//!
//! Out of scope, by design (document them to operators, never rely on
//! them): side effects of functions called from any statement
//! (`SELECT pg_terminate_backend(...)`, `dblink_exec`, `lo_import`,
//! `set_config`), the bodies of functions, procedures and `DO` blocks
//! (strings to the parser: a `DO` is [`StatementKind::Call`]), what
//! triggers and rules do, and which schema an unqualified name resolves to
//! (the session's `search_path`: see `docs/policy.md` on relation matching).
//! `EXECUTE x` runs what `PREPARE x` prepared, which was judged then.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;

use pg_query::protobuf::{AlterTableType, ObjectType};
use pg_query::NodeEnum;
use serde::Serialize;

/// Why a query could not be classified; the caller refuses it
/// (SQLSTATE 42601, syntax error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SqlError {
    /// PostgreSQL's grammar rejects the text (or it holds a NUL byte).
    #[error("the statement does not parse as PostgreSQL SQL: {0}")]
    Syntax(String),
    /// The parse tree could not be read back (a bug, not the client's).
    #[error("the parse tree could not be read: {0}")]
    Tree(String),
    /// The text reads as different statements with `standard_conforming_strings`
    /// on and off, and the setting in force was not given: refused rather
    /// than guessed.
    #[error(
        "the statement reads differently with standard_conforming_strings on and off (a backslash in a \
         '...' literal): write E'...' strings or double the quotes"
    )]
    Ambiguous,
}

/// How the session's server lexes string literals: the parser must lex them
/// as the server does, or `'\'; DELETE FROM t; --'` is one statement to one
/// and two to the other.
///
/// `standard_conforming_strings` changes with `SET` (and `set_config`), and a
/// pipelining client can send its next statement before the server's
/// `ParameterStatus` reporting the change reaches the handler, so the
/// default asks nothing of the handler: the text must read the same both
/// ways (it does unless a `'...'` literal holds a backslash). A reading that
/// does not parse is one the server cannot execute either, so the other
/// one decides; two readings that parse and differ are
/// [`SqlError::Ambiguous`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParseOptions {
    /// The server's `standard_conforming_strings` when the handler knows it
    /// for certain (off makes `\` an escape inside `'...'`); `None` (the
    /// default): both readings must agree.
    pub standard_conforming_strings: Option<bool>,
}

/// The direction of a `COPY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyDirection {
    /// `COPY ... FROM`: rows into a table.
    From,
    /// `COPY ... TO`: rows out of a table or query.
    To,
}

/// What kind of statement it is, for `match.statement.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum StatementKind {
    /// `SELECT`, `VALUES`, `TABLE t` (`SELECT ... INTO` is [`StatementKind::Ddl`]).
    Select,
    /// `INSERT`.
    Insert,
    /// `UPDATE`.
    Update,
    /// `DELETE`.
    Delete,
    /// `MERGE`.
    Merge,
    /// Schema changes: `CREATE`, `ALTER`, `DROP`, `COMMENT`, `REFRESH
    /// MATERIALIZED VIEW`, `CREATE TABLE AS`, `SELECT ... INTO`, ...
    Ddl,
    /// `TRUNCATE`.
    Truncate,
    /// `COPY`.
    Copy {
        /// Into (`FROM`) or out of (`TO`) the database.
        direction: CopyDirection,
        /// `FROM PROGRAM` / `TO PROGRAM`: the server runs a shell command.
        program: bool,
    },
    /// Privileges and roles: `GRANT`, `REVOKE`, `CREATE/ALTER/DROP ROLE`,
    /// `ALTER DEFAULT PRIVILEGES`, `ALTER ... OWNER TO`, `REASSIGN OWNED`,
    /// `DROP OWNED`, `SET ROLE`, `SET SESSION AUTHORIZATION`.
    Grant,
    /// `CALL` and `DO`.
    Call,
    /// `BEGIN`, `START TRANSACTION`, `COMMIT`, `ROLLBACK`, `SAVEPOINT`,
    /// `RELEASE`, `PREPARE TRANSACTION`, `COMMIT/ROLLBACK PREPARED`.
    Transaction,
    /// `SET`, `RESET`, `SET TRANSACTION`, `SET CONSTRAINTS`.
    Set,
    /// `SHOW`.
    Show,
    /// `EXPLAIN` (the explained statement is an inner statement).
    Explain,
    /// `PREPARE x AS ...` (the prepared statement is an inner statement).
    Prepare,
    /// `EXECUTE x`.
    Execute,
    /// `DEALLOCATE`.
    Deallocate,
    /// `DECLARE ... CURSOR` (its query is an inner statement), `FETCH`,
    /// `MOVE`, `CLOSE`.
    Cursor,
    /// `LISTEN`, `UNLISTEN`.
    Listen,
    /// `NOTIFY`.
    Notify,
    /// Maintenance and session utilities: `VACUUM`, `ANALYZE`, `CLUSTER`,
    /// `REINDEX`, `CHECKPOINT`, `DISCARD`, `LOCK`, `LOAD`, `ALTER SYSTEM`.
    Utility,
    /// A statement this classifier does not know (a grammar newer than it):
    /// refused unless a rule allows `unknown`.
    Unknown,
}

impl StatementKind {
    /// Every kind name a policy may use, each with the kinds it stands for.
    /// `copy` is both directions.
    pub const NAMES: &'static [&'static str] = &[
        "select",
        "insert",
        "update",
        "delete",
        "merge",
        "ddl",
        "truncate",
        "copy",
        "copy_from",
        "copy_to",
        "grant",
        "call",
        "transaction",
        "set",
        "show",
        "explain",
        "prepare",
        "execute",
        "deallocate",
        "cursor",
        "listen",
        "notify",
        "utility",
        "unknown",
    ];

    /// The kind's name in policies (`copy_from` / `copy_to` for `COPY`).
    pub fn as_str(self) -> &'static str {
        match self {
            StatementKind::Select => "select",
            StatementKind::Insert => "insert",
            StatementKind::Update => "update",
            StatementKind::Delete => "delete",
            StatementKind::Merge => "merge",
            StatementKind::Ddl => "ddl",
            StatementKind::Truncate => "truncate",
            StatementKind::Copy { direction: CopyDirection::From, .. } => "copy_from",
            StatementKind::Copy { direction: CopyDirection::To, .. } => "copy_to",
            StatementKind::Grant => "grant",
            StatementKind::Call => "call",
            StatementKind::Transaction => "transaction",
            StatementKind::Set => "set",
            StatementKind::Show => "show",
            StatementKind::Explain => "explain",
            StatementKind::Prepare => "prepare",
            StatementKind::Execute => "execute",
            StatementKind::Deallocate => "deallocate",
            StatementKind::Cursor => "cursor",
            StatementKind::Listen => "listen",
            StatementKind::Notify => "notify",
            StatementKind::Utility => "utility",
            StatementKind::Unknown => "unknown",
        }
    }

    /// One bit per policy kind name (index in [`StatementKind::NAMES`]),
    /// so a rule's kinds are a mask and matching allocates nothing.
    pub fn bit(self) -> u32 {
        let name = self.as_str();
        let index = Self::NAMES.iter().position(|n| *n == name).unwrap_or(Self::NAMES.len() - 1);
        1 << index
    }

    /// The bits a policy kind name stands for (`copy`: both directions);
    /// `None` for an unknown name.
    pub fn bits_of_name(name: &str) -> Option<u32> {
        if name == "copy" {
            let from = StatementKind::Copy { direction: CopyDirection::From, program: false };
            let to = StatementKind::Copy { direction: CopyDirection::To, program: false };
            return Some(from.bit() | to.bit());
        }
        Self::NAMES.iter().position(|n| *n == name).map(|i| 1 << i)
    }

    /// Whether `UPDATE`/`DELETE`: the kinds a `where` selector applies to.
    pub fn filters_rows(self) -> bool {
        matches!(self, StatementKind::Update | StatementKind::Delete)
    }
}

impl fmt::Display for StatementKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A table, view, sequence or other relation a statement names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Relation {
    /// The schema when the statement wrote one (`billing.invoices`); `None`
    /// when unqualified: then the session's `search_path` decides, which the
    /// gateway does not know.
    pub schema: Option<String>,
    /// The relation's name, as PostgreSQL resolves the identifier (unquoted:
    /// lower case; quoted: as written).
    pub name: String,
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// One classified statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Statement {
    /// What kind of statement it is.
    pub kind: StatementKind,
    /// Every relation the statement names, anywhere in it (inner statements
    /// included), each once, ordered by (schema, name), unqualified first.
    pub relations: Vec<Relation>,
    /// For `UPDATE` and `DELETE`: whether it has a `WHERE` clause (`WHERE
    /// CURRENT OF` included); `None` for other kinds.
    pub has_where: Option<bool>,
    /// Byte range of the statement in the query text (for inner statements:
    /// the enclosing top-level statement's).
    pub span: Range<usize>,
    /// Statements this one carries that run too, each judged on its own:
    /// `EXPLAIN`'s, `PREPARE`'s and `DECLARE CURSOR`'s statement, `COPY`'s
    /// query, and data-modifying statements nested anywhere (CTEs, rules).
    pub inner: Vec<Statement>,
    /// The columns it reads other than as plain output columns, for column
    /// masks (of the whole statement, inner statements included; empty for
    /// inner statements themselves).
    #[serde(skip)]
    pub columns: ColumnReads,
}

/// The columns a statement reads in a way a column mask cannot follow:
/// anywhere but as a plain, un-aliased output column of its top-level
/// target list (or `RETURNING` list), where the server names the result
/// column after the column itself (`SELECT ssn`, `SELECT t.ssn`, `SELECT *`).
///
/// An alias (`ssn AS x`), an expression (`upper(ssn)`), a subquery, a CTE,
/// a condition (`WHERE ssn LIKE '1%'`: an oracle), `ORDER BY`, `GROUP BY`,
/// `JOIN ... USING (ssn)`: each reads the column under another name or
/// none, so a statement whose mask matches one of these names is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ColumnReads {
    /// The column names read so, each NUL-terminated (as PostgreSQL
    /// resolves identifiers; a name may repeat): one buffer, not a `String`
    /// per name, as every statement is classified.
    names: String,
    /// Whether it reads a whole row or every column so: a range's name
    /// used as a value (`SELECT p FROM t p`, `to_json(p)`), `*` anywhere
    /// but a plain output (`row(t.*)`, `(SELECT * FROM t)`), an alias column
    /// list (`FROM t AS x(a, b)`), a `NATURAL` join.
    pub whole_row: bool,
}

impl ColumnReads {
    /// The column names read other than as plain output columns (a name
    /// may repeat).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.split_terminator('\0')
    }

    /// Whether nothing is read other than as plain output columns.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && !self.whole_row
    }
}

impl Statement {
    /// This statement's text in `query` (the string it was classified from).
    pub fn text<'q>(&self, query: &'q str) -> &'q str {
        query.get(self.span.clone()).unwrap_or("")
    }

    /// Calls `f` on this statement and every inner statement, depth first:
    /// everything the policy judges for it.
    pub fn visit<'s>(&'s self, f: &mut impl FnMut(&'s Statement)) {
        f(self);
        for s in &self.inner {
            s.visit(f);
        }
    }
}

/// Classifies every statement of `query` however the server lexes string
/// literals ([`ParseOptions::default`]).
pub fn classify(query: &str) -> Result<Vec<Statement>, SqlError> {
    classify_with(query, ParseOptions::default())
}

/// Classifies every statement of `query`, lexing it as `options` say the
/// server does. An empty query (or only comments) has no statements.
pub fn classify_with(query: &str, options: ParseOptions) -> Result<Vec<Statement>, SqlError> {
    match options.standard_conforming_strings {
        Some(on) => classify_lexed(query, on),
        // Without a backslash both readings are the same text.
        None if !query.contains('\\') => classify_lexed(query, true),
        None => match (classify_lexed(query, true), classify_lexed(query, false)) {
            (Ok(on), Ok(off)) if on == off => Ok(on),
            (Ok(_), Ok(_)) => Err(SqlError::Ambiguous),
            (Ok(one), Err(_)) | (Err(_), Ok(one)) => Ok(one),
            (Err(e), Err(_)) => Err(e),
        },
    }
}

/// Classifies `query` with `standard_conforming_strings` set to `on`.
fn classify_lexed(query: &str, on: bool) -> Result<Vec<Statement>, SqlError> {
    classify_parsed(query, on, classify_node)
}

/// Parses `query` and classifies each statement with `node_kind` (the
/// tests compare two classifiers on the same parse).
fn classify_parsed(
    query: &str,
    on: bool,
    node_kind: fn(&NodeEnum, Range<usize>) -> Result<Statement, SqlError>,
) -> Result<Vec<Statement>, SqlError> {
    let mut parser = pg_query::ParserOptions::DEFAULT;
    if !on {
        parser |= pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS;
    }
    let parsed = pg_query::parse(query, parser).map_err(|e| match e {
        pg_query::Error::Parse(m) => SqlError::Syntax(m),
        pg_query::Error::Conversion(_) => SqlError::Syntax("the text holds a NUL byte".into()),
        other => SqlError::Tree(other.to_string()),
    })?;
    let mut out = Vec::with_capacity(parsed.protobuf.stmts.len());
    for raw in &parsed.protobuf.stmts {
        let start = usize::try_from(raw.stmt_location).unwrap_or(0).min(query.len());
        // A length of 0 means "to the end of the text".
        let end = match usize::try_from(raw.stmt_len) {
            Ok(0) | Err(_) => query.len(),
            Ok(len) => start.saturating_add(len).min(query.len()),
        };
        let node = raw
            .stmt
            .as_ref()
            .and_then(|n| n.node.as_ref())
            .ok_or_else(|| SqlError::Tree("a statement without a parse tree".into()))?;
        out.push(node_kind(node, start..end)?);
    }
    Ok(out)
}

/// Classifies one parsed statement.
fn classify_node(node: &NodeEnum, span: Range<usize>) -> Result<Statement, SqlError> {
    let tree_error = |e: walk::WalkError| SqlError::Tree(e.to_string());
    let (mut relations, _, refs) = walk::relations_and_columns(node).map_err(tree_error)?;
    let mut plain = Vec::new();
    plain_outputs(node, &mut plain);
    let (names, whole_row) = refs.reads(&plain);
    let columns = ColumnReads { names, whole_row };
    if let NodeEnum::DropStmt(d) = node {
        dropped_relations(d, &mut relations);
    }
    let (kind, has_where, carried) = top_kind(node);
    let mut inner = match carried {
        Some(inner) => match inner.node.as_ref() {
            Some(n) => vec![classify_node(n, span.clone())?],
            None => Vec::new(),
        },
        None => walk::modifications(node, true, &span).map_err(tree_error)?,
    };
    owner_change(node, kind, &relations, &span, &mut inner);
    Ok(Statement { kind, relations: relations.into_iter().collect(), has_where, span, inner, columns })
}

/// A `RETURNING` list's entries.
fn returning(r: &Option<pg_query::protobuf::ReturningClause>) -> Option<&[pg_query::Node]> {
    r.as_ref().map(|r| &r.exprs[..])
}

/// The locations of the `ColumnRef`s that are plain output columns of
/// `node`: bare, un-aliased entries of its top-level target list (for a set
/// operation, its leftmost query's, which names the result's columns) or
/// `RETURNING` list; those of the query `EXPLAIN`, `PREPARE` and `DECLARE`
/// carry. Not `SELECT ... INTO` (the rows go to a table) nor `COPY` (its
/// rows are not masked: refused by the handler).
fn plain_outputs(node: &NodeEnum, out: &mut Vec<i32>) {
    let carried = |n: &Option<Box<pg_query::Node>>, out: &mut Vec<i32>| {
        if let Some(n) = n.as_deref().and_then(|n| n.node.as_ref()) {
            plain_outputs(n, out);
        }
    };
    let targets = match node {
        NodeEnum::SelectStmt(s) => {
            let mut s: &pg_query::protobuf::SelectStmt = s;
            if sorts_by_position(s) {
                return;
            }
            while s.op != pg_query::protobuf::SetOperation::SetopNone as i32 {
                match s.larg.as_deref() {
                    Some(l) => s = l,
                    None => return,
                }
            }
            if s.into_clause.is_some() || sorts_by_position(s) {
                return;
            }
            Some(&s.target_list[..])
        }
        NodeEnum::InsertStmt(s) => returning(&s.returning_clause),
        NodeEnum::UpdateStmt(s) => returning(&s.returning_clause),
        NodeEnum::DeleteStmt(s) => returning(&s.returning_clause),
        NodeEnum::MergeStmt(s) => returning(&s.returning_clause),
        NodeEnum::ExplainStmt(e) => return carried(&e.query, out),
        NodeEnum::PrepareStmt(p) => return carried(&p.query, out),
        NodeEnum::DeclareCursorStmt(d) => return carried(&d.query, out),
        _ => None,
    };
    for target in targets.into_iter().flatten() {
        let Some(NodeEnum::ResTarget(t)) = target.node.as_ref() else { continue };
        if !t.name.is_empty() || !t.indirection.is_empty() {
            continue;
        }
        if let Some(NodeEnum::ColumnRef(c)) = t.val.as_deref().and_then(|v| v.node.as_ref()) {
            out.push(c.location);
        }
    }
}

/// Whether `ORDER BY`, `GROUP BY` or `DISTINCT ON` names an output column
/// by its position (`ORDER BY 1`): that sorts or groups by the column
/// itself, an oracle on its values like `ORDER BY ssn`. Which column it is
/// would depend on the constant's value, and classification must not (the
/// memo classifies queries that differ only in literals alike): so any
/// positional reference makes every output column count as read.
fn sorts_by_position(s: &pg_query::protobuf::SelectStmt) -> bool {
    let constant = |n: &pg_query::Node| matches!(n.node, Some(NodeEnum::AConst(_)));
    s.sort_clause.iter().any(|n| match &n.node {
        Some(NodeEnum::SortBy(by)) => by.node.as_deref().is_some_and(constant),
        _ => false,
    }) || s.group_clause.iter().any(constant)
        || s.distinct_clause.iter().any(constant)
}

/// `ALTER TABLE t OWNER TO r, ADD ...`: a privilege change inside a schema
/// change, judged as an inner statement.
fn owner_change(
    node: &NodeEnum,
    kind: StatementKind,
    relations: &BTreeSet<Relation>,
    span: &Range<usize>,
    inner: &mut Vec<Statement>,
) {
    if kind == StatementKind::Ddl && changes_owner(node) {
        inner.push(Statement {
            kind: StatementKind::Grant,
            relations: relations.iter().cloned().collect(),
            has_where: None,
            span: span.clone(),
            inner: vec![],
            columns: ColumnReads::default(),
        });
    }
}

/// Whether an `ALTER TABLE` changes the owner among other changes.
fn changes_owner(node: &NodeEnum) -> bool {
    let NodeEnum::AlterTableStmt(a) = node else { return false };
    a.cmds.iter().any(|c| matches!(c.node.as_ref(), Some(NodeEnum::AlterTableCmd(c)) if c.subtype == AlterTableType::AtChangeOwner as i32))
}

/// Whether every change of an `ALTER TABLE` is an owner change.
fn only_changes_owner(a: &pg_query::protobuf::AlterTableStmt) -> bool {
    !a.cmds.is_empty()
        && a.cmds.iter().all(|c| matches!(c.node.as_ref(), Some(NodeEnum::AlterTableCmd(c)) if c.subtype == AlterTableType::AtChangeOwner as i32))
}

/// The kind of a top-level statement, whether an `UPDATE`/`DELETE` filters,
/// and the statement it carries (`EXPLAIN`, `PREPARE`, `DECLARE`, `COPY (query)`).
fn top_kind(node: &NodeEnum) -> (StatementKind, Option<bool>, Option<&pg_query::Node>) {
    use StatementKind as K;
    let kind = match node {
        NodeEnum::SelectStmt(s) if s.into_clause.is_some() => K::Ddl,
        NodeEnum::SelectStmt(_) => K::Select,
        NodeEnum::InsertStmt(_) => K::Insert,
        NodeEnum::UpdateStmt(u) => return (K::Update, Some(u.where_clause.is_some()), None),
        NodeEnum::DeleteStmt(d) => return (K::Delete, Some(d.where_clause.is_some()), None),
        NodeEnum::MergeStmt(_) => K::Merge,
        NodeEnum::TruncateStmt(_) => K::Truncate,
        NodeEnum::CopyStmt(c) => {
            let direction = if c.is_from { CopyDirection::From } else { CopyDirection::To };
            return (K::Copy { direction, program: c.is_program }, None, c.query.as_deref());
        }
        NodeEnum::ExplainStmt(e) => return (K::Explain, None, e.query.as_deref()),
        NodeEnum::PrepareStmt(p) => return (K::Prepare, None, p.query.as_deref()),
        NodeEnum::DeclareCursorStmt(d) => return (K::Cursor, None, d.query.as_deref()),
        NodeEnum::FetchStmt(_) | NodeEnum::ClosePortalStmt(_) => K::Cursor,
        NodeEnum::ExecuteStmt(_) => K::Execute,
        NodeEnum::DeallocateStmt(_) => K::Deallocate,
        NodeEnum::AlterTableStmt(a) if only_changes_owner(a) => K::Grant,
        NodeEnum::TransactionStmt(_) => K::Transaction,
        NodeEnum::VariableSetStmt(v) => {
            // `RESET ROLE` too: any change to whom the session acts as.
            if v.name == "role" || v.name == "session_authorization" {
                K::Grant
            } else {
                K::Set
            }
        }
        NodeEnum::ConstraintsSetStmt(_) => K::Set,
        NodeEnum::VariableShowStmt(_) => K::Show,
        NodeEnum::CallStmt(_) | NodeEnum::DoStmt(_) => K::Call,
        NodeEnum::ListenStmt(_) | NodeEnum::UnlistenStmt(_) => K::Listen,
        NodeEnum::NotifyStmt(_) => K::Notify,
        NodeEnum::GrantStmt(_)
        | NodeEnum::GrantRoleStmt(_)
        | NodeEnum::AlterDefaultPrivilegesStmt(_)
        | NodeEnum::CreateRoleStmt(_)
        | NodeEnum::AlterRoleStmt(_)
        | NodeEnum::AlterRoleSetStmt(_)
        | NodeEnum::DropRoleStmt(_)
        | NodeEnum::AlterOwnerStmt(_)
        | NodeEnum::ReassignOwnedStmt(_)
        | NodeEnum::DropOwnedStmt(_)
        | NodeEnum::CreateUserMappingStmt(_)
        | NodeEnum::AlterUserMappingStmt(_)
        | NodeEnum::DropUserMappingStmt(_) => K::Grant,
        NodeEnum::VacuumStmt(_)
        | NodeEnum::ClusterStmt(_)
        | NodeEnum::ReindexStmt(_)
        | NodeEnum::CheckPointStmt(_)
        | NodeEnum::DiscardStmt(_)
        | NodeEnum::LockStmt(_)
        | NodeEnum::LoadStmt(_)
        | NodeEnum::AlterSystemStmt(_) => K::Utility,
        NodeEnum::CreateSchemaStmt(_)
        | NodeEnum::AlterTableStmt(_)
        | NodeEnum::ReplicaIdentityStmt(_)
        | NodeEnum::AlterCollationStmt(_)
        | NodeEnum::AlterDomainStmt(_)
        | NodeEnum::CreateStmt(_)
        | NodeEnum::CreateTableSpaceStmt(_)
        | NodeEnum::DropTableSpaceStmt(_)
        | NodeEnum::AlterTableSpaceOptionsStmt(_)
        | NodeEnum::AlterTableMoveAllStmt(_)
        | NodeEnum::CreateExtensionStmt(_)
        | NodeEnum::AlterExtensionStmt(_)
        | NodeEnum::AlterExtensionContentsStmt(_)
        | NodeEnum::CreateFdwStmt(_)
        | NodeEnum::AlterFdwStmt(_)
        | NodeEnum::CreateForeignServerStmt(_)
        | NodeEnum::AlterForeignServerStmt(_)
        | NodeEnum::CreateForeignTableStmt(_)
        | NodeEnum::ImportForeignSchemaStmt(_)
        | NodeEnum::CreatePolicyStmt(_)
        | NodeEnum::AlterPolicyStmt(_)
        | NodeEnum::CreateAmStmt(_)
        | NodeEnum::CreateTrigStmt(_)
        | NodeEnum::CreateEventTrigStmt(_)
        | NodeEnum::AlterEventTrigStmt(_)
        | NodeEnum::CreatePlangStmt(_)
        | NodeEnum::CreateSeqStmt(_)
        | NodeEnum::AlterSeqStmt(_)
        | NodeEnum::DefineStmt(_)
        | NodeEnum::CreateDomainStmt(_)
        | NodeEnum::CreateOpClassStmt(_)
        | NodeEnum::CreateOpFamilyStmt(_)
        | NodeEnum::AlterOpFamilyStmt(_)
        | NodeEnum::DropStmt(_)
        | NodeEnum::CommentStmt(_)
        | NodeEnum::SecLabelStmt(_)
        | NodeEnum::IndexStmt(_)
        | NodeEnum::CreateStatsStmt(_)
        | NodeEnum::AlterStatsStmt(_)
        | NodeEnum::CreateFunctionStmt(_)
        | NodeEnum::AlterFunctionStmt(_)
        | NodeEnum::RenameStmt(_)
        | NodeEnum::AlterObjectDependsStmt(_)
        | NodeEnum::AlterObjectSchemaStmt(_)
        | NodeEnum::AlterOperatorStmt(_)
        | NodeEnum::AlterTypeStmt(_)
        | NodeEnum::RuleStmt(_)
        | NodeEnum::CompositeTypeStmt(_)
        | NodeEnum::CreateEnumStmt(_)
        | NodeEnum::CreateRangeStmt(_)
        | NodeEnum::AlterEnumStmt(_)
        | NodeEnum::ViewStmt(_)
        | NodeEnum::CreatedbStmt(_)
        | NodeEnum::AlterDatabaseStmt(_)
        | NodeEnum::AlterDatabaseRefreshCollStmt(_)
        | NodeEnum::AlterDatabaseSetStmt(_)
        | NodeEnum::DropdbStmt(_)
        | NodeEnum::CreateTableAsStmt(_)
        | NodeEnum::RefreshMatViewStmt(_)
        | NodeEnum::CreateConversionStmt(_)
        | NodeEnum::CreateCastStmt(_)
        | NodeEnum::CreateTransformStmt(_)
        | NodeEnum::AlterTsdictionaryStmt(_)
        | NodeEnum::AlterTsconfigurationStmt(_)
        | NodeEnum::CreatePublicationStmt(_)
        | NodeEnum::AlterPublicationStmt(_)
        | NodeEnum::CreateSubscriptionStmt(_)
        | NodeEnum::AlterSubscriptionStmt(_)
        | NodeEnum::DropSubscriptionStmt(_) => K::Ddl,
        _ => K::Unknown,
    };
    (kind, None, None)
}

/// `DROP TABLE/VIEW/...` names its relations as name lists, not `RangeVar`s.
fn dropped_relations(d: &pg_query::protobuf::DropStmt, out: &mut BTreeSet<Relation>) {
    let relation_types = [
        ObjectType::ObjectTable,
        ObjectType::ObjectView,
        ObjectType::ObjectMatview,
        ObjectType::ObjectSequence,
        ObjectType::ObjectForeignTable,
        ObjectType::ObjectIndex,
    ];
    if !relation_types.iter().any(|t| *t as i32 == d.remove_type) {
        return;
    }
    for object in &d.objects {
        let Some(NodeEnum::List(list)) = object.node.as_ref() else { continue };
        let parts: Vec<&str> = list
            .items
            .iter()
            .filter_map(|i| match i.node.as_ref() {
                Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
                _ => None,
            })
            .collect();
        // `[catalog.][schema.]name`: the catalog can only be the current database.
        match parts.as_slice() {
            [.., schema, name] => {
                out.insert(Relation { schema: Some((*schema).to_owned()), name: (*name).to_owned() });
            }
            [name] => {
                out.insert(Relation { schema: None, name: (*name).to_owned() });
            }
            [] => {}
        }
    }
}

#[cfg(test)]
mod json_walk;
mod memo;
#[cfg(test)]
mod tests;
mod walk;

pub use memo::{Classified, Memo};
