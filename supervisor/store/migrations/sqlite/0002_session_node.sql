-- Which server ran the session's process last, so a server that restarts after dying can end
-- the sessions it left behind (end_orphans) without touching other nodes' sessions.
ALTER TABLE sessions ADD COLUMN node TEXT;
CREATE INDEX sessions_node_live_idx ON sessions (node) WHERE ended_at IS NULL;
