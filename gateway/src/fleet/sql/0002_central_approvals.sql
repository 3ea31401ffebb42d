-- Central store schema version 2: central approvals. A request held on one
-- host (shipped to `approvals` while pending) may be decided from any host's
-- CLI: the decision is inserted here, and a trigger notifies the channel
-- `ci_gateway_decisions` (payload: the holding host's id) in the inserting
-- transaction, so the holding host, which LISTENs on it, applies the
-- decision within moments (and polls as a fallback). The holding host checks
-- every row against its own rules before it releases anything, and records
-- what it did with it (`outcome`): the store is never trusted blindly.

CREATE TABLE central_decisions (
    id                bigserial PRIMARY KEY,
    host_id           text   NOT NULL,  -- the host holding the request
    approval_local_id bigint NOT NULL,  -- A-n on that host
    verdict           text   NOT NULL,  -- approve | deny
    approver          text   NOT NULL,  -- the named approver
    uid               bigint NOT NULL,  -- unix uid of the deciding CLI
    decided_on        text   NOT NULL,  -- host id where it was decided
    comment           text,
    decided_at        bigint NOT NULL,  -- Unix time, nanoseconds, UTC
    outcome           text,             -- NULL until the holding host read it: applied | rejected | stale
    outcome_reason    text,
    applied_at        bigint
);
CREATE INDEX central_decisions_unapplied ON central_decisions (host_id, id) WHERE outcome IS NULL;
CREATE INDEX central_decisions_approval ON central_decisions (host_id, approval_local_id);

CREATE FUNCTION central_decision_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ci_gateway_decisions', NEW.host_id);
    RETURN NULL;
END
$$;

CREATE TRIGGER central_decisions_notify AFTER INSERT ON central_decisions
    FOR EACH ROW EXECUTE FUNCTION central_decision_notify();
