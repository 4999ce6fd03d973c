"""Drives every method of ProgressDB's published Python SDK (progressdb 0.2.0) against this
server, as an application moving from ProgressDB would: two users, a backend key, the
signing endpoint, and a frontend caller using the signature it gave. Each check compares
what the SDK returns with what was sent; the first failure exits 1 with what differed.
Prints {"checks": N, "methods": [...]} on success.

Environment: PDB_BASE_URL, PDB_BACKEND_KEY, PDB_FRONTEND_KEY, PDB_MARKER (a unique text
put in the messages, which the caller then looks for on disk and in the logs).
"""

import json
import os
import sys
from urllib.parse import quote

import requests
from progressdb import ApiError, ProgressDB

BASE = os.environ["PDB_BASE_URL"]
MARKER = os.environ["PDB_MARKER"]
db = ProgressDB({"baseUrl": BASE, "apiKey": os.environ["PDB_BACKEND_KEY"]})

checks = 0
methods = set()


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


def call(name, *args):
    methods.add(name)
    return getattr(db, name)(*args)


def refused(status, name, *args):
    """The call raises the SDK's ApiError with `status` and a readable message."""
    try:
        got = call(name, *args)
    except ApiError as e:
        check(e.status_code == status, f"{name}{args}: status {e.status_code}, wanted {status}")
        check(isinstance(e.message, str) and e.message and "{" not in e.message,
              f"{name}: the SDK shows no readable message: {e.message!r}")
        return e
    check(False, f"{name}{args} answered {got!r}, wanted {status}")


ALICE = "google-oauth2|1234"  # as an identity provider issues it
BOB = "bob@example.com"

# Probes.
check(call("healthz") == {"status": "ok"}, "healthz")
ready = call("readyz")
check(ready["status"] == "ok" and ready["version"], f"readyz: {ready}")

# Threads.
created = call("create_thread", {"title": "General"}, ALICE)
key = created["key"]
check(created["thread"]["key"] == key and created["thread"]["title"] == "General",
      f"create_thread: {created}")
check(created["thread"]["author"] == ALICE, "author")
check(isinstance(created["thread"]["created_ts"], int)
      and created["thread"]["created_ts"] > 10**18, "created_ts in nanoseconds")
got = call("get_thread", key, ALICE)["thread"]
check(got["title"] == "General" and got["key"] == key, f"get_thread: {got}")
updated = call("update_thread", key, {"title": "Renamed"}, ALICE)
check(updated["thread"]["title"] == "Renamed", f"update_thread: {updated}")
check(call("get_thread", key, ALICE)["thread"]["title"] == "Renamed", "rename kept")
second = call("create_thread", {"title": "Second"}, ALICE)["key"]
listed = call("list_threads", None, ALICE)
check([t["key"] for t in listed["threads"]] == [second, key], f"newest first: {listed}")
check(listed["pagination"]["total"] == 2 and listed["pagination"]["count"] == 2, "totals")
one = call("list_threads", {"limit": 1}, ALICE)
check([t["key"] for t in one["threads"]] == [second] and one["pagination"]["has_after"], "limit")
older = call("list_threads", {"limit": 1, "after": one["pagination"]["after_anchor"]}, ALICE)
check([t["key"] for t in older["threads"]] == [key], f"after: {older}")

# Messages.
msg = call("create_thread_message", key, {"body": {"text": MARKER, "n": 0}}, ALICE)
mkey = msg["key"]
check(msg["message"]["body"] == {"text": MARKER, "n": 0} and msg["message"]["thread"] == key,
      f"create_thread_message: {msg}")
check(call("get_thread_message", key, mkey, ALICE)["message"]["body"]["text"] == MARKER,
      "get_thread_message")
for n in range(1, 6):
    call("create_thread_message", key, {"body": {"text": MARKER, "n": n}}, ALICE)
page = call("list_thread_messages", key, {"limit": 3}, ALICE)
check([m["body"]["n"] for m in page["messages"]] == [3, 4, 5], f"newest window: {page}")
check(page["thread"] == key and page["pagination"]["has_before"]
      and not page["pagination"]["has_after"] and page["pagination"]["total"] == 6, "pagination")
prev = call("list_thread_messages", key,
            {"limit": 3, "before": page["pagination"]["before_anchor"]}, ALICE)
check([m["body"]["n"] for m in prev["messages"]] == [0, 1, 2]
      and not prev["pagination"]["has_before"], f"before: {prev}")
everything = call("list_thread_messages", key, None, ALICE)
check(len(everything["messages"]) == 6, "default page")
edited = call("update_thread_message", key, mkey, {"body": "edited"}, ALICE)
check(edited["message"]["body"] == "edited" and edited["message"]["key"] == mkey,
      f"update_thread_message: {edited}")
check(call("get_thread_message", key, mkey, ALICE)["message"]["body"] == "edited", "edit kept")

# Another user, through the same backend key, reaches nothing of Alice's.
check(call("list_threads", None, BOB)["threads"] == [], "bob lists nothing")
for name, args in [
    ("get_thread", (key, BOB)),
    ("update_thread", (key, {"title": "mine"}, BOB)),
    ("delete_thread", (key, BOB)),
    ("list_thread_messages", (key, None, BOB)),
    ("create_thread_message", (key, {"body": "x"}, BOB)),
    ("get_thread_message", (key, mkey, BOB)),
    ("update_thread_message", (key, mkey, {"body": "x"}, BOB)),
    ("delete_thread_message", (key, mkey, BOB)),
]:
    refused(404, name, *args)
check(call("get_thread_message", key, mkey, ALICE)["message"]["body"] == "edited",
      "bob changed nothing")

# Signing, then a frontend caller (as the TypeScript SDK sends it) with that signature.
signed = call("sign_user", BOB)
check(signed["userId"] == BOB and len(signed["signature"]) == 64, f"sign_user: {signed}")
fe = {"X-API-Key": os.environ["PDB_FRONTEND_KEY"], "X-User-ID": BOB,
      "X-User-Signature": signed["signature"]}
r = requests.post(f"{BASE}/frontend/v1/threads", json={"title": "bob's"}, headers=fe, timeout=10)
check(r.status_code == 202, f"frontend create: {r.status_code} {r.text}")
bobs = r.json()["key"]
r = requests.get(f"{BASE}/frontend/v1/threads/{quote(key, safe='')}", headers=fe, timeout=10)
check(r.status_code == 404, f"frontend bob reads alice's thread: {r.status_code}")
fe["X-User-Signature"] = "0" * 64
r = requests.get(f"{BASE}/frontend/v1/threads", headers=fe, timeout=10)
check(r.status_code == 401 and isinstance(r.json()["error"], str), "forged signature")
check([t["key"] for t in call("list_threads", None, BOB)["threads"]] == [bobs], "bob's own")

# Errors as the SDK shows them.
refused(400, "create_thread", {"title": ""}, ALICE)
refused(404, "get_thread", "no-such-thread", ALICE)

# Deletes answer 204 (the SDK returns None); the thread and its messages are gone.
check(call("delete_thread_message", key, mkey, ALICE) is None, "delete_thread_message")
refused(404, "get_thread_message", key, mkey, ALICE)
check(call("delete_thread", key, ALICE) is None, "delete_thread")
refused(404, "get_thread", key, ALICE)
refused(404, "list_thread_messages", key, None, ALICE)

every = {m for m in dir(db) if not m.startswith("_") and callable(getattr(db, m))}
check(methods == every, f"methods not driven: {sorted(every - methods)}")
print(json.dumps({"checks": checks, "methods": sorted(methods)}))
