"""Laws of signed records, atomic writes and the version cache; each test states one."""
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

import mngr

MAIN_DIR = Path(mngr.__file__).resolve().parent

json_values = st.recursive(
    st.none() | st.booleans() | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(), kids, max_size=3),
    max_leaves=8,
)
payloads = st.builds(
    lambda extra, kind, rid, version: {**extra, "kind": kind, "id": rid, "version": version},
    st.dictionaries(st.text(), json_values, max_size=4),
    st.sampled_from(["host", "agent"]) | st.text(min_size=1),
    st.text(max_size=40),
    st.integers(min_value=0),
)
secrets = st.binary(min_size=32, max_size=32)    # as made by _new_key_entry
keys = st.builds(mngr.SigningKey, st.text(min_size=1, max_size=8), secrets, st.floats(allow_nan=False))
KEY = mngr.SigningKey("k1", b"secret", 0.0)
PAYLOAD = {"kind": "host", "id": "h1", "version": 1}


def ring(*signing_keys):
    return mngr.Keyring(signing_keys)


def same_json(a, b):
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def verify(document, keyring, payload, min_version=0):
    return mngr.verify_document(document, keyring, payload["kind"], payload["id"], min_version)


# Signing ###################################################################


@given(payloads, keys)
def test_signed_payload_verifies_in_memory_and_on_disk(payload, key):
    """What a keyring signs it verifies, unchanged, also after write_json and verify_file."""
    document = mngr.sign_payload(ring(key), payload)
    expected = mngr.Verification(True, "", payload)
    assert verify(document, ring(key), payload, payload["version"]) == expected
    with tempfile.TemporaryDirectory() as tmp:
        mngr.write_json(Path(tmp) / "data.json", document)
        result = mngr.verify_file(Path(tmp) / "data.json", ring(key), payload["kind"], payload["id"])
    assert result.ok and same_json(result.payload, payload)


@given(payloads, keys, st.data())
def test_any_change_to_the_payload_breaks_the_signature(payload, key, data):
    """Adding, changing or removing any key (version included) gives 'bad signature'."""
    document = mngr.sign_payload(ring(key), payload)
    changed = dict(payload)
    how = data.draw(st.sampled_from(["add", "modify", "remove", "version"]))
    if how == "add":
        changed[data.draw(st.text().filter(lambda k: k not in payload))] = data.draw(json_values)
    elif how == "modify":
        name = data.draw(st.sampled_from(sorted(payload)))
        changed[name] = data.draw(json_values.filter(lambda v: not same_json(v, payload[name])))
    elif how == "remove":
        del changed[data.draw(st.sampled_from(sorted(payload)))]
    else:
        changed["version"] = data.draw(st.integers().filter(lambda v: v != payload["version"]))
    document["payload"] = changed
    assert verify(document, ring(key), payload).reason == "bad signature"


@given(payloads, keys, st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
       | st.text() | json_values)
@example(PAYLOAD, KEY, mngr.signature_for(KEY.secret, PAYLOAD).upper())
@example(PAYLOAD, KEY, None)
@example(PAYLOAD, KEY, "\u00e9")      # a host may write any text into its data.json
def test_any_other_signature_is_bad(payload, key, signature):
    """Any other signature (another hex string, any text, any JSON value) gives 'bad signature'."""
    document = mngr.sign_payload(ring(key), payload)
    assume(signature != document["signature"])
    document["signature"] = signature
    assert verify(document, ring(key), payload).reason == "bad signature"


@given(payloads, keys, st.lists(keys, max_size=3), secrets)
def test_foreign_keys_do_not_verify(payload, signer, others, secret):
    """A key id the keyring lacks is 'unknown key'; its id with another secret is 'bad signature'."""
    document = mngr.sign_payload(ring(signer), payload)
    verifier = ring(*[k for k in others if k.id != signer.id])
    assert verify(document, verifier, payload).reason == "unknown key"
    assume(secret != signer.secret)
    impostor = mngr.SigningKey(signer.id, secret, signer.created_at)
    assert verify(document, ring(*verifier.keys, impostor), payload).reason == "bad signature"


@given(payloads, keys, st.integers(min_value=1))
def test_older_than_seen_is_refused(payload, key, ahead):
    """min_version above the payload's version fails with 'older version than seen ...'."""
    document = mngr.sign_payload(ring(key), payload)
    result = verify(document, ring(key), payload, payload["version"] + ahead)
    assert not result.ok and result.reason.startswith("older version than seen")


@given(payloads, keys, st.text(), st.text(min_size=1))
def test_kind_or_id_mismatch_is_wrong_record(payload, key, kind, record_id):
    """Another kind, or another non-empty id, gives 'wrong record'."""
    document = mngr.sign_payload(ring(key), payload)
    if kind != payload["kind"]:
        assert verify(document, ring(key), {**payload, "kind": kind}).reason == "wrong record"
    if record_id != payload["id"]:
        assert verify(document, ring(key), {**payload, "id": record_id}).reason == "wrong record"


@given(st.one_of(json_values.filter(lambda v: not isinstance(v, dict) and v is not None),
                 st.dictionaries(st.text(), json_values).map(lambda d: {**d, "key_id": "k1"})),
       st.none() | st.booleans() | st.floats() | st.text())
def test_missing_and_malformed_documents(document, version):
    """None is 'missing'; a non-dict, a non-dict payload, or a signed non-int version is 'malformed'."""
    assert mngr.verify_document(None, ring(KEY), "host").reason == "missing"
    if not (isinstance(document, dict) and isinstance(document.get("payload"), dict)):
        assert mngr.verify_document(document, ring(KEY), "host").reason == "malformed"
    payload = {**PAYLOAD, "version": version}
    assert verify(mngr.sign_payload(ring(KEY), payload), ring(KEY), payload).reason == "malformed"


@given(payloads, keys, keys)
def test_rotation_verifies_old_and_new(payload, old, new):
    """With keys (old, new), new signs and documents by either verify; dropping old retires its own."""
    assume(old.id != new.id)
    both = ring(old, new)
    assert both.signer() == new
    by_new, by_old = mngr.sign_payload(both, payload), mngr.sign_payload(ring(old), payload)
    assert by_new["key_id"] == new.id
    assert verify(by_new, both, payload).ok and verify(by_old, both, payload).ok
    assert verify(by_old, ring(new), payload).reason == "unknown key"


def not_a_json_object(data: bytes) -> bool:
    try:
        return not isinstance(json.loads(data), dict)
    except ValueError:
        return True


@given(st.binary().filter(not_a_json_object))
@example(b"")
@example(b"\xff\xfe")
@example(b"[]")
@example(b"null")      # the file exists, so it is not 'missing'
def test_garbage_file_is_malformed_and_no_file_is_missing(data):
    """A file whose bytes are not a JSON object is 'malformed'; no file at all is 'missing'."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.json"
        assert mngr.verify_file(path, ring(KEY), "host").reason == "missing"
        path.write_bytes(data)
        assert mngr.verify_file(path, ring(KEY), "host").reason == "malformed"


# atomic_write ##############################################################


@given(st.none() | st.binary(max_size=4096), st.binary(max_size=4096),
       st.sampled_from([0o600, 0o644]), st.sampled_from([None, "fsync", "replace"]),
       st.sampled_from([OSError, KeyboardInterrupt]))
@example(b"old", b"new", 0o600, None, OSError)
@example(b"old", b"new", 0o644, "replace", OSError)
@example(None, b"new", 0o644, "fsync", KeyboardInterrupt)
def test_atomic_write_is_all_or_nothing(old, new, mode, failing_step, error):
    """A write leaves the new bytes (mode no wider than asked); a failed fsync or rename leaves
    the old file and raises. Either way no temp file stays behind."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.json"
        if old is not None:
            path.write_bytes(old)
        before = sorted(os.listdir(tmp))
        if failing_step is None:
            mngr.atomic_write(path, new, mode)
            assert path.read_bytes() == new and os.listdir(tmp) == ["data.json"]
            assert old is not None or path.stat().st_mode & 0o777 & ~mode == 0
            return
        with patch.object(mngr.os, failing_step, side_effect=error), pytest.raises(error):
            mngr.atomic_write(path, new, mode)
        assert sorted(os.listdir(tmp)) == before
        assert old is None or path.read_bytes() == old


CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
import mngr
path, size, version = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
print("ready", flush=True)
while True:
    mngr.atomic_write(path, bytes([version % 256]) * size)
    print(version, flush=True)
    version += 1
"""


def test_atomic_write_survives_sigkill(tmp_path):
    """A writer SIGKILLed at any moment leaves one whole version: the last it reported, or the next."""
    size, path = 50_000_000, tmp_path / "big"
    mngr.atomic_write(path, bytes([0]) * size)
    last, completed, child = 0, 0, None
    try:
        for round_ in range(5):
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(MAIN_DIR), str(path), str(size), str(last + 1)],
                stdout=subprocess.PIPE, text=True)
            assert child.stdout.readline() == "ready\n"
            if round_ % 2:                  # odd rounds kill only after a full write
                last = int(child.stdout.readline())
                completed += 1
            time.sleep(random.uniform(0.0, 0.3))
            child.send_signal(signal.SIGKILL)
            assert child.wait(10) == -signal.SIGKILL
            reported = [int(line) for line in child.stdout.read().split()]
            child.stdout.close()
            completed += len(reported)
            last = reported[-1] if reported else last
            data = path.read_bytes()
            assert len(data) == size, f"torn file: {len(data)} of {size} bytes"
            assert data.count(data[0]) == size, "torn file: bytes of two versions"
            assert data[0] in (last % 256, (last + 1) % 256), "not the last or next version"
            last += data[0] != last % 256       # killed between rename and report
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        for leftover in tmp_path.iterdir():
            leftover.unlink()
    assert completed > 0


# VersionCache ##############################################################

record_ids = st.sampled_from(["h1", "h2", "a1"]) | st.text(min_size=1, max_size=8)
sightings = st.lists(st.tuples(record_ids, st.integers(min_value=0, max_value=10**9)), max_size=20)


def highest(seen):
    best = {}
    for record_id, version in seen:
        best[record_id] = max(version, best.get(record_id, 0))
    return best


@given(sightings, sightings, record_ids)
def test_version_cache_round_trips_and_merges(first, second, other):
    """minimum is the highest version seen (0 if never), before and after save and reload; two
    caches saving one file keep the higher version of each record."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "versions.json"
        caches = mngr.VersionCache(path), mngr.VersionCache(path)
        for cache, seen in zip(caches, (first, second)):
            for record_id, version in seen:
                cache.saw(record_id, version)
            assert all(cache.minimum(r) == highest(seen).get(r, 0) for r in {*highest(seen), other})
        for cache in caches:
            cache.save()
        merged, reloaded = highest(first + second), mngr.VersionCache(path)
        assert all(reloaded.minimum(r) == merged.get(r, 0) for r in {*merged, other})


def test_lost_version_cache_is_never_older_than_seen(tmp_path):
    """With no cache file every minimum is 0, so no validly signed record is 'older than seen'."""
    minimum = mngr.VersionCache(tmp_path / "versions.json").minimum(PAYLOAD["id"])
    assert minimum == 0
    assert verify(mngr.sign_payload(ring(KEY), PAYLOAD), ring(KEY), PAYLOAD, minimum).ok


@given(st.binary() | st.dictionaries(st.text(), json_values).map(lambda d: json.dumps(d).encode()))
@example(b"\xff")
@example(b"[1, 2]")
@example(b'{"h1": "7"}')
def test_unreadable_version_cache_counts_as_lost(data):
    """Whatever the cache file holds, loading never fails, non-versions are ignored, save repairs it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "versions.json"
        path.write_bytes(data)
        cache = mngr.VersionCache(path)
        assert all(isinstance(v, int) for v in cache.seen.values())
        cache.saw("h1", 10**12)
        cache.save()
        assert mngr.VersionCache(path).minimum("h1") == 10**12
