-- The sign-in guard: password guesses per email (known or not), keyed by the SHA-256 of the
-- normalised address. Each step is one statement (command-api/src/auth/guard.rs), so concurrent
-- requests in any number of processes never evaluate more guesses than the lockout allows.
CREATE TABLE login_guards (
    key             text        PRIMARY KEY,
    -- Wrong guesses in a row (since the last sign-in or the last lock).
    failures        integer     NOT NULL DEFAULT 0,
    -- Guesses admitted and still being checked; they count until in_flight_until.
    in_flight       integer     NOT NULL DEFAULT 0,
    in_flight_until timestamptz,
    -- Locks in a row (each doubles the next), and the end of the latest.
    lock_level      integer     NOT NULL DEFAULT 0,
    locked_until    timestamptz,
    -- A quiet row is forgotten (swept) after this.
    expires_at      timestamptz NOT NULL
);
CREATE INDEX login_guards_expiry ON login_guards (expires_at);
