-- Jobs: Celery-style background work. The `jobs` table is the queue and the truth about each
-- job's state; workers claim due jobs from it with `FOR UPDATE SKIP LOCKED` in one statement that
-- also takes the lease, and are woken by NOTIFY on `cairn_jobs` (a short poll is the fallback).
-- What was asked for over HTTP, what operators did, and how each job ended are events in the
-- log (the `Job` aggregate); attempts are bookkeeping, kept here only.

CREATE TABLE jobs (
    id               uuid        PRIMARY KEY,
    kind             text        NOT NULL,
    args             jsonb       NOT NULL DEFAULT '{}',
    -- scheduled: waits for run_at (a delay, or the backoff before a retry); queued: due;
    -- running: leased by a worker; done; failed: gave up on a permanent error; dead: every
    -- attempt failed; cancelled: by an operator before it ran.
    status           text        NOT NULL CHECK (status IN ('scheduled', 'queued', 'running', 'done', 'failed', 'dead', 'cancelled')),
    -- Higher runs first, -100 to 100.
    priority         smallint    NOT NULL DEFAULT 0 CHECK (priority BETWEEN -100 AND 100),
    attempts         integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     integer     NOT NULL DEFAULT 25 CHECK (max_attempts BETWEEN 1 AND 1000),
    -- When it may run next (first run, or the retry after a backoff).
    run_at           timestamptz NOT NULL,
    -- The same key returns the same job while the row exists.
    idempotency_key  text        UNIQUE CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    -- The lease: taken by a claim, which adds one to `fence`; renewed by heartbeat; an outcome
    -- is recorded only with the fence of the lease that ran it.
    fence            bigint      NOT NULL DEFAULT 0,
    lease_owner      text,
    lease_expires_at timestamptz,
    -- Every attempt's error, oldest first: [{attempt, at, error}] (the last 50 kept).
    errors           jsonb       NOT NULL DEFAULT '[]',
    last_error       text,
    -- Who asked: a user id, `schedule:<name>`, `event:<type>`, `operator`, or `system`.
    enqueued_by      text,
    -- The `Job` aggregate's last sequence in the log (0 while nothing about it is there).
    version          bigint      NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL
);

-- What a claim reads: due work of a kind, best priority first, oldest first.
CREATE INDEX jobs_ready ON jobs (kind, priority DESC, run_at) WHERE status IN ('queued', 'scheduled');
-- What the lease reaper reads.
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE status = 'running';
-- Listing by status and kind, newest first, and the retention purge.
CREATE INDEX jobs_by_status ON jobs (status, created_at DESC, id);
CREATE INDEX jobs_by_kind ON jobs (kind, status, created_at DESC, id);

-- Workers LISTEN on `cairn_jobs`; a job that becomes claimable (queued) wakes them at commit.
-- Row-level with a condition: a statement-level trigger fires even when no row changed, so every
-- claim (which updates `status`) would wake every worker, and their claims would wake them again.
-- Notifications with the same payload in one transaction are delivered once.
CREATE FUNCTION jobs_notify_workers() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('cairn_jobs', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER jobs_wake_workers_on_insert AFTER INSERT ON jobs
    FOR EACH ROW WHEN (NEW.status = 'queued') EXECUTE FUNCTION jobs_notify_workers();
CREATE TRIGGER jobs_wake_workers_on_update AFTER UPDATE OF status, run_at ON jobs
    FOR EACH ROW WHEN (NEW.status = 'queued') EXECUTE FUNCTION jobs_notify_workers();

-- Cron schedules. Each tick is fired by exactly one process: the firing transaction locks the
-- row (`FOR UPDATE SKIP LOCKED`), enqueues the tick's job and moves `next_run_at` on, together.
CREATE TABLE schedules (
    name          text        PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,99}$'),
    -- Six fields (with seconds) or five (seconds = 0).
    cron          text        NOT NULL,
    -- An IANA zone such as `Europe/Paris`; ticks follow its wall clock.
    timezone      text        NOT NULL DEFAULT 'UTC',
    kind          text        NOT NULL,
    args          jsonb       NOT NULL DEFAULT '{}',
    -- `api` (POST /schedules, an event in the log), `config` (CAIRN_SCHEDULES_FILE), `builtin`.
    source        text        NOT NULL CHECK (source IN ('api', 'config', 'builtin')),
    next_run_at   timestamptz NOT NULL,
    last_fired_at timestamptz,
    last_job_id   uuid,
    -- The `Schedule` aggregate's last sequence in the log (0 for config and builtin ones).
    version       bigint      NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);

CREATE INDEX schedules_due ON schedules (next_run_at);
