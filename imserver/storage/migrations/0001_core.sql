-- imserver schema, version 1: accounts, tokens, friends, direct conversations.
-- Identifiers are the protocol's own strings (user names, conv ids); see docs/design.md.

CREATE TABLE users (
    name        text PRIMARY KEY,
    pw_hash     text NOT NULL,
    created_ms  bigint NOT NULL
);

-- Tokens are stored only as SHA-256 hashes of the random token.
CREATE TABLE tokens (
    hash        bytea PRIMARY KEY,
    user_name   text NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    device      text NOT NULL,
    created_ms  bigint NOT NULL,
    expires_ms  bigint NOT NULL,
    revoked     boolean NOT NULL DEFAULT false
);
CREATE INDEX tokens_user ON tokens(user_name);

-- An accepted friendship, stored once with a < b.
CREATE TABLE friendships (
    a           text NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    b           text NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    since_ms    bigint NOT NULL,
    PRIMARY KEY (a, b),
    CHECK (a < b)
);
CREATE INDEX friendships_b ON friendships(b);

CREATE TABLE friend_requests (
    from_user   text NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    to_user     text NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    note        text NOT NULL DEFAULT '',
    created_ms  bigint NOT NULL,
    PRIMARY KEY (from_user, to_user)
);
CREATE INDEX friend_requests_to ON friend_requests(to_user);

CREATE TABLE blocks (
    blocker     text NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    blocked     text NOT NULL,
    created_ms  bigint NOT NULL,
    PRIMARY KEY (blocker, blocked)
);
CREATE INDEX blocks_blocked ON blocks(blocked);

-- One row per conversation; last_seq is the highest committed seq.
CREATE TABLE conversations (
    conv        text PRIMARY KEY,
    kind        text NOT NULL,
    last_seq    bigint NOT NULL DEFAULT 0,
    last_mid    bigint,
    last_ts     bigint NOT NULL DEFAULT 0
);

-- Per-user state of a conversation. unread is derived from messages (see design.md).
CREATE TABLE user_convs (
    user_name     text NOT NULL,
    conv          text NOT NULL REFERENCES conversations(conv) ON DELETE CASCADE,
    read_seq      bigint NOT NULL DEFAULT 0,
    delivered_seq bigint NOT NULL DEFAULT 0,
    pinned        boolean NOT NULL DEFAULT false,
    muted         boolean NOT NULL DEFAULT false,
    PRIMARY KEY (user_name, conv)
);

CREATE TABLE messages (
    mid         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conv        text NOT NULL,
    seq         bigint NOT NULL,
    sender      text NOT NULL,
    cid         text,
    kind        text NOT NULL,
    body        text,
    meta        jsonb,
    mentions    jsonb,
    reply_to    bigint,
    ts          bigint NOT NULL,
    recalled    boolean NOT NULL DEFAULT false,
    CONSTRAINT messages_conv_seq UNIQUE (conv, seq),
    CONSTRAINT messages_sender_cid UNIQUE (sender, cid)
);
