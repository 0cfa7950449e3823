-- Session ids are per tenant (supervisor/session_keys.py): a row's id is its key, "tenant/id",
-- and the dev tenant's ("default") its bare id. Rows of other tenants get their tenant in front.
ALTER TABLE messages DROP CONSTRAINT messages_session_id_fkey;
UPDATE messages m SET session_id = s.tenant || '/' || m.session_id
    FROM sessions s WHERE s.id = m.session_id AND s.tenant <> 'default';
UPDATE sessions SET id = tenant || '/' || id WHERE tenant <> 'default';
ALTER TABLE messages ADD CONSTRAINT messages_session_id_fkey
    FOREIGN KEY (session_id) REFERENCES sessions (id) ON DELETE CASCADE;
