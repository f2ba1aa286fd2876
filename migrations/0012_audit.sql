-- The verifiable log: an append-only Merkle tree over the events, in the relay's one order
-- (`transaction_id`, `global_position`), in the shape of RFC 6962 / RFC 9162 section 2.1.

-- The bytes a leaf hashes: the stored event, as Postgres prints this JSON object of its columns
-- (jsonb text: keys ordered by length then bytes, `": "` and `", "` between them, numbers as
-- stored). Positions are not part of it: a leaf's place in the tree is its position.
-- `recorded_at` is written in UTC with microseconds, whatever the session's time zone.
CREATE FUNCTION audit_leaf_text(e events) RETURNS text LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'event_id', e.event_id,
        'aggregate_type', e.aggregate_type,
        'aggregate_id', e.aggregate_id,
        'sequence', e.sequence,
        'event_type', e.event_type,
        'event_version', e.event_version,
        'recorded_at', to_char(e.recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'payload', e.payload,
        'metadata', e.metadata)::text
$$;

-- The leaf hash: SHA-256(0x00 || UTF-8 of audit_leaf_text).
CREATE FUNCTION audit_leaf_hash(e events) RETURNS bytea LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT sha256('\x00'::bytea || convert_to(audit_leaf_text(e), 'UTF8'))
$$;

-- One row per leaf, in tree order. The position and hash are those the event had when it was
-- folded, so a later change to the events table shows against them.
CREATE TABLE audit_leaves (
    leaf_index      bigint      PRIMARY KEY CHECK (leaf_index >= 0),
    event_id        uuid        NOT NULL,
    transaction_id  xid8        NOT NULL,
    global_position bigint      NOT NULL,
    leaf_hash       bytea       NOT NULL CHECK (length(leaf_hash) = 32),
    -- The latest recorded_at of this event and every one before it: never decreases along the
    -- tree, so a time maps to a contiguous stretch of leaves with one index lookup.
    log_time        timestamptz NOT NULL,
    CONSTRAINT audit_leaves_event_id_key UNIQUE (event_id)
);
CREATE INDEX audit_leaves_log_time ON audit_leaves (log_time, leaf_index);

-- The hash of every complete subtree of 2^level leaves (level >= 1), the `idx`-th from the left:
-- leaves idx·2^level … (idx+1)·2^level − 1. Level 0 is audit_leaves. Any proof needs O(log n) of them.
CREATE TABLE audit_nodes (
    level smallint NOT NULL CHECK (level BETWEEN 1 AND 62),
    idx   bigint   NOT NULL CHECK (idx >= 0),
    hash  bytea    NOT NULL CHECK (length(hash) = 32),
    PRIMARY KEY (level, idx)
);

-- How far the tree has folded the log (one row): its size and the position of its last leaf.
CREATE TABLE audit_tree (
    id         boolean     PRIMARY KEY DEFAULT true CHECK (id),
    tree_size  bigint      NOT NULL DEFAULT 0,
    last_tx    xid8        NOT NULL DEFAULT '0',
    last_pos   bigint      NOT NULL DEFAULT 0,
    log_time   timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO audit_tree DEFAULT VALUES;

-- Signed tree heads: (size, root, time) signed with an audit key (Ed25519).
CREATE TABLE audit_heads (
    tree_size    bigint      PRIMARY KEY CHECK (tree_size > 0),
    root_hash    bytea       NOT NULL CHECK (length(root_hash) = 32),
    timestamp_ms bigint      NOT NULL,
    origin       text        NOT NULL,
    key_id       text        NOT NULL,
    signature    bytea       NOT NULL CHECK (length(signature) = 64),
    signed_at    timestamptz NOT NULL DEFAULT now()
);

-- Rebuilds of projections: at most one running per projection, decided by this row.
CREATE TABLE projection_rebuilds (
    projection   text        PRIMARY KEY,
    state        text        NOT NULL CHECK (state IN ('running', 'done', 'failed')),
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    events_total bigint      NOT NULL DEFAULT 0,
    events_done  bigint      NOT NULL DEFAULT 0,
    requested_by text        NOT NULL DEFAULT '',
    error        text
);
