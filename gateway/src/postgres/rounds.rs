//! What a PostgreSQL session records: one `exchange` record per round trip.
//!
//! A round trip is what the client sends up to the message the server
//! answers with ReadyForQuery (a simple Query, a FunctionCall, or an
//! extended-protocol batch up to its Sync) and the server's answers up to
//! that ReadyForQuery. One record per round trip rather than one per
//! message (statement, parameters, command tag: two or three hash-chained
//! records per statement before) because a recorded record costs the writer
//! its JSON, a SHA-256 and an SQLite row whatever it holds; a round trip is
//! also what the server itself treats as a unit (an error skips the rest of
//! the batch up to Sync), so the record reads as the client's exchange with
//! the server. A pipeline of N statements in one batch is one record.
//!
//! The record is written when the ReadyForQuery arrives, before it is
//! relayed: the client never sees a statement complete that the recorder has
//! not been handed. A round trip the server has not answered within
//! [`OVERDUE`] (a long statement, a client that never sends Sync) is
//! written then with outcome `running`, so a crash cannot lose a long
//! statement; its answers follow in a later record of the same `stream`.
//! A round trip that holds [`MAX_MESSAGES`] client messages is written
//! early the same way (no record grows without bound), and whatever is left
//! when the session ends is written with outcome `incomplete`.

use std::{
    collections::VecDeque,
    time::{Duration, Instant, SystemTime},
};

use crate::record::{PostgresExchange, PostgresMessage, PostgresOutcome, PostgresResult};

/// A round trip whose client messages wait this long for the server's
/// ReadyForQuery is written before it (the writer's own default
/// `flush_interval`: a crash loses no more of a long statement than of
/// anything else).
pub const OVERDUE: Duration = Duration::from_millis(100);

/// Client messages one record holds at most; a longer pipeline is written
/// in several records of the same `stream`.
pub const MAX_MESSAGES: usize = 256;

/// One round trip being recorded.
#[derive(Debug)]
struct Round {
    /// What is recorded so far and not written yet.
    exchange: PostgresExchange,
    /// When the round trip began (its duration runs from here).
    begun: Instant,
    /// When its oldest client message not yet written arrived.
    oldest: Instant,
    /// Whether part of it was written already (it then ends with a record
    /// even if nothing is left to say, so that its outcome is known).
    written: bool,
}

impl Round {
    fn new(stream: u64, now: Instant) -> Round {
        let exchange = PostgresExchange {
            stream,
            started: SystemTime::now(),
            duration: Duration::ZERO,
            messages: Vec::new(),
            results: Vec::new(),
            outcome: PostgresOutcome::Ready,
        };
        Round { exchange, begun: now, oldest: now, written: false }
    }

    /// What is recorded and not written yet, as a record with `outcome`.
    fn take(&mut self, outcome: PostgresOutcome) -> PostgresExchange {
        self.written = true;
        PostgresExchange {
            stream: self.exchange.stream,
            started: self.exchange.started,
            duration: self.begun.elapsed(),
            messages: std::mem::take(&mut self.exchange.messages),
            results: std::mem::take(&mut self.exchange.results),
            outcome,
        }
    }

    fn is_empty(&self) -> bool {
        self.exchange.messages.is_empty() && self.exchange.results.is_empty()
    }
}

/// A session's round trips: the one the client is sending, and those sent
/// and waiting for their ReadyForQuery, in order (one per ReadyForQuery the
/// server owes).
#[derive(Debug, Default)]
pub struct Rounds {
    /// Round trips begun, for their `stream` numbers.
    begun: u64,
    /// The one the client is sending.
    open: Option<Round>,
    /// Sent, oldest first: the server answers the front one.
    sent: VecDeque<Round>,
}

impl Rounds {
    /// A client message joins the round trip being sent; a full round trip
    /// is returned, to be written now.
    pub fn message(&mut self, message: PostgresMessage) -> Option<PostgresExchange> {
        let round = self.open_round();
        if round.written && round.exchange.messages.is_empty() {
            // The first message since part of it was written early.
            round.oldest = Instant::now();
        }
        round.exchange.messages.push(message);
        (round.exchange.messages.len() >= MAX_MESSAGES).then(|| round.take(PostgresOutcome::Running))
    }

    /// The client sent what the server answers with ReadyForQuery: the
    /// round trip being sent now waits for it.
    pub fn close(&mut self) {
        let round = match self.open.take() {
            Some(round) => round,
            None => self.new_round(),
        };
        self.sent.push_back(round);
    }

    /// A command tag or error of the server's: it belongs to the oldest
    /// round trip sent (or, before the client's Sync, to the one being
    /// sent).
    pub fn result(&mut self, result: PostgresResult) {
        match self.sent.front_mut() {
            Some(round) => round.exchange.results.push(result),
            None => self.open_round().exchange.results.push(result),
        }
    }

    /// The server's ReadyForQuery: the oldest round trip sent is complete;
    /// its record, unless there is nothing to say (a bare Sync).
    pub fn ready(&mut self) -> Option<PostgresExchange> {
        let mut round = self.sent.pop_front()?;
        (round.written || !round.is_empty()).then(|| round.take(PostgresOutcome::Ready))
    }

    /// Records of the round trips whose oldest unwritten client message
    /// has waited `overdue` or longer at `now`, written as `running`.
    pub fn overdue(&mut self, now: Instant, overdue: Duration) -> Vec<PostgresExchange> {
        self.sent
            .iter_mut()
            .chain(self.open.as_mut())
            .filter(|r| !r.exchange.messages.is_empty() && now.saturating_duration_since(r.oldest) >= overdue)
            .map(|r| r.take(PostgresOutcome::Running))
            .collect()
    }

    /// Whether any round trip holds client messages not written yet.
    pub fn waiting(&self) -> bool {
        self.sent.iter().chain(self.open.as_ref()).any(|r| !r.exchange.messages.is_empty())
    }

    /// The session ended: records of every round trip left, `incomplete`.
    pub fn finish(&mut self) -> Vec<PostgresExchange> {
        self.sent
            .drain(..)
            .chain(self.open.take())
            .filter(|r| r.written || !r.is_empty())
            .map(|mut r| r.take(PostgresOutcome::Incomplete))
            .collect()
    }

    fn open_round(&mut self) -> &mut Round {
        if self.open.is_none() {
            self.begun += 1;
        }
        let stream = self.begun;
        self.open.get_or_insert_with(|| Round::new(stream, Instant::now()))
    }

    fn new_round(&mut self) -> Round {
        self.begun += 1;
        Round::new(self.begun, Instant::now())
    }
}

/// A CommandComplete's tag as a result: the rows are its last word when
/// that is a number (`SELECT 5`, `INSERT 0 5`, `UPDATE 3`, `COPY 7`).
pub fn tag_result(tag: String) -> PostgresResult {
    let rows = tag.rsplit(' ').next().filter(|_| tag.contains(' ')).and_then(|n| n.parse().ok());
    PostgresResult { tag: Some(tag), rows, ..PostgresResult::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(text: &str) -> PostgresMessage {
        PostgresMessage { kind: "query".into(), sql: Some(text.into()), ..PostgresMessage::default() }
    }

    #[test]
    fn one_record_per_round_trip() {
        let mut rounds = Rounds::default();
        assert!(rounds.message(sql("select 1")).is_none());
        rounds.close();
        // A pipelined second round trip before the first is answered.
        rounds.message(PostgresMessage { kind: "parse".into(), ..PostgresMessage::default() });
        rounds.message(PostgresMessage { kind: "bind".into(), params: Some(vec![None]), ..Default::default() });
        rounds.result(tag_result("SELECT 1".into()));
        let first = rounds.ready().expect("first");
        assert_eq!((first.stream, first.outcome, first.messages.len()), (1, PostgresOutcome::Ready, 1));
        assert_eq!(first.results[0].rows, Some(1));
        // The extended batch's results before its Sync are its own.
        rounds.result(tag_result("UPDATE 3".into()));
        rounds.close();
        let second = rounds.ready().expect("second");
        assert_eq!((second.stream, second.messages.len(), second.results[0].rows), (2, 2, Some(3)));
        // A bare Sync says nothing.
        rounds.close();
        assert!(rounds.ready().is_none());
        assert!(rounds.finish().is_empty());
    }

    #[test]
    fn slow_and_unfinished_round_trips_are_written_early() {
        let mut rounds = Rounds::default();
        rounds.message(sql("select pg_sleep(10)"));
        rounds.close();
        assert!(rounds.waiting());
        assert!(rounds.overdue(Instant::now(), Duration::from_secs(60)).is_empty());
        let early = rounds.overdue(Instant::now() + OVERDUE, OVERDUE);
        assert_eq!((early.len(), early[0].outcome, early[0].messages.len()), (1, PostgresOutcome::Running, 1));
        assert!(!rounds.waiting());
        // The answer follows in a record of the same stream, even if empty.
        rounds.result(tag_result("SELECT 1".into()));
        let rest = rounds.ready().expect("rest");
        assert_eq!(
            (rest.stream, rest.outcome, rest.messages.len(), rest.results.len()),
            (1, PostgresOutcome::Ready, 0, 1)
        );
        // What the session left behind.
        rounds.message(sql("delete from t"));
        let left = rounds.finish();
        assert_eq!((left.len(), left[0].outcome, left[0].stream), (1, PostgresOutcome::Incomplete, 2));
        // A long pipeline is written in parts.
        let parts: Vec<_> = (0..MAX_MESSAGES * 2 + 1).filter_map(|_| rounds.message(sql("select 1"))).collect();
        assert_eq!(parts.len(), 2);
        rounds.close();
        let last = rounds.ready().expect("last part");
        assert_eq!((last.messages.len(), last.stream), (1, parts[0].stream));
    }

    #[test]
    fn tags_give_rows() {
        assert_eq!(tag_result("INSERT 0 5".into()).rows, Some(5));
        assert_eq!(tag_result("BEGIN".into()).rows, None);
        assert_eq!(tag_result("CREATE TABLE".into()).rows, None);
        assert_eq!(tag_result("SELECT 0".into()).rows, Some(0));
    }
}
