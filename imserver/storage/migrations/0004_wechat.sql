-- imserver schema, version 4: WeChat (Gewechat) events as received.
--
-- Every AddMsg callback is kept whole here, once per (appid, new_msg_id),
-- before its message is handed to the batch writer. The message itself is a
-- row of `messages` (conv 'wx:<appid>:<peer>', sender 'wx:<wxid>', cid
-- '<appid>:<new_msg_id>'), keyed by the sender stored here with the first
-- delivery, so the (sender, cid) unique index makes a replay, however late and
-- whatever it says, a repeat of the first. new_msg_id is a 64-bit integer and
-- stays exact as bigint (JSON clients see it as the string meta.new_msg_id).
CREATE TABLE wechat_events (
    appid       text NOT NULL,
    new_msg_id  bigint NOT NULL,
    -- the message's sender at the first delivery: replays are keyed by it
    sender      text NOT NULL,
    received_ms bigint NOT NULL,
    raw         jsonb NOT NULL,
    PRIMARY KEY (appid, new_msg_id)
);
