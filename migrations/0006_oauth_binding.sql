-- OAuth sign-ins are bound to the client that started them. A browser's flow keeps the PKCE
-- verifier here and is bound by a cookie holding a hash of the state; a native client's flow
-- keeps only the client's own PKCE challenge, and the client presents its verifier at the
-- callback. Each row is one or the other.
ALTER TABLE oauth_states
    ALTER COLUMN code_verifier DROP NOT NULL,
    ADD COLUMN client_challenge text,
    ADD CONSTRAINT oauth_states_one_binding CHECK ((code_verifier IS NULL) <> (client_challenge IS NULL));
