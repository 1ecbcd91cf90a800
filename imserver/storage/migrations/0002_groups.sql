-- imserver schema, version 2: groups, message lifecycle (recall, delete,
-- pin, mute, mentions) and notices. See docs/design.md.

-- Group ids are decimal strings of this sequence; the conversation is 'g:' || gid.
CREATE SEQUENCE group_ids;

CREATE TABLE groups (
    gid         text PRIMARY KEY,
    name        text NOT NULL,
    avatar      text NOT NULL DEFAULT '',
    owner       text NOT NULL,
    created_ms  bigint NOT NULL,
    dissolved   boolean NOT NULL DEFAULT false
);

-- Current members only. A removed member keeps a user_convs row with left_seq.
CREATE TABLE group_members (
    gid         text NOT NULL REFERENCES groups(gid) ON DELETE CASCADE,
    user_name   text NOT NULL,
    role        text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    joined_seq  bigint NOT NULL,
    PRIMARY KEY (gid, user_name)
);
CREATE INDEX group_members_user ON group_members(user_name);

-- left_seq: the seq of the entry that removed the user from a group
-- conversation (NULL while a member); they may read up to it and no further.
-- mention_seq: the highest seq that mentioned the user ("mentioned" in sync
-- while it is above read_seq).
ALTER TABLE user_convs ADD COLUMN left_seq bigint;
ALTER TABLE user_convs ADD COLUMN mention_seq bigint NOT NULL DEFAULT 0;

-- Messages one user deleted for themselves (PROTOCOL §7 delete).
CREATE TABLE hidden_messages (
    user_name   text NOT NULL,
    mid         bigint NOT NULL REFERENCES messages(mid) ON DELETE CASCADE,
    PRIMARY KEY (user_name, mid)
);

CREATE TABLE notices (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text NOT NULL,
    title       text NOT NULL,
    body        text NOT NULL,
    created_ms  bigint NOT NULL,
    -- true: every user registered when it was created; false: notice_recipients.
    to_all      boolean NOT NULL
);

CREATE TABLE notice_recipients (
    user_name   text NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    notice_id   bigint NOT NULL REFERENCES notices(id) ON DELETE CASCADE,
    PRIMARY KEY (user_name, notice_id)
);

CREATE TABLE notice_reads (
    user_name   text NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    notice_id   bigint NOT NULL REFERENCES notices(id) ON DELETE CASCADE,
    read_ms     bigint NOT NULL,
    PRIMARY KEY (user_name, notice_id)
);
