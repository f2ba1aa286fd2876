-- Read model of users, written only by the users projection.
CREATE TABLE users (
    id              uuid        PRIMARY KEY,
    email           text        NOT NULL,
    display_name    text        NOT NULL,
    status          text        NOT NULL,
    roles           text[]      NOT NULL DEFAULT '{}',
    email_verified  boolean     NOT NULL DEFAULT false,
    session_version bigint      NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    version         bigint      NOT NULL
);
CREATE UNIQUE INDEX users_email_key ON users (email);
CREATE INDEX users_created_order ON users (created_at DESC, id DESC);
CREATE INDEX users_roles ON users USING gin (roles);

-- Audit log, written by the audit worker: one row per event, idempotent by event id.
CREATE TABLE audit_log (
    event_id        uuid        PRIMARY KEY,
    global_position bigint      NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    sequence        bigint      NOT NULL,
    action          text        NOT NULL,
    actor_id        text,
    target          text        NOT NULL,
    client_ip       text,
    user_agent      text,
    request_id      text,
    occurred_at     timestamptz NOT NULL,
    logged_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_position ON audit_log (global_position);
CREATE INDEX audit_log_actor ON audit_log (actor_id, occurred_at);
CREATE INDEX audit_log_target ON audit_log (aggregate_type, aggregate_id);
