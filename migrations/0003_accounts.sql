-- Sessions read model: one row per sign-in, for the session list.
CREATE TABLE sessions (
    id              uuid        PRIMARY KEY,
    user_id         uuid        NOT NULL,
    device          text,
    ip              text,
    created_at      timestamptz NOT NULL,
    last_used_at    timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    session_version bigint      NOT NULL,
    revoked_at      timestamptz,
    revoke_reason   text,
    version         bigint      NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id, created_at DESC);

-- Roles read model.
CREATE TABLE roles (
    name        text        PRIMARY KEY,
    permissions text[]      NOT NULL,
    updated_at  timestamptz NOT NULL,
    version     bigint      NOT NULL
);

-- Single-use tokens sent by mail, stored only as SHA-256 hashes. One row per mail-sending event.
CREATE TABLE email_tokens (
    token_hash text        PRIMARY KEY,
    user_id    uuid        NOT NULL,
    purpose    text        NOT NULL CHECK (purpose IN ('verify_email', 'reset_password')),
    event_id   uuid        NOT NULL UNIQUE,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX email_tokens_user ON email_tokens (user_id, purpose);

-- What the mail worker has sent, by the event that asked for it: a redelivered event is not mailed twice.
CREATE TABLE email_deliveries (
    event_id   uuid        PRIMARY KEY,
    kind       text        NOT NULL,
    recipient  text        NOT NULL,
    sent_at    timestamptz NOT NULL DEFAULT now()
);

-- OAuth sign-ins in flight: state, PKCE verifier and nonce, each usable once.
CREATE TABLE oauth_states (
    state         text        PRIMARY KEY,
    provider      text        NOT NULL,
    code_verifier text        NOT NULL,
    nonce         text        NOT NULL,
    expires_at    timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Sign-in lookups by verified email for OAuth linking use the event store's email index.
