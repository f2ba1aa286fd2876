-- The relay is now woken after a command commits (in-process, and by a NOTIFY sent on its own),
-- not by a trigger inside every appending transaction: a NOTIFY inside a transaction takes a
-- cluster-wide lock at commit, which serialised all command commits.
DROP TRIGGER events_wake_relay ON events;
DROP FUNCTION events_notify_relay();
