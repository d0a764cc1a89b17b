"""PostgreSQL claim: a read-only snapshot statement (cached between claims, see
scheduler.claim_cache) and one statement that leases the planned jobs (FOR UPDATE SKIP
LOCKED) and updates the summary, fair-share and worker rows (both in scheduler.queries). Both
run on the bare psycopg cursor (prepared; rows as plain tuples, decoded here by column name):
SQLAlchemy's compile and row layers cost more client time than the server spends on them."""
from __future__ import annotations

import json
from typing import NamedTuple

from lorry.scheduler import queries
from lorry.scheduler.claim_cache import GENERATION, ClaimSnapshot
from lorry.scheduler.db import epoch_seconds
from lorry.scheduler.policy import Group
from lorry.scheduler.types import AdapterInfo, ClaimedJob

HEARTBEAT_REFRESH_S = 5.0  # a claim rewrites an unchanged worker row at most this often
# Columns of the claim statement that decode_claim reads, and the adapter's (AdapterInfo's
# fields, in its order).
_CLAIM_COLUMNS = ("id", "tenant_id", "adapter_id", "adapter_name", "prompt", "messages",
                  "sampling", "attempts", "priority", "enqueued_at", "a_id", "report")
_ADAPTER_COLUMNS = ("a_id", "a_name", "a_source", "a_revision", "a_tenant_id", "a_rank",
                    "a_status", "a_base_model", "a_created_at")


class Rows(NamedTuple):
    """A statement's rows (plain tuples: the cheapest to fetch) and where each named column
    is in them."""

    rows: list[tuple]
    at: dict[str, int]  # column name -> position


NO_ROWS = Rows([], {})


def fetch(cur) -> Rows:
    """The rows of the statement the cursor just ran, with its columns' positions by name."""
    res = cur.pgresult
    return Rows(cur.fetchall(), {res.fname(i).decode(): i for i in range(res.nfields)})


def claim_rows(cur, wants, total, *, now, worker_id, token, expires, floor, touch, hot,
               warm, unseen: dict) -> Rows:
    """Lease up to total jobs from the wanted (group, count) pairs, in their order (and
    rewrite the worker row when touch); returns the claimed jobs' rows (columns: see
    queries.CLAIM_JOBS_PG; decode them with decode_claim). Nothing is leased when a group
    matches unseen (since, known, top: see ClaimSnapshot.unseen_filter). cur: a psycopg
    cursor (autocommit) from Connector.claim_session."""
    cur.execute(queries.CLAIM_JOBS_PG, {
        "tenants": [g.tenant_id for g, _ in wants], "adapters": [g.adapter_id for g, _ in wants],
        "priorities": [g.priority for g, _ in wants], "counts": [n for _, n in wants],
        "total": total, "token": token, "expires": expires, "floor": floor, "touch": touch,
        "worker": worker_id, "now": now, "hot": json.dumps(hot), "warm": json.dumps(warm),
        **unseen}, prepare=True)
    return fetch(cur)


def touch_worker(cur, worker_id, now, hot, warm) -> None:
    """Record the worker's caches and heartbeat (a claim that leased nothing)."""
    cur.execute(queries.TOUCH_WORKER_PG, {"worker": worker_id, "now": now,
                                          "hot": json.dumps(hot), "warm": json.dumps(warm)})


def decode_claim(claim: Rows, token: str, wants: list) -> tuple[dict, dict, dict, list]:
    """From the claim statement's rows: the claimed jobs by adapter id in the plan's order
    (wants), oldest first within a group; the jobs claimed per group key; the claimed
    adapters' rows by id; the statement's report [groups, served] (see ClaimSnapshot.apply)."""
    (id_, tenant, adapter, name, prompt, messages, sampling_, attempts, priority, enqueued,
     a_id, report) = (claim.at[c] for c in _CLAIM_COLUMNS)
    adapter_at = [claim.at[c] for c in _ADAPTER_COLUMNS]
    claimed: dict[int, list[ClaimedJob]] = {}
    got: dict[tuple, int] = {}
    infos: dict[int, AdapterInfo] = {}
    decoded: dict[str, dict] = {}
    place = {g.key: i for i, (g, _) in enumerate(wants)}
    end = len(place)
    for r in sorted(claim.rows, key=lambda r: (place.get((r[tenant], r[adapter], r[priority]),
                                                         end), r[enqueued])):
        sampling = decoded.get(r[sampling_])
        if sampling is None:
            text = r[sampling_]
            sampling = decoded[text] = json.loads(text) if text is not None else {}
        # ClaimedJob's fields in order: id, lease_token, tenant_id, adapter, prompt,
        # messages, sampling, attempts.
        claimed.setdefault(r[adapter], []).append(ClaimedJob(
            r[id_], token, r[tenant], r[name], r[prompt], r[messages], dict(sampling),
            r[attempts]))
        key = (r[tenant], r[adapter], r[priority])
        got[key] = got.get(key, 0) + 1
        if r[a_id] is not None and r[a_id] not in infos:
            infos[r[a_id]] = AdapterInfo(*[r[i] for i in adapter_at])
    return claimed, got, infos, json.loads(claim.rows[0][report]) if claim.rows else [None, None]


def read_snapshot(cur, worker_id, hot, warm, *, now, live_after, overdue, by_priority,
                  mono) -> ClaimSnapshot:
    """The snapshot (PER_TENANT is 1 here: DISTINCT ON keeps one group per tenant). hot,
    warm: the worker's adapters as AdapterInfo ids."""
    hot_ids, warm_ids = list(hot or ()), list(warm or ())
    generation = GENERATION[0]  # before reading: a write racing the read forces a refresh
    cur.execute(queries.CLAIM_SNAPSHOT_PG, {
        "hot_ids": hot_ids, "warm_ids": warm_ids, "worker": worker_id,
        "live_after": live_after, "overdue": overdue, "by_priority": by_priority},
        prepare=True)
    snapshot = fetch(cur)
    groups, weights, served = _candidates(snapshot, epoch_seconds(now) + 1e9)
    first = {c: snapshot.rows[0][i] for c, i in snapshot.at.items()}  # the worker's, by name
    written = None if first["me_beat"] is None else (json.loads(first["me_hot"] or "[]"),
                                                     json.loads(first["me_warm"] or "[]"),
                                                     first["me_beat"])
    hot_list, warm_list = list(first["hot"]), list(first["warm"])
    others = json.loads(first["others"] or "[]")  # one hot list per other live worker
    return ClaimSnapshot(
        groups=groups, weights=weights, served=served, known=f",{','.join(weights)},",
        top=max((g.priority for g in groups.values()), default=-(2 ** 31)),
        others={x for lst in others for x in lst or [] if isinstance(x, int)},
        workers=1 + len(others), capacity=first["me_capacity"] or 0,
        refs=(tuple(hot or ()), tuple(warm or ())), hot=hot_list, warm=warm_list,
        written=written, read_at=now, read_mono=mono, generation=generation,
        read_at_epoch=epoch_seconds(now),
        existing=set(hot_list) | set(warm_list), requested=set(hot_ids) | set(warm_ids))


def _candidates(snapshot: Rows, far: float) -> tuple[dict, dict, dict]:
    """The snapshot's groups by key, and their tenants' weights and fair-share counters
    (``far``: the time given as oldest to a group whose oldest job is not known)."""
    tenant, adapter, priority, queued, oldest, weight, served_ = (snapshot.at[c] for c in (
        "tenant_id", "adapter_id", "priority", "queued_count", "oldest_enqueued_at", "weight",
        "served"))
    groups, weights, served = {}, {}, {}
    for r in snapshot.rows:
        t = r[tenant]
        if t is None:
            continue  # nothing queued: the one row with NULL group columns
        g = Group(t, r[adapter], r[priority], r[queued],
                  epoch_seconds(r[oldest]) if r[oldest] is not None else far)
        groups[g.key] = g
        weights[t], served[t] = r[weight], r[served_]
    return groups, weights, served
