-- Events a consumer (a projection, a worker, the session map) could not apply. The consumer
-- records the event here and moves on instead of retrying it for ever; an operator retries or
-- skips it (both are events in the log, applied by the consumer itself, in its own order).
CREATE TABLE parked_events (
    consumer        text        NOT NULL,
    event_id        uuid        NOT NULL,
    transaction_id  xid8        NOT NULL,
    global_position bigint      NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    event_type      text        NOT NULL,
    event_version   text        NOT NULL,
    error           text        NOT NULL,
    attempts        integer     NOT NULL DEFAULT 1,
    status          text        NOT NULL DEFAULT 'parked' CHECK (status IN ('parked', 'resolved', 'skipped')),
    parked_at       timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX parked_events_by_position ON parked_events (consumer, transaction_id, global_position);
CREATE INDEX parked_events_open ON parked_events (consumer) WHERE status = 'parked';
