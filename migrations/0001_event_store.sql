-- The event store: the columns postgres-es writes, plus the four that make the log a safe
-- outbox. postgres-es's INSERT names only its seven columns, so the others take their defaults.
CREATE TABLE events (
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    sequence        bigint      NOT NULL CHECK (sequence >= 0),
    event_type      text        NOT NULL,
    event_version   text        NOT NULL,
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL,
    -- Order of insertion. Not safe to tail on its own: a transaction holding a lower position can
    -- commit after one holding a higher position. The relay orders by (transaction_id, global_position).
    global_position bigint      GENERATED ALWAYS AS IDENTITY,
    event_id        uuid        NOT NULL DEFAULT gen_random_uuid(),
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_global_position_key UNIQUE (global_position)
);

-- The relay's and rebuild's read order.
CREATE INDEX events_relay_order ON events (transaction_id, global_position);

-- One account per email, enforced atomically with the append itself: two registrations of one
-- address race to this index and exactly one commits. Nothing is reserved beforehand, so a crash
-- half-way through a registration leaves nothing behind that could block the address.
CREATE UNIQUE INDEX events_user_email_key ON events ((payload -> 'UserRegistered' ->> 'email'))
    WHERE aggregate_type = 'User' AND event_type = 'UserRegistered';

-- The log is immutable.
CREATE FUNCTION events_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event log is append-only: % on events is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER events_no_update_or_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_reject_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_reject_change();

-- Wake the relay when events commit (delivered at commit; a short poll is the fallback).
CREATE FUNCTION events_notify_relay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cairn_events', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER events_wake_relay AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_notify_relay();

-- Where the relay has published up to, per namespace.
CREATE TABLE relay_checkpoints (
    name       text        PRIMARY KEY,
    last_tx    xid8        NOT NULL DEFAULT '0',
    last_pos   bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Where each projection has applied up to; updated in the same transaction as its read model.
CREATE TABLE projection_checkpoints (
    name       text        PRIMARY KEY,
    last_tx    xid8        NOT NULL DEFAULT '0',
    last_pos   bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);
