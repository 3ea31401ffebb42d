//! PostgreSQL behind the gate: the wire-protocol handler translates a
//! session's messages into the gate's facts, and the gate's decisions back
//! into PostgreSQL messages. [`sql`] classifies statements with
//! PostgreSQL's own grammar for the policy.

pub mod sql;
