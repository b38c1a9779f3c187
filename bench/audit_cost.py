"""What the audit log costs SQLite per durable registration, apart from the service.

python3 bench/audit_cost.py VARIANT, VARIANT one of:
  noev   credentials only (no audit event)
  idx    an event per registration, with an index on (api_key, id) over every event
  noidx  an event per registration, no key index
  trig   the shipped design: later events indexed, the registration event's id written
         into the credential's row by a trigger
Builds a 1 000 000-credential database (and events) in a temporary directory, then
registers in transactions of 64 for 10 s, WAL and synchronous = FULL, and prints the rate.
"""
import sqlite3, os, shutil, time, random, string, sys, tempfile
variant = sys.argv[1]
path = os.path.join(tempfile.mkdtemp(prefix="credgate-audit-cost-"), f"{variant}.db")
for suf in ("", "-wal", "-shm"):
    try: os.remove(path+suf)
    except FileNotFoundError: pass
c = sqlite3.connect(path, isolation_level=None)
c.execute("pragma journal_mode=wal"); c.execute("pragma synchronous=full")
c.execute("create table cred (api_key text primary key, active int default 1, created_at text, meta text default '{}', scopes text default '*', owner text, name text, reg integer) without rowid")
idx = {"noidx": "", "idx": "create index ev_key on ev (api_key, id);", "noev": "",
       "trig": "create index ev_key on ev (api_key, id) where event not in ('registered','issued'); create trigger ev_reg after insert on ev when new.event in ('registered','issued') begin update cred set reg = new.id where api_key = new.api_key; end;"}[variant]
c.executescript(f"create table ev (id integer primary key autoincrement, at text, api_key text, event text, actor text, source text, detail text); {idx} create index ev_at on ev(at);")
def key(): return "ak_" + "".join(random.choices(string.ascii_letters+string.digits, k=32))
c.execute("begin")
for i in range(1_000_000):
    k = key()
    c.execute("insert into cred(api_key, created_at) values (?, '2026')", (k,))
    if variant != "noev":
        c.execute("insert into ev(at, api_key, event, source, detail) values (strftime('%Y-%m-%dT%H:%M:%fZ','now'), ?, 'registered','sql','{\"scopes\":[\"*\"]}')", (k,))
c.execute("commit")
c.execute("pragma wal_checkpoint(truncate)")
t = time.time(); n = 0
while time.time() - t < 10:
    c.execute("begin immediate")
    for i in range(64):
        k = key()
        c.execute("insert into cred(api_key, created_at) values (?, '2026')", (k,))
        if variant != "noev":
            c.execute("insert into ev(at, api_key, event, source, detail) values (strftime('%Y-%m-%dT%H:%M:%fZ','now'), ?, 'registered','api','{\"scopes\":[\"*\"],\"client\":\"127.0.0.1\",\"request_id\":\"0123456789abcdef0123456789abcdef\"}')", (k,))
        n += 1
    c.execute("commit")
el = time.time() - t
print(variant, f"{n/el:.0f} regs/s in batches of 64")
c.close()
shutil.rmtree(os.path.dirname(path))
