//! One walk over EVERY node of a pg_query parse tree, without building a
//! copy of it: relations (with PostgreSQL's CTE scoping), column
//! references (for column masks) and nested data-modifying statements.
//!
//! The walk is driven by the tree's own `serde::Serialize` implementations,
//! which pg_query generates for every protobuf message with the messages
//! themselves: each field of each node is handed to the serializers below,
//! whatever its type, so no node type can be missed by a hand-written
//! traversal that forgot it (pg_query's own `nodes()` iterator follows a
//! chosen subset of fields), and a new grammar version's new nodes are
//! walked too. Nothing is serialised: the serializers only look at struct
//! names, field names and the few strings they need (relation and CTE
//! names), so a statement costs a pass over its tree and no allocation but
//! the names collected.
//!
//! It computes what the former walk over a `serde_json::Value` copy of the
//! tree computed (a differential test in `tests.rs` keeps the two equal),
//! except that nested statements come in the order of the tree's fields
//! (close to the text's) rather than in the alphabetical order of a JSON
//! object's keys.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;

use serde::ser::{self, Impossible, Serialize, Serializer};

use super::{Relation, Statement, StatementKind};

/// The walk could not read a node: a field had a type the walk does not
/// expect (a pg_query upgrade changed the tree); the caller refuses.
#[derive(Debug)]
pub(super) struct WalkError(String);

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WalkError {}

impl ser::Error for WalkError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        WalkError(msg.to_string())
    }
}

/// Every relation `node` names (unqualified references to a CTE in scope
/// excepted, see [`Relations`]), and whether its own (top-level) node has a
/// non-null `where_clause`.
pub(super) fn relations<T: Serialize + ?Sized>(node: &T) -> Result<(BTreeSet<Relation>, bool), WalkError> {
    let (relations, top_where, _) = relations_and_columns(node)?;
    Ok((relations, top_where))
}

/// [`relations`], and the column references of `node` (see [`Columns`]).
pub(super) fn relations_and_columns<T: Serialize + ?Sized>(
    node: &T,
) -> Result<(BTreeSet<Relation>, bool, Columns), WalkError> {
    let mut walk = Relations::default();
    node.serialize(&mut walk)?;
    let Relations { mut out, pending, top_where, columns, .. } = walk;
    out.extend(pending.into_iter().map(|name| Relation { schema: None, name }));
    Ok((out, top_where, columns))
}

/// The column references of a tree, as written, for column masks: every
/// `ColumnRef`'s fields, the names a range can be referred to by (relation
/// names, aliases, CTE names), and the constructs that read or rename
/// columns without naming them.
#[derive(Default)]
pub(super) struct Columns {
    /// The fields of every `ColumnRef`, each followed by a NUL (which no
    /// identifier holds): one buffer rather than a `String` per name.
    names: String,
    /// Each `ColumnRef`: its fields' range in `names`, whether it ends in
    /// `*`, and its location in the text.
    refs: Vec<ColumnRef>,
    /// NUL-terminated names a range is known by: relation names, aliases,
    /// CTE names, `RETURNING`'s `old`/`new` and their aliases.
    ranges: String,
    /// Columns read or renamed without a `ColumnRef`: an alias column list
    /// (`t AS x(a, b)`) or a `NATURAL` join.
    pub(super) unnamed: bool,
    /// The names of a `JOIN ... USING (a, b)`, NUL-terminated: columns
    /// compared, never output columns.
    using: String,
}

/// One `ColumnRef`.
struct ColumnRef {
    fields: Range<usize>,
    star: bool,
    location: i32,
}

impl Columns {
    /// Whether `name` is what a range (relation, alias, CTE) is called.
    fn is_range(&self, name: &str) -> bool {
        self.ranges.split_terminator('\0').any(|r| r == name)
    }

    /// The column names referenced other than as a plain output column
    /// (the `ColumnRef`s at `plain` locations), NUL-terminated (a name may
    /// come more than once), and whether a whole row or every column is
    /// read (a range's name used as a value, `*` anywhere but a plain
    /// output, an alias column list, a `NATURAL` join).
    pub(super) fn reads(&self, plain: &[i32]) -> (String, bool) {
        let mut other = self.using.clone();
        let mut whole_row = self.unnamed;
        for r in &self.refs {
            let is_plain = plain.contains(&r.location);
            if r.star {
                // `*`, `t.*`: every column of the range(s), named by the
                // server after themselves only as a plain output.
                whole_row |= !is_plain;
                continue;
            }
            let fields = &self.names[r.fields.clone()];
            let count = fields.split_terminator('\0').count();
            // `schema.table.column`, `t.column`: what comes up to the last
            // range name qualifies; what follows it is a column and, in
            // front of the last field, composite field access
            // (`(c).field` written `c.field`).
            let first_column = fields
                .split_terminator('\0')
                .take(count.saturating_sub(1))
                .enumerate()
                .filter(|(_, f)| self.is_range(f))
                .last()
                .map_or(0, |(i, _)| i + 1);
            for (i, name) in fields.split_terminator('\0').enumerate().skip(first_column) {
                if self.is_range(name) {
                    // A range's name as a value: its whole row.
                    whole_row = true;
                }
                // A plain output column is named by its last field.
                if !(is_plain && i + 1 == count) {
                    other.push_str(name);
                    other.push('\0');
                }
            }
        }
        (other, whole_row)
    }
}

/// The data-modifying statements (`INSERT`, `UPDATE`, `DELETE`, `MERGE`)
/// nested anywhere in `node`, each classified with its own nested ones;
/// `node` itself is skipped when `top` (it is the statement being
/// classified).
pub(super) fn modifications<T: Serialize + ?Sized>(
    node: &T,
    top: bool,
    span: &Range<usize>,
) -> Result<Vec<Statement>, WalkError> {
    let mut walk = Modifications { span, top, out: Vec::new() };
    node.serialize(&mut walk)?;
    Ok(walk.out)
}

/// Collects `RangeVar`s, as PostgreSQL scopes CTE names: a `WITH`'s
/// statement sees all of its CTEs; a CTE's own query sees the ones before
/// it, or all of them with `RECURSIVE`. Tables written or created
/// (`relation`: the target of `INSERT`, `UPDATE`, `DELETE`, `MERGE`,
/// `COPY`...; `into_clause`) are never CTEs, so they are always listed.
///
/// A CTE's names are known only once its `WITH` has been walked, and the
/// `with_clause` field comes after the fields that may refer to it, so an
/// unqualified name waits in `pending` until every scope around it has
/// been seen: a statement with a `WITH` drops the names it resolves to its
/// CTEs when it ends, a CTE's query its own visible ones when the `WITH`
/// ends; what no scope claims is a relation.
#[derive(Default)]
struct Relations {
    /// Qualified relations, and unqualified ones no scope can claim any more.
    out: BTreeSet<Relation>,
    /// Unqualified names whose enclosing scopes are still open.
    pending: Vec<String>,
    /// Depth of the struct being walked (1: the node walked).
    depth: usize,
    /// The next struct is the value of a `with_clause` field.
    expect_with: bool,
    /// The `WITH` clauses being walked, innermost last.
    withs: Vec<WithScope>,
    /// The CTE names of the `WITH` just walked, and the names its CTEs'
    /// queries left unresolved (for the scopes outside the statement).
    finished_with: Option<(Vec<String>, Vec<String>)>,
    /// Whether the walked node's own `where_clause` is set.
    top_where: bool,
    /// The column references (see [`Columns`]).
    columns: Columns,
    /// Inside a `ColumnRef`'s `fields`: its index in `columns.refs`.
    in_column_ref: Option<usize>,
    /// Inside an `Alias`'s `colnames`.
    in_alias_columns: bool,
    /// Inside a `JoinExpr`'s `using_clause`.
    in_using: bool,
}

/// A `WITH` clause being walked.
struct WithScope {
    /// Its struct's depth: its CTEs are at depth + 2 (`Node`, then `CommonTableExpr`).
    depth: usize,
    /// `pending.len()` when it began.
    start: usize,
    /// `WITH RECURSIVE`.
    recursive: bool,
    /// Each CTE's name and the range of `pending` its query added.
    ctes: Vec<(String, Range<usize>)>,
}

/// What a struct is to the relation walk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Plain,
    RangeVar,
    With,
    Cte,
    ColumnRef,
    /// A name in a `ColumnRef`'s fields or a `JOIN ... USING` list.
    Name,
    Alias,
    Join,
    ReturningOption,
}

/// A struct being walked by [`Relations`].
struct RelStruct<'w> {
    walk: &'w mut Relations,
    role: Role,
    /// `pending.len()` when the struct began.
    start: usize,
    /// `RangeVar.schemaname`.
    schema: String,
    /// `RangeVar.relname` or `CommonTableExpr.ctename`.
    name: String,
    /// The struct's `WITH`: its CTE names and its CTEs' unresolved names.
    with: Option<(Vec<String>, Vec<String>)>,
}

/// The leaf methods every walking serializer ignores.
macro_rules! ignore_leaves {
    () => {
        fn serialize_bool(self, _: bool) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_i8(self, _: i8) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_i16(self, _: i16) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_i32(self, _: i32) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_i64(self, _: i64) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_u8(self, _: u8) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_u16(self, _: u16) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_u32(self, _: u32) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_u64(self, _: u64) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_f32(self, _: f32) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_f64(self, _: f64) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_char(self, _: char) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_str(self, _: &str) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_bytes(self, _: &[u8]) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_none(self) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_unit(self) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_unit_struct(self, _: &'static str) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result<(), WalkError> {
            Ok(())
        }
        fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), WalkError> {
            value.serialize(self)
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, value: &T) -> Result<(), WalkError> {
            value.serialize(self)
        }
        fn serialize_seq(self, _: Option<usize>) -> Result<Self, WalkError> {
            Ok(self)
        }
        fn serialize_tuple(self, _: usize) -> Result<Self, WalkError> {
            Ok(self)
        }
        fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, WalkError> {
            Ok(self)
        }
        fn serialize_tuple_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self, WalkError> {
            Ok(self)
        }
        fn serialize_map(self, _: Option<usize>) -> Result<Self, WalkError> {
            Ok(self)
        }
        fn serialize_struct_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self, WalkError> {
            Ok(self)
        }
    };
}

/// Sequences, tuples, maps and struct variants: every element walked alike.
macro_rules! walk_compounds {
    ($walk:ty) => {
        impl ser::SerializeSeq for &mut $walk {
            type Ok = ();
            type Error = WalkError;
            fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), WalkError> {
                value.serialize(&mut **self)
            }
            fn end(self) -> Result<(), WalkError> {
                Ok(())
            }
        }
        impl ser::SerializeTuple for &mut $walk {
            type Ok = ();
            type Error = WalkError;
            fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), WalkError> {
                value.serialize(&mut **self)
            }
            fn end(self) -> Result<(), WalkError> {
                Ok(())
            }
        }
        impl ser::SerializeTupleStruct for &mut $walk {
            type Ok = ();
            type Error = WalkError;
            fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), WalkError> {
                value.serialize(&mut **self)
            }
            fn end(self) -> Result<(), WalkError> {
                Ok(())
            }
        }
        impl ser::SerializeTupleVariant for &mut $walk {
            type Ok = ();
            type Error = WalkError;
            fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), WalkError> {
                value.serialize(&mut **self)
            }
            fn end(self) -> Result<(), WalkError> {
                Ok(())
            }
        }
        impl ser::SerializeMap for &mut $walk {
            type Ok = ();
            type Error = WalkError;
            fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), WalkError> {
                key.serialize(&mut **self)
            }
            fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), WalkError> {
                value.serialize(&mut **self)
            }
            fn end(self) -> Result<(), WalkError> {
                Ok(())
            }
        }
        impl ser::SerializeStructVariant for &mut $walk {
            type Ok = ();
            type Error = WalkError;
            fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, value: &T) -> Result<(), WalkError> {
                value.serialize(&mut **self)
            }
            fn end(self) -> Result<(), WalkError> {
                Ok(())
            }
        }
    };
}

impl<'w> Serializer for &'w mut Relations {
    type Ok = ();
    type Error = WalkError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = RelStruct<'w>;
    type SerializeStructVariant = Self;

    ignore_leaves!();

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        value: &T,
    ) -> Result<(), WalkError> {
        value.serialize(self)
    }

    fn serialize_struct(self, name: &'static str, _: usize) -> Result<RelStruct<'w>, WalkError> {
        // Only the value of a `with_clause` field is a scope (as in PostgreSQL's analysis).
        let with = std::mem::take(&mut self.expect_with) && name == "WithClause";
        self.depth += 1;
        let start = self.pending.len();
        let role = if name == "RangeVar" {
            Role::RangeVar
        } else if with {
            self.withs.push(WithScope { depth: self.depth, start, recursive: false, ctes: Vec::new() });
            Role::With
        } else if name == "CommonTableExpr" && self.withs.last().is_some_and(|w| w.depth + 2 == self.depth) {
            Role::Cte
        } else {
            match name {
                "String" if self.in_column_ref.is_some() || self.in_using => Role::Name,
                "AStar" => {
                    if let Some(r) = self.in_column_ref.and_then(|i| self.columns.refs.get_mut(i)) {
                        r.star = true;
                    }
                    Role::Plain
                }
                "String" | "Node" if self.in_alias_columns => {
                    self.columns.unnamed = true;
                    Role::Plain
                }
                "ColumnRef" => Role::ColumnRef,
                "Alias" => Role::Alias,
                "JoinExpr" => Role::Join,
                "ReturningClause" => {
                    self.columns.ranges.push_str("old\0new\0");
                    Role::Plain
                }
                "ReturningOption" => Role::ReturningOption,
                // `CommonTableExpr` out of a `WITH` (no such tree is known):
                // its name still names a range.
                _ => Role::Plain,
            }
        };
        Ok(RelStruct { walk: self, role, start, schema: String::new(), name: String::new(), with: None })
    }
}

walk_compounds!(Relations);

impl ser::SerializeStruct for RelStruct<'_> {
    type Ok = ();
    type Error = WalkError;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), WalkError> {
        let walk = &mut *self.walk;
        if walk.depth == 1 && key == "where_clause" {
            walk.top_where = value.serialize(Leaf)?.is_set();
        }
        match (self.role, key) {
            (Role::ColumnRef, "fields") => {
                let start = walk.columns.names.len();
                walk.columns.refs.push(ColumnRef { fields: start..start, star: false, location: -1 });
                walk.in_column_ref = Some(walk.columns.refs.len() - 1);
                value.serialize(&mut *walk)?;
                walk.in_column_ref = None;
                let end = walk.columns.names.len();
                if let Some(r) = walk.columns.refs.last_mut() {
                    r.fields = start..end;
                }
            }
            (Role::ColumnRef, "location") => {
                if let (LeafValue::Int(at), Some(r)) = (value.serialize(Leaf)?, walk.columns.refs.last_mut()) {
                    r.location = i32::try_from(at).unwrap_or(-1);
                }
            }
            (Role::Name, "sval") => {
                let name = value.serialize(Leaf)?.into_string()?;
                let buf = if walk.in_using { &mut walk.columns.using } else { &mut walk.columns.names };
                buf.push_str(&name);
                buf.push('\0');
            }
            (Role::Alias, "aliasname") | (Role::ReturningOption, "value") => {
                let name = value.serialize(Leaf)?.into_string()?;
                walk.columns.ranges.push_str(&name);
                walk.columns.ranges.push('\0');
            }
            (Role::Alias, "colnames") => {
                walk.in_alias_columns = true;
                value.serialize(&mut *walk)?;
                walk.in_alias_columns = false;
            }
            (Role::Join, "is_natural") => {
                if value.serialize(Leaf)?.into_bool()? {
                    walk.columns.unnamed = true;
                }
            }
            (Role::Join, "using_clause") => {
                walk.in_using = true;
                value.serialize(&mut *walk)?;
                walk.in_using = false;
            }
            (Role::RangeVar, "schemaname") => self.schema = value.serialize(Leaf)?.into_string()?,
            (Role::RangeVar | Role::Cte, "relname" | "ctename") => self.name = value.serialize(Leaf)?.into_string()?,
            (Role::With, "recursive") => {
                let recursive = value.serialize(Leaf)?.into_bool()?;
                if let Some(with) = walk.withs.last_mut() {
                    with.recursive = recursive;
                }
            }
            // Written or created: a relation whatever CTE is in scope.
            (_, "relation" | "into_clause") => {
                let base = walk.pending.len();
                value.serialize(&mut *walk)?;
                let names = walk.pending.drain(base..).map(|name| Relation { schema: None, name });
                walk.out.extend(names);
            }
            (_, "with_clause") => {
                walk.expect_with = true;
                value.serialize(&mut *walk)?;
                walk.expect_with = false;
                self.with = walk.finished_with.take();
            }
            _ => value.serialize(&mut *walk)?,
        }
        Ok(())
    }

    fn end(self) -> Result<(), WalkError> {
        let RelStruct { walk, role, start, schema, name, with } = self;
        if matches!(role, Role::RangeVar | Role::Cte) && !name.is_empty() {
            walk.columns.ranges.push_str(&name);
            walk.columns.ranges.push('\0');
        }
        match role {
            Role::RangeVar if name.is_empty() => {}
            Role::RangeVar if schema.is_empty() => walk.pending.push(name),
            Role::RangeVar => {
                walk.out.insert(Relation { schema: Some(schema), name });
            }
            Role::Cte => {
                let end = walk.pending.len();
                if let Some(with) = walk.withs.last_mut() {
                    with.ctes.push((name, start..end));
                }
            }
            Role::With => {
                let scope = walk.withs.pop().ok_or_else(|| WalkError("a WITH scope was lost".into()))?;
                let names: Vec<String> = scope.ctes.iter().map(|(n, _)| n.clone()).collect();
                let queries: Vec<String> = walk.pending.drain(scope.start..).collect();
                let mut escaped = Vec::new();
                for (offset, name) in queries.into_iter().enumerate() {
                    let at = scope.start + offset;
                    // The CTE whose query named it; a name outside every
                    // CTE (no such tree is known) sees no CTE of this WITH:
                    // kept rather than lost.
                    let visible = match scope.ctes.iter().position(|(_, r)| r.contains(&at)) {
                        Some(_) if scope.recursive => &names[..],
                        Some(i) => &names[..i],
                        None => &[][..],
                    };
                    if !visible.contains(&name) {
                        escaped.push(name);
                    }
                }
                walk.finished_with = Some((names, escaped));
            }
            Role::Plain | Role::ColumnRef | Role::Name | Role::Alias | Role::Join | Role::ReturningOption => {}
        }
        // A statement with a `WITH`: its own unqualified names naming one of
        // its CTEs are the CTE; its CTEs' queries' unresolved names go on
        // to the scopes outside it.
        if let Some((names, escaped)) = with {
            let body = walk.pending.split_off(start);
            walk.pending.extend(body.into_iter().filter(|n| !names.contains(n)));
            walk.pending.extend(escaped);
        }
        walk.depth -= 1;
        Ok(())
    }
}

/// Finds the data-modifying statements nested in a tree.
struct Modifications<'s> {
    span: &'s Range<usize>,
    /// The next node is the one being classified: not an inner statement.
    top: bool,
    out: Vec<Statement>,
}

impl Serializer for &mut Modifications<'_> {
    type Ok = ();
    type Error = WalkError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    ignore_leaves!();

    /// pg_query's `NodeEnum` variants: the node types.
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), WalkError> {
        if std::mem::take(&mut self.top) {
            return value.serialize(self);
        }
        let kind = match variant {
            "InsertStmt" => StatementKind::Insert,
            "UpdateStmt" => StatementKind::Update,
            "DeleteStmt" => StatementKind::Delete,
            "MergeStmt" => StatementKind::Merge,
            _ => return value.serialize(self),
        };
        let (relations, has_where) = relations(value)?;
        let inner = modifications(value, false, self.span)?;
        self.out.push(Statement {
            kind,
            relations: relations.into_iter().collect(),
            has_where: kind.filters_rows().then_some(has_where),
            span: self.span.clone(),
            inner,
            columns: super::ColumnReads::default(),
        });
        Ok(())
    }

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, WalkError> {
        self.top = false;
        Ok(self)
    }
}

walk_compounds!(Modifications<'_>);

impl ser::SerializeStruct for &mut Modifications<'_> {
    type Ok = ();
    type Error = WalkError;

    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, value: &T) -> Result<(), WalkError> {
        value.serialize(&mut **self)
    }

    fn end(self) -> Result<(), WalkError> {
        Ok(())
    }
}

/// The value of one leaf field, for the few the walk reads.
enum LeafValue {
    /// `None`.
    Unset,
    /// `Some(_)` (not looked into) or a compound value.
    Set,
    Str(String),
    Bool(bool),
    Int(i64),
    /// Any other scalar.
    Other,
}

impl LeafValue {
    fn is_set(&self) -> bool {
        !matches!(self, LeafValue::Unset)
    }

    fn into_string(self) -> Result<String, WalkError> {
        match self {
            LeafValue::Str(s) => Ok(s),
            _ => Err(WalkError("a name field is not a string".into())),
        }
    }

    fn into_bool(self) -> Result<bool, WalkError> {
        match self {
            LeafValue::Bool(b) => Ok(b),
            _ => Err(WalkError("a flag field is not a bool".into())),
        }
    }
}

/// Reads one leaf field (see [`LeafValue`]); compound values are refused,
/// `Some(_)` is not looked into.
struct Leaf;

impl Serializer for Leaf {
    type Ok = LeafValue;
    type Error = WalkError;
    type SerializeSeq = Impossible<LeafValue, WalkError>;
    type SerializeTuple = Impossible<LeafValue, WalkError>;
    type SerializeTupleStruct = Impossible<LeafValue, WalkError>;
    type SerializeTupleVariant = Impossible<LeafValue, WalkError>;
    type SerializeMap = Impossible<LeafValue, WalkError>;
    type SerializeStruct = Impossible<LeafValue, WalkError>;
    type SerializeStructVariant = Impossible<LeafValue, WalkError>;

    fn serialize_bool(self, v: bool) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Bool(v))
    }
    fn serialize_i8(self, _: i8) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Other)
    }
    fn serialize_i16(self, _: i16) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Other)
    }
    fn serialize_i32(self, v: i32) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Int(i64::from(v)))
    }
    fn serialize_i64(self, _: i64) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Other)
    }
    fn serialize_u8(self, _: u8) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Other)
    }
    fn serialize_u16(self, _: u16) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Other)
    }
    fn serialize_u32(self, _: u32) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Other)
    }
    fn serialize_u64(self, _: u64) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Other)
    }
    fn serialize_f32(self, _: f32) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Other)
    }
    fn serialize_f64(self, _: f64) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Other)
    }
    fn serialize_char(self, _: char) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Other)
    }
    fn serialize_str(self, v: &str) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Str(v.to_owned()))
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Other)
    }
    fn serialize_none(self) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Unset)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Set)
    }
    fn serialize_unit(self) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Other)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Other)
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Other)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, v: &T) -> Result<LeafValue, WalkError> {
        v.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<LeafValue, WalkError> {
        Ok(LeafValue::Set)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, WalkError> {
        Err(WalkError("a leaf field is a sequence".into()))
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, WalkError> {
        Err(WalkError("a leaf field is a tuple".into()))
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeTupleStruct, WalkError> {
        Err(WalkError("a leaf field is a tuple".into()))
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, WalkError> {
        Err(WalkError("a leaf field is a tuple".into()))
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, WalkError> {
        Err(WalkError("a leaf field is a map".into()))
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, WalkError> {
        Err(WalkError("a leaf field is a struct".into()))
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, WalkError> {
        Err(WalkError("a leaf field is a struct".into()))
    }
}
