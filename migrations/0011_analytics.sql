-- Analytics: daily figures built from the log by the `analytics` projection, by UTC day of each
-- event's `recorded_at`. Counters only ever grow: every event adds to one day's row once.
CREATE TABLE analytics_daily (
    day            date   PRIMARY KEY,
    signups        bigint NOT NULL DEFAULT 0,
    -- Distinct users with a sign-in or a refresh that day (the rows of `analytics_active`).
    active_users   bigint NOT NULL DEFAULT 0,
    messages_sent  bigint NOT NULL DEFAULT 0,
    files_uploaded bigint NOT NULL DEFAULT 0,
    bytes_uploaded bigint NOT NULL DEFAULT 0,
    -- Runs of jobs that ended (done, failed or dead), and those of them that did not succeed.
    jobs_run       bigint NOT NULL DEFAULT 0,
    jobs_failed    bigint NOT NULL DEFAULT 0
);

-- Who was active on which day: a user counts once a day however often they sign in.
CREATE TABLE analytics_active (
    day     date NOT NULL,
    user_id uuid NOT NULL,
    PRIMARY KEY (day, user_id)
);

-- DAU, WAU and MAU as of each finished day, filled by the `analytics.rollup` job so that long
-- ranges need no count over a month of users. Not part of the projection (a rebuild leaves it):
-- a row is current while `window_active`, the sum of `active_users` over the 30 days it covers,
-- still matches the daily rows; since those only grow, any user added in the window shows.
CREATE TABLE analytics_rollup (
    day           date        PRIMARY KEY,
    dau           bigint      NOT NULL,
    wau           bigint      NOT NULL,
    mau           bigint      NOT NULL,
    window_active bigint      NOT NULL,
    computed_at   timestamptz NOT NULL
);
