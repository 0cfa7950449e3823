-- append_message inserts the message with seq = message_count + 1 in one statement;
-- this trigger keeps sessions.message_count and last_activity in step, in the same transaction.
CREATE TRIGGER messages_bump_session AFTER INSERT ON messages
BEGIN
    UPDATE sessions SET message_count = NEW.seq, last_activity = NEW.created_at
    WHERE id = NEW.session_id;
END;
