-- Sessions and their messages. Times are unix seconds (REAL).
CREATE TABLE sessions (
    id            TEXT PRIMARY KEY,
    tenant        TEXT NOT NULL,
    agent         TEXT NOT NULL,
    metadata      TEXT NOT NULL DEFAULT '{}',   -- JSON object: website_domain, client ip, ...
    status        TEXT NOT NULL,
    end_reason    TEXT,
    message_count INTEGER NOT NULL DEFAULT 0,   -- also the last seq handed out
    created_at    REAL NOT NULL,
    last_activity REAL NOT NULL,
    ended_at      REAL                          -- NULL while the session is live
);
CREATE INDEX sessions_tenant_idx ON sessions (tenant);
CREATE INDEX sessions_ended_at_idx ON sessions (ended_at);

CREATE TABLE messages (
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    role       TEXT NOT NULL,
    content    TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (session_id, seq)
);
