-- Central store schema version 1: what every gateway of the fleet ships.
-- Every host table is keyed by (host_id, the host's local id), so shipping
-- the same rows again (at-least-once delivery) changes nothing.
-- Nothing here can hold a secret: findings carry the detector's HMAC
-- fingerprint and redacted preview, recordings carry what the local
-- recorder stored (already masked), approvals the masked URL and body preview.

CREATE TABLE fleet_hosts (
    host_id      text        PRIMARY KEY,
    first_seen   timestamptz NOT NULL DEFAULT now(),
    last_shipped timestamptz NOT NULL DEFAULT now()
);

-- Sessions and their hash-chained records (see docs/recording.md).
CREATE TABLE sessions (
    host_id    text   NOT NULL,
    id         text   NOT NULL,
    conn_id    bigint NOT NULL,
    started    bigint NOT NULL,  -- Unix time, nanoseconds, UTC
    identity   text   NOT NULL,
    host       text   NOT NULL,
    orig_dst   text   NOT NULL,
    protocol   text   NOT NULL,
    pid        bigint NOT NULL,
    comm       text   NOT NULL,
    meta       text   NOT NULL,
    exchanges  bigint NOT NULL,
    last_seq   bigint NOT NULL,  -- the chain's tail as shipped so far
    last_hash  text   NOT NULL,
    last_ts    bigint NOT NULL,
    ended      bigint,
    bytes_up   bigint,
    bytes_down bigint,
    outcome    text,
    PRIMARY KEY (host_id, id)
);
CREATE INDEX sessions_started ON sessions (started);

CREATE TABLE records (
    host_id   text   NOT NULL,
    session   text   NOT NULL,
    seq       bigint NOT NULL,
    local_id  bigint NOT NULL,   -- rowid in the host's sessions database
    ts        bigint NOT NULL,
    kind      text   NOT NULL,
    data      text   NOT NULL,   -- canonical JSON, exactly what was hashed
    prev_hash text   NOT NULL,
    hash      text   NOT NULL,
    PRIMARY KEY (host_id, session, seq)
);

-- One central finding per key (HMAC fingerprint) and detection rule, as
-- on each host; every host's sightings point at it.
CREATE TABLE findings (
    id          bigserial PRIMARY KEY,
    fingerprint text      NOT NULL,
    rule_id     text      NOT NULL,
    confidence  text      NOT NULL,
    preview     text      NOT NULL,  -- the detector's redacted preview
    first_seen  bigint    NOT NULL,
    last_seen   bigint    NOT NULL,
    UNIQUE (fingerprint, rule_id)
);

-- Each host's view of a finding: its local id (F-n on that host), review
-- status, enforcement action and counters. Mutable: upserted.
CREATE TABLE host_findings (
    host_id    text   NOT NULL,
    local_id   bigint NOT NULL,
    finding_id bigint NOT NULL REFERENCES findings (id),
    status     text   NOT NULL,
    action     text   NOT NULL,
    count      bigint NOT NULL,
    first_seen bigint NOT NULL,
    last_seen  bigint NOT NULL,
    PRIMARY KEY (host_id, local_id)
);
CREATE INDEX host_findings_finding ON host_findings (finding_id);

CREATE TABLE sightings (
    host_id          text   NOT NULL,
    local_id         bigint NOT NULL,
    finding_id       bigint NOT NULL REFERENCES findings (id),
    local_finding_id bigint NOT NULL,
    seen_at          bigint NOT NULL,
    identity         text,
    job              text   NOT NULL,  -- JSON object of CI job variables
    pid              bigint NOT NULL,
    uid              bigint NOT NULL,
    exe              text,
    comm             text   NOT NULL,
    cgroup           text,
    container        text,
    command          text,             -- command line, secrets masked
    script           text,
    dest_host        text   NOT NULL,
    dest_port        integer NOT NULL,
    location         text   NOT NULL,
    action           text   NOT NULL,
    allowed_by       text,
    session_id       text,
    PRIMARY KEY (host_id, local_id)
);
CREATE INDEX sightings_finding ON sightings (finding_id, seen_at);

-- Review history (status changes) of each host's findings.
CREATE TABLE finding_reviews (
    host_id          text   NOT NULL,
    local_id         bigint NOT NULL,
    finding_id       bigint NOT NULL REFERENCES findings (id),
    local_finding_id bigint NOT NULL,
    from_status      text,
    to_status        text   NOT NULL,
    changed_by       text   NOT NULL,
    changed_at       bigint NOT NULL,
    comment          text   NOT NULL,
    PRIMARY KEY (host_id, local_id)
);

-- Just-in-time approvals and their decisions. Mutable (state): upserted.
CREATE TABLE approvals (
    host_id         text    NOT NULL,
    local_id        bigint  NOT NULL,
    state           text    NOT NULL,
    rule            text    NOT NULL,
    approver_group  text    NOT NULL,
    min_approvals   integer NOT NULL,
    identity        text    NOT NULL,
    identity_labels text    NOT NULL,
    process         text    NOT NULL,
    job             text    NOT NULL,
    session_id      text,
    method          text    NOT NULL,
    url             text    NOT NULL,  -- masked by the proxy
    destination     text    NOT NULL,
    body_preview    text    NOT NULL,  -- masked by the proxy
    requesters      text    NOT NULL,
    created_at      bigint  NOT NULL,
    expires_at      bigint  NOT NULL,
    finished_at     bigint,
    PRIMARY KEY (host_id, local_id)
);

CREATE TABLE decisions (
    host_id           text   NOT NULL,
    local_id          bigint NOT NULL,
    approval_local_id bigint NOT NULL,
    verdict           text   NOT NULL,
    approver          text   NOT NULL,
    recorded_as       text   NOT NULL,
    uid               bigint NOT NULL,
    pid               bigint NOT NULL,
    identity          text,
    comment           text,
    decided_at        bigint NOT NULL,
    PRIMARY KEY (host_id, local_id)
);
