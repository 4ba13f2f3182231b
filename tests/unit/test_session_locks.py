"""A session's turn lock in a real redis-server: renewed while held, freed soon after a crash, fencing saves."""

import subprocess
import sys
import time

import pytest

from moemesh.errors import Aborted
from services.gateway.sessions import SessionState, SessionStore, lock_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

LOCK_TTL_S = 1.0

# Takes the lock, says so, and holds it until killed.
HOLDER = """
import sys, time, redis
from services.gateway.sessions import SessionStore
store = SessionStore(redis.Redis.from_url(sys.argv[1]), 60, float(sys.argv[3]))
with store.turn_lock(sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def stores(redis_server) -> tuple[SessionStore, SessionStore]:
    """Two gateways' session stores on one Redis."""
    return (
        SessionStore(redis_server.client(), 60, LOCK_TTL_S),
        SessionStore(redis_server.client(), 60, LOCK_TTL_S),
    )


def is_free(store: SessionStore, session_id: str) -> bool:
    try:
        with store.turn_lock(session_id):
            return True
    except Aborted:
        return False


def test_a_held_lock_is_renewed_past_its_ttl(stores):
    mine, other = stores
    with mine.turn_lock("long-turn"):
        time.sleep(2.5 * LOCK_TTL_S)
        with pytest.raises(Aborted, match="has a turn in progress"):
            with other.turn_lock("long-turn"):
                pass
    assert is_free(other, "long-turn")


def test_a_crashed_holders_lock_frees_itself_within_its_ttl(stores, redis_server):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_server.url, "crashed", str(LOCK_TTL_S)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        time.sleep(1.5 * LOCK_TTL_S)  # renewed at least once
        assert not is_free(stores[0], "crashed")
    finally:
        holder.kill()
        holder.wait()
    killed = time.monotonic()
    while not is_free(stores[0], "crashed"):
        assert time.monotonic() - killed < LOCK_TTL_S + 0.5, "the lock outlived its TTL"
        time.sleep(0.05)


def test_a_turn_that_lost_its_lock_cannot_save(stores, redis_server):
    mine, other = stores
    state = SessionState("fenced", "me", messages=[{"role": "user", "content": "first"}], token_ids=[1, 2], turns=1)
    with mine.turn_lock("fenced") as lock:
        mine.save(state, lock)
        redis_server.client().delete(lock_key("fenced"))  # as if it had expired while this turn stalled
        with other.turn_lock("fenced") as taken:
            stale = SessionState("fenced", "me", messages=[{"role": "user", "content": "stale"}], turns=2)
            with pytest.raises(Aborted, match="this turn lost its lock on session 'fenced'"):
                mine.save(stale, lock)
            assert other.load("fenced", "me").messages == state.messages
            time.sleep(1.5 * LOCK_TTL_S)  # the stale holder's renewals leave the new holder's lock alone
            assert not is_free(mine, "fenced")
            state.turns = 2
            other.save(state, taken)
    with pytest.raises(Aborted, match="lost its lock"):  # released: no lock, no save
        other.save(state, taken)
    assert other.load("fenced", "me").turns == 2
