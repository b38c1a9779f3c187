-- One row the service rewrites to learn whether the database accepts durable writes: at
-- start-up (an unwritable database stops `serve`) and, after a failed write, until a write
-- commits again (`/ready` answers 503 meanwhile). It holds no credential data.
CREATE TABLE credgate_write_probe (
    id INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    at TEXT    NOT NULL
);
