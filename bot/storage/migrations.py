"""The SQLite schema, as the migrations that build it: ``PRAGMA user_version`` is how many have run.

Never edit a released migration: an existing database has already run it. Change the schema by
appending one, which must also bring the rows already there up to date.
"""

from __future__ import annotations

from collections.abc import Sequence

MIGRATIONS: list[Sequence[str]] = [
    # version 1
    (
        """CREATE TABLE threads (
            key TEXT PRIMARY KEY,
            persona TEXT NOT NULL,
            epoch INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            thread_key TEXT NOT NULL REFERENCES threads(key) ON DELETE CASCADE,
            epoch INTEGER NOT NULL,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'notice')),
            author TEXT NOT NULL DEFAULT '',
            text TEXT NOT NULL,
            platform_message_id TEXT,
            status TEXT NOT NULL DEFAULT 'done',
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX messages_by_thread ON messages (thread_key, id)",
        """CREATE TABLE states (
            thread_key TEXT PRIMARY KEY REFERENCES threads(key) ON DELETE CASCADE,
            fingerprint TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            last_message_id INTEGER NOT NULL,
            token_count INTEGER NOT NULL,
            checksum TEXT NOT NULL,
            blob BLOB NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE processed_events (
            key TEXT PRIMARY KEY,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX processed_events_by_time ON processed_events (created_at)",
    ),
    # version 2: the token ids of a reply as the model read them, and the tokenizer that made them
    (
        "ALTER TABLE messages ADD COLUMN tokens BLOB",
        "ALTER TABLE messages ADD COLUMN tokenizer TEXT",
    ),
    # version 3: what a turn reads is found without walking the thread.
    # - seq: the message's place in its thread (0, 1, 2, … with no gaps), so a position is one lookup
    #   instead of COUNT(*) over the thread. Backfilled through a keyed temporary table: one pass,
    #   where a correlated COUNT(*) per row would be quadratic in a thread's length.
    # - messages_by_role: the newest reply of an epoch (last_reply_id, every turn) is one index seek.
    (
        "ALTER TABLE messages ADD COLUMN seq INTEGER",
        "CREATE TEMP TABLE message_seq (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL)",
        """INSERT INTO temp.message_seq (id, seq)
           SELECT id, ROW_NUMBER() OVER (PARTITION BY thread_key ORDER BY id) - 1 FROM messages""",
        "UPDATE messages SET seq = (SELECT seq FROM temp.message_seq WHERE message_seq.id = messages.id)",
        "DROP TABLE temp.message_seq",
        "CREATE UNIQUE INDEX messages_by_thread_seq ON messages (thread_key, seq)",
        "CREATE INDEX messages_by_role ON messages (thread_key, role, epoch, id)",
    ),
    # version 4: a turn is a durable record with a lifecycle and an owner.
    # - instances: each running Raven process (its id, and a heartbeat that is its lease), so that
    #   recovery touches only turns whose owner is gone, never another live process's.
    # - turns: one per user message that is to be answered: received → generating → generated →
    #   delivered, or failed / interrupted / delivery_failed; each transition is committed. A message
    #   still pending from before this version becomes a turn without an owner (recoverable by anyone).
    #   ``notified``: the platform has been told of a turn that was lost, or shown its reply in full.
    (
        """CREATE TABLE instances (
            id TEXT PRIMARY KEY,
            label TEXT NOT NULL DEFAULT '',
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL,
            stopped_at REAL
        )""",
        """CREATE TABLE turns (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            thread_key TEXT NOT NULL REFERENCES threads(key) ON DELETE CASCADE,
            message_id INTEGER NOT NULL UNIQUE REFERENCES messages(id) ON DELETE CASCADE,
            reply_id INTEGER REFERENCES messages(id) ON DELETE SET NULL,
            phase TEXT NOT NULL CHECK (phase IN ('received', 'generating', 'generated', 'delivered',
                                                 'delivery_failed', 'interrupted', 'failed')),
            owner TEXT,
            reason TEXT,
            notified INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        # deliveries: which platform messages carry a turn's reply, and what each one shows, so that
        # a message left half-written by a crash is repaired, and a lost turn's notice is posted
        """CREATE TABLE deliveries (
            turn_id INTEGER NOT NULL REFERENCES turns(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            platform_message_id TEXT NOT NULL,
            shown TEXT NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (turn_id, position)
        )""",
        """CREATE INDEX turns_to_repair ON turns (thread_key)
           WHERE notified = 0 AND phase IN ('generated', 'interrupted')""",
        "CREATE INDEX turns_in_flight ON turns (phase, owner) WHERE phase IN ('received', 'generating')",
        # the newest reply the thread has read skips undelivered ones: status joins the index, which
        # then still answers last_reply_id by itself
        "DROP INDEX messages_by_role",
        "CREATE INDEX messages_by_role ON messages (thread_key, role, epoch, status, id)",
        """INSERT INTO turns (thread_key, message_id, phase, owner, created_at, updated_at)
           SELECT thread_key, id, 'received', NULL, created_at, created_at FROM messages
           WHERE role = 'user' AND status = 'pending'""",
    ),
    # version 5: what only an RNN bot can do cheaply.
    # - threads.title: a name the user gave the thread (NULL: the first line of its first message).
    # - threads.forked_from / forked_at: a thread started from another one's state (``/fork``), and the
    #   reply it was forked at.
    # - states get two slots per thread, and threads.state_slot says which is current. A turn writes
    #   its new state into the other slot and flips the pointer, so the state from *before* the last
    #   reply stays (the prior slot) at no extra write: ``/retry`` (a new reply to the same message) and
    #   ``/continue`` (extend the last reply) start exactly where that reply started, without
    #   re-reading the log. A replaced reply keeps its row in the log with the status ``replaced``.
    (
        "ALTER TABLE threads ADD COLUMN title TEXT",
        "ALTER TABLE threads ADD COLUMN forked_from TEXT",
        "ALTER TABLE threads ADD COLUMN forked_at INTEGER",
        "ALTER TABLE threads ADD COLUMN state_slot INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE states_by_slot (
            thread_key TEXT NOT NULL REFERENCES threads(key) ON DELETE CASCADE,
            slot INTEGER NOT NULL CHECK (slot IN (0, 1)),
            fingerprint TEXT NOT NULL,
            epoch INTEGER NOT NULL,
            last_message_id INTEGER NOT NULL,
            token_count INTEGER NOT NULL,
            checksum TEXT NOT NULL,
            blob BLOB NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (thread_key, slot)
        )""",
        """INSERT INTO states_by_slot (thread_key, slot, fingerprint, epoch, last_message_id, token_count,
                                       checksum, blob, updated_at)
           SELECT thread_key, 0, fingerprint, epoch, last_message_id, token_count, checksum, blob, updated_at
           FROM states""",
        "DROP TABLE states",
        "ALTER TABLE states_by_slot RENAME TO states",
    ),
    # version 6: limits and retention, read off the log itself (so they hold across restarts and
    # processes): who sent each message (``platform:user id``; NULL for Raven's own and older rows),
    # how many tokens each turn generated, and the indexes that find a user's last day and old threads.
    (
        "ALTER TABLE messages ADD COLUMN user_ref TEXT",
        "ALTER TABLE turns ADD COLUMN generated INTEGER NOT NULL DEFAULT 0",
        # how much of its reply a turn found written (``/continue`` shows only what it adds: a repair
        # after a crash must not post the older part again)
        "ALTER TABLE turns ADD COLUMN shown_from INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX messages_by_user ON messages (user_ref, created_at) WHERE user_ref IS NOT NULL",
        "CREATE INDEX threads_by_update ON threads (updated_at)",
        "CREATE INDEX states_by_update ON states (updated_at)",
    ),
    # version 7: per-channel limits, likewise read off the log: the room each user message was written
    # in (``platform:channel id``; NULL where there is none, as on the web, and for older rows).
    (
        "ALTER TABLE messages ADD COLUMN channel_ref TEXT",
        "CREATE INDEX messages_by_channel ON messages (channel_ref, created_at) WHERE channel_ref IS NOT NULL",
    ),
    # version 8: a thread's turns newest first (where its last reply's buttons are, after a restart)
    (
        "CREATE INDEX turns_by_thread ON turns (thread_key, id)",
    ),
]
SCHEMA_VERSION = len(MIGRATIONS)
