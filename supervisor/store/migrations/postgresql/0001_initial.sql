-- Sessions and their messages.
CREATE TABLE sessions (
    id            text PRIMARY KEY,
    tenant        text NOT NULL,
    agent         text NOT NULL,
    metadata      jsonb NOT NULL DEFAULT '{}',  -- website_domain, client ip, ...
    status        text NOT NULL,
    end_reason    text,
    message_count integer NOT NULL DEFAULT 0,   -- also the last seq handed out
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_activity timestamptz NOT NULL DEFAULT now(),
    ended_at      timestamptz                   -- NULL while the session is live
);
CREATE INDEX sessions_tenant_idx ON sessions (tenant);
CREATE INDEX sessions_ended_at_idx ON sessions (ended_at);

CREATE TABLE messages (
    session_id text NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq        integer NOT NULL,
    role       text NOT NULL,
    content    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, seq)
);
