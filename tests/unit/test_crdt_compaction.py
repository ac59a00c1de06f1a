"""crdt.compaction: what a compacted document keeps, the merge rules between two replicas'
records, the adoption of another epoch's document (hostile ones refused whole), and two
replicas syncing through an epoch change by crdt.sync sessions alone."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import compaction
from crdt.compaction import adopt, changes_against, compact, compaction_due, merge, oldest_expiring, rebuild
from crdt.document import MeshDocument, SyncError, resolve
from crdt.epoch import ZERO_EPOCH, Epoch, EpochError
from crdt.schema import (AppEdit, AppSiteStatus, AuditRecord, DroppedAudit, NodeSummary, RolloutControl, SignedRecord,
                         SiteSummary)
from crdt.sync import DELTA, EPOCH, FULL, STATE, UPDATE, WANT, Message, SyncSession

DAY = 86400.0
R = 30 * DAY
T0 = 1_800_000_000.0


def audit(site: str, seq: int, ts: float) -> AuditRecord:
    return AuditRecord(audit_id=f"{site}/{seq}", ts=ts, actor="ops", action="deploy", target="web", site=site)


def edit(edit_id: str, version: int, base: str, ts: float, app: str = "web", site: str = "a") -> AppEdit:
    return AppEdit(edit_id=edit_id, app=app, version=version, base=base, site=site, actor="ops", ts=ts,
                   spec=f'[app]\nname = "{app}"\n', targets=(site,), replicas=1)


def status(site: str, ts: float, running: int = 1) -> AppSiteStatus:
    return AppSiteStatus(app="web", site=site, edit_id="e1", version=1, desired=1, running=running, ts=ts)


def summary(site: str, ts: float, nodes: int = 3) -> SiteSummary:
    return SiteSummary(site=site, nodes=nodes, ready=nodes, leader="n1", addresses=("198.18.0.1:7700",), ts=ts)


def signed(key: str, serial: int, ts: float) -> SignedRecord:
    return SignedRecord(key=key, kind="revocation", serial=serial, body="{}", site="a", ts=ts)


def keys(records) -> set[tuple[str, str]]:
    return {(r.ROOT, r.key) for r in records}


def epoch(generation: int, fill: int) -> Epoch:
    return Epoch(generation, bytes([fill]) * 16)


# --- what compaction keeps -------------------------------------------------------------------


def test_audit_older_than_the_retention_goes_oldest_first_and_is_summed_up_per_site():
    now = T0 + 100 * DAY
    records = [audit("a", n, T0 + n * DAY) for n in range(1, 101)] + [audit("b", 1, T0)]
    kept = compact(records, now, R)
    a_left = sorted(int(r.audit_id.split("/")[1]) for r in kept.records if isinstance(r, AuditRecord)
                    and r.site == "a")
    assert a_left == list(range(70, 101))  # ts >= now - 30 days
    assert kept.summaries["a"] == DroppedAudit(site="a", upto_seq=69, count=69, first_ts=T0 + DAY,
                                               last_ts=T0 + 69 * DAY)
    # b's only record is its newest: it stays (the site's leader republishes from the newest back)
    assert ("audit", "b/1") in keys(kept.records) and "b" not in kept.summaries
    assert kept.dropped_audit == 69


def test_a_second_compaction_adds_to_the_summary_and_never_counts_a_record_twice():
    records = [audit("a", n, T0 + n * DAY) for n in range(1, 41)]
    first = compact(records, T0 + 35 * DAY, R)  # drops a/1..a/4
    assert first.summaries["a"].count == 4
    # a peer that was away still holds a/1..a/10; they come back in a merge
    second = merge(first.records, records[:10], T0 + 38 * DAY, R)  # drops up to a/7
    dropped = second.by_key()[("audit_dropped", "a")]
    assert (dropped.upto_seq, dropped.count, dropped.first_ts) == (7, 7, T0 + DAY)
    assert not any(isinstance(r, AuditRecord) and int(r.audit_id.split("/")[1]) <= 7 for r in second.records)


def test_every_apps_winner_stays_and_other_edits_stay_only_within_the_retention():
    now = T0 + 100 * DAY
    chain = [edit("e1", 1, "", T0), edit("e2", 2, "e1", T0 + 10 * DAY), edit("e3", 3, "e2", T0 + 80 * DAY)]
    loser = edit("x2", 2, "e1", T0 + 11 * DAY, site="b")  # lost to e2 long ago
    recent_loser = edit("y4", 3, "e2", T0 + 79 * DAY, site="b")
    lonely = edit("s1", 1, "", T0, app="old-app")  # the only edit of an app: its winner
    kept = compact(chain + [loser, recent_loser, lonely], now, R)
    assert keys(kept.records) == {("app_edits", k) for k in ("e3", "y4", "s1")}
    assert kept.dropped_edits == 3
    before, after = resolve(chain + [loser, recent_loser]), resolve([r for r in kept.records if r.app == "web"])
    assert after.winner == before.winner
    assert [e.edit_id for e in after.losers] == ["y4"]  # the recent conflict is still reported


def test_a_rollout_control_stays_with_its_edit_the_newest_of_one_key_wins_and_goes_with_it():
    now = T0 + 100 * DAY
    chain = [edit("e1", 1, "", T0), edit("e2", 2, "e1", T0 + 80 * DAY)]
    old = RolloutControl(app="web", edit_id="e1", site="a", action="pause", ts=T0 + 1, actor="ops")
    paused = RolloutControl(app="web", edit_id="e2", site="a", action="pause", ts=T0 + 81 * DAY, actor="ops")
    resumed = RolloutControl(app="web", edit_id="e2", site="a", action="resume", ts=T0 + 82 * DAY, actor="ops")
    cancel = RolloutControl(app="web", edit_id="e2", site="b", action="cancel", ts=T0 + 81 * DAY, actor="ops")
    assert paused.key == resumed.key != cancel.key
    kept = compact(chain + [old, paused, resumed, cancel], now, R)
    controls = [r for r in kept.records if isinstance(r, RolloutControl)]
    assert sorted(controls, key=lambda c: c.key) == sorted([resumed, cancel], key=lambda c: c.key)


def test_an_ancestor_a_late_peer_still_holds_is_not_taken_for_a_lost_conflict():
    # a made e2 and e3 on top of e1 while b, cut off, still had e1 as the winner
    a_side = [edit("e1", 1, "", T0), edit("e2", 2, "e1", T0 + DAY), edit("e3", 3, "e2", T0 + 2 * DAY)]
    compacted = compact(a_side, T0 + 3 * DAY, R)  # within the retention: the chain stays
    merged = merge(compacted.records, [edit("e1", 1, "", T0)], T0 + 3 * DAY, R)
    assert resolve([r for r in merged.records if isinstance(r, AppEdit)]).losers == ()


def test_statuses_and_summaries_keep_the_newest_and_signed_records_all_stay():
    now = T0 + 400 * DAY
    records = [edit("e1", 1, "", T0), status("a", T0), summary("a", T0), signed("revocation/x", 1, T0),
               signed("policy/1/ab", 1, T0)]
    kept = compact(records, now, R)  # all of them a year old: none is dropped for age
    assert keys(kept.records) == keys(records)
    merged = merge([edit("e1", 1, "", T0), status("a", T0 + 5, running=0)], [status("a", T0 + 9, running=2)],
                   now, R)
    assert merged.records == (edit("e1", 1, "", T0), status("a", T0 + 9, running=2))


def stop(edit_id: str, version: int, base: str, ts: float, app: str = "web") -> AppEdit:
    return AppEdit(edit_id=edit_id, app=app, version=version, base=base, site="a", actor="ops", ts=ts, spec="",
                   targets=(), replicas=0, stopped=True)


def test_a_stopped_app_is_forgotten_two_retentions_after_its_stop():
    deploy, update = edit("e1", 1, "", T0), edit("e2", 2, "e1", T0 + DAY)
    loser = edit("x2", 2, "e1", T0 + 2 * DAY, site="b")  # lost to e2, made after it
    stopped = stop("e3", 3, "e2", T0 + 3 * DAY)
    records = [deploy, update, loser, stopped, status("a", T0 + 3 * DAY, running=0), status("b", T0 + 4 * DAY, 0)]
    # within the retention: everything stays
    assert keys(compact(records, T0 + 10 * DAY, R).records) == keys(records)
    # past one retention: the stop stands for the app, its statuses still say where it was
    once = compact(records, T0 + 3 * DAY + R + 1, R)
    assert keys(once.records) == {("app_edits", "e3"), ("app_status", "web@a"), ("app_status", "web@b")}
    assert once.forgotten_apps == ()
    # past two: nothing of it is left, and it says so
    twice = compact(records, T0 + 3 * DAY + 2 * R + 1, R)
    assert twice.records == () and twice.forgotten_apps == ("web",)
    assert (twice.dropped_edits, twice.dropped_statuses) == (4, 2)
    # an app redeployed after its stop is never forgotten for that stop
    again = edit("e4", 4, "e3", T0 + 5 * DAY)
    assert again in compact(records + [again], T0 + 400 * DAY, R).records
    # a running app's deploy, however old, is its winner and stays
    assert compact([deploy], T0 + 4000 * DAY, R).records == (deploy,)


def test_a_peer_away_less_than_two_retentions_cannot_bring_a_stopped_app_back():
    deploy, stopped = edit("e1", 1, "", T0), stop("e2", 2, "e1", T0 + DAY)
    now = T0 + DAY + R + 5 * DAY  # the stop is older than the retention, not than two
    ours = compact([deploy, stopped], now, R).records
    assert ours == (stopped,)
    merged = merge(ours, [deploy, status("b", T0, running=1)], now, R)  # b was away since before the stop
    assert merged.records == (stopped, status("b", T0, running=1))
    assert resolve([r for r in merged.records if isinstance(r, AppEdit)]).winner == stopped
    # ... and a status a site publishes late goes with the app
    later = T0 + DAY + 2 * R + 1
    assert compact(ours, later, R).records == () and merge(ours, [status("b", later - 10, 0)], later, R).records == ()


def test_a_stopped_winner_makes_a_compaction_due_when_it_is_two_retentions_old():
    deploy, stopped = edit("e1", 1, "", T0), stop("e2", 2, "e1", T0 + DAY)
    assert oldest_expiring([stopped], retention=R) == T0 + DAY + R  # it goes one retention later than an edit
    assert oldest_expiring([deploy, stopped], retention=R) == T0  # the superseded deploy goes first
    oldest = oldest_expiring([stopped], retention=R)
    for now, due in ((T0 + DAY + 2 * R, False), (T0 + DAY + 2 * R + compaction.expiry_slack(R) + 1, True)):
        assert bool(compaction_due(now=now, retention=R, grown=0, base=0, oldest=oldest)) == due
        assert bool(compact([stopped], now, R).forgotten_apps) == (now > T0 + DAY + 2 * R)  # and then it goes


def test_two_records_of_one_key_and_one_time_stamp_resolve_the_same_both_ways():
    one, other = summary("a", T0, nodes=3), summary("a", T0, nodes=4)
    assert compaction.newer(one, other) == compaction.newer(other, one)
    forged = signed("revocation/x", 1, T0), SignedRecord(key="revocation/x", kind="revocation", serial=2,
                                                        body="{}", site="b", ts=T0 - 5)
    assert compaction.newer(*forged) == compaction.newer(*reversed(forged)) == forged[1]  # the higher serial


def edit_number(i: int) -> AppEdit:
    """The edit e<i>: its content a function of its id, as real edit ids (uuids) are."""
    return edit(f"e{i}", 1 + i % 6, f"e{(i * 7) % 13}" if i % 3 else "", T0 + ((i * 5) % 61) * DAY)


# Records as replicas hold them: an audit record or an edit has one content wherever it is
# (written once under its own key; audit time stamps rise with seq), overwritten records differ.
records_strategy = st.lists(st.one_of(
    st.builds(lambda s, n: audit(s, n, T0 + n * 2 * DAY), st.sampled_from("ab"), st.integers(1, 30)),
    st.builds(edit_number, st.integers(1, 12)),
    st.builds(lambda s, d, r: status(s, T0 + d * DAY, r), st.sampled_from("ab"), st.integers(0, 60),
              st.integers(0, 3)),
    st.builds(lambda s, d, n: summary(s, T0 + d * DAY, n), st.sampled_from("ab"), st.integers(0, 60),
              st.integers(1, 4)),
), max_size=40)


# ... and as a hostile writer could make them: one key, different contents on each side.
arbitrary_strategy = st.lists(st.one_of(
    st.builds(lambda s, n, d: audit(s, n, T0 + d * DAY), st.sampled_from("ab"), st.integers(1, 30),
              st.integers(0, 60)),
    st.builds(lambda i, v, b, d: edit(f"e{i}", v, f"e{b}" if b else "", T0 + d * DAY),
              st.integers(1, 12), st.integers(1, 6), st.integers(0, 12), st.integers(0, 60)),
    st.builds(lambda i, v, d: stop(f"e{i}", v, "", T0 + d * DAY), st.integers(1, 12), st.integers(1, 6),
              st.integers(0, 60)),
), max_size=40)


@settings(max_examples=150, deadline=None)
@given(st.one_of(records_strategy, arbitrary_strategy), st.one_of(records_strategy, arbitrary_strategy),
       st.integers(0, 130))
def test_merge_is_symmetric_idempotent_and_keeps_every_winner(ours, theirs, day):
    now = T0 + day * DAY
    ab, ba = merge(ours, theirs, now, R), merge(theirs, ours, now, R)
    assert ab.records == ba.records
    assert compact(ab.records, now, R).records == ab.records
    edits = [r for r in compaction.union(ours, theirs).values() if isinstance(r, AppEdit)]
    for app in {e.app for e in edits}:
        winner = resolve([e for e in edits if e.app == app]).winner
        forget = winner.stopped and winner.ts < now - compaction.FORGET_AFTER_RETENTIONS * R
        assert (winner not in ab.records) == forget == (app in ab.forgotten_apps)


def replica_records(others: list, upto_a: int, upto_b: int) -> list:
    """A replica's records: each site's audit as far as it heard (a site publishes its audit
    in order, and sync delivers it whole), and other records."""
    audits = [audit(site, n, T0 + n * 2 * DAY) for site, upto in (("a", upto_a), ("b", upto_b))
              for n in range(1, upto + 1)]
    return [r for r in others if not isinstance(r, AuditRecord)] + audits


replica_strategy = st.builds(replica_records, records_strategy, st.integers(0, 30), st.integers(0, 30))


@settings(max_examples=100, deadline=None)
@given(replica_strategy, replica_strategy, st.integers(0, 90))
def test_merging_in_steps_or_at_once_ends_with_the_same_records(first, second, day):
    """Compacting each replica first and merging then, or merging everything at once, keeps
    the same records and counts the same drops. (The count is exact for replicas as they are:
    each site's audit heard in order. A replica holding a site's record n+1 without record n,
    which sync never makes, would not count n when another replica's summary covers it.)"""
    now = T0 + day * DAY
    stepwise = merge(compact(first, now, R).records, compact(second, now, R).records, now, R)
    assert stepwise.records == merge(first, second, now, R).records


def test_changes_against_turn_one_record_set_into_the_other():
    have = [status("a", T0), audit("a", 1, T0), audit("a", 2, T0)]
    want = compact([status("a", T0 + 1), audit("a", 2, T0), audit("a", 3, T0 + 1)], T0 + 1, R)
    puts, deletes = changes_against(want, have)
    assert {(r.ROOT, r.key) for r in puts} == {("app_status", "web@a"), ("audit", "a/3")}
    assert deletes == [("audit", "a/1")]


def test_compaction_is_due_for_history_or_for_records_well_past_the_retention():
    now = T0 + 100 * DAY
    assert compaction_due(now=now, retention=R, grown=0, base=0, oldest=None) is None
    assert compaction_due(now=now, retention=R, grown=compaction.HISTORY_MIN_BYTES, base=1000, oldest=None)
    assert compaction_due(now=now, retention=R, grown=5_000_000, base=8_000_000, oldest=None) is None
    just_past = now - R - 1  # within the slack: not yet worth a full transfer to every peer
    assert compaction_due(now=now, retention=R, grown=0, base=0, oldest=just_past) is None
    assert "retention" in compaction_due(now=now, retention=R, grown=0, base=0, oldest=now - R - 4 * DAY)
    # a site's newest audit record and every app's winner never count
    assert oldest_expiring([audit("a", 1, T0), edit("e1", 1, "", T0)], retention=R) is None
    assert oldest_expiring([audit("a", 1, T0), audit("a", 2, T0 + 5)], retention=R) == T0


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        compact([], float("nan"), R)
    with pytest.raises(ValueError):
        compact([], T0, -1.0)
    with pytest.raises(EpochError):
        Epoch(-1, bytes(16))
    with pytest.raises(EpochError):
        Epoch.decode(b"short")


# --- adoption of another epoch's document -----------------------------------------------------


def test_adoption_merges_our_records_into_their_document():
    theirs, _ = rebuild([status("a", T0 + 10), audit("a", 1, T0)], now=T0 + 10, retention=R, client_id=1,
                        epoch=epoch(1, 1))
    ours = [status("a", T0 + 20, running=3), audit("b", 1, T0 + 5), status("b", T0)]
    taken = adopt(ours, theirs.full_update(), epoch=epoch(1, 1), now=T0 + 30, retention=R, client_id=2)
    assert taken.document.epoch == epoch(1, 1)
    assert set(taken.document.all_records()) == set(merge(ours, theirs.all_records(), T0 + 30, R).records)
    assert taken.written == 3 and taken.removed == 0
    theirs.apply(taken.update)  # what the merge wrote brings the other replica to the same records
    assert set(theirs.all_records()) == set(taken.document.all_records())


def hostile_documents() -> list[tuple[bytes, str]]:
    junk = MeshDocument(client_id=3)
    junk.doc.get("audit", type=__import__("pycrdt").Map)["x/1"] = '{"audit_id": 5}'
    wrong_key = MeshDocument(client_id=4)
    wrong_key.doc.get("sites", type=__import__("pycrdt").Map)["a"] = compaction.record_text(summary("b", T0))
    return [(b"\x05\x80\x80\x80\x7f", "malformed update"),
            (junk.full_update(), "malformed entries"),
            (wrong_key.full_update(), "not under its own key"),
            (b"\x00" * (33 * 1024 * 1024), "over the")]


@pytest.mark.parametrize("full_update, reason", hostile_documents())
def test_a_hostile_whole_document_is_refused_whole(full_update, reason):
    ours = [status("a", T0), audit("a", 1, T0)]
    with pytest.raises(SyncError, match=reason):
        adopt(ours, full_update, epoch=epoch(5, 9), now=T0, retention=R, client_id=7)


def test_a_hostile_whole_document_in_a_session_leaves_the_replica_unchanged():
    mine = MeshDocument(client_id=1)
    mine.put_many([status("a", T0), audit("a", 1, T0)])
    before_state, before_records = mine.state_vector(), mine.all_records()
    session = SyncSession(mine, "peer")
    session.open()
    hostile = epoch(9, 9)
    replies, _ = session.receive(Message(EPOCH, hostile.encode()), now=1.0)
    assert [(m.type, m.payload) for m in replies] == [(WANT, hostile.encode())]
    assert session.receive(Message(FULL, hostile.encode() + hostile_documents()[1][0]), now=1.0) == ([], None)
    adoption = session.take_adoption()
    assert adoption is not None and adoption[0] == hostile
    with pytest.raises(SyncError):
        adopt(mine.all_records(), adoption[1], epoch=adoption[0], now=T0, retention=R, client_id=2)
    assert mine.state_vector() == before_state and mine.all_records() == before_records
    assert mine.epoch == ZERO_EPOCH


def test_a_whole_document_is_taken_only_when_asked_for_and_a_refused_epoch_is_never_asked_again():
    mine = MeshDocument(client_id=1)
    session = SyncSession(mine, "peer", refused={epoch(3, 3)}.__contains__)
    unasked = epoch(2, 2)
    assert session.receive(Message(FULL, unasked.encode() + b"\x00\x00"), now=1.0) == ([], None)
    assert session.take_adoption() is None and session.ignored == 1
    assert session.receive(Message(EPOCH, epoch(3, 3).encode()), now=1.0) == ([], None)  # refused before
    replies, _ = session.receive(Message(EPOCH, epoch(4, 4).encode()), now=1.0)
    assert [m.type for m in replies] == [WANT]
    assert session.receive(Message(EPOCH, epoch(4, 4).encode()), now=1.0) == ([], None)  # asked once
    # and a STATE between different epochs is answered with an empty delta, not a document
    replies, _ = session.receive(Message(STATE, b""), now=1.0)
    assert [(m.type, m.payload) for m in replies] == [(DELTA, b"\x00\x00")]


@pytest.mark.parametrize("payload", [b"", b"\x00" * 23, b"\xff" * 8 + b"\x00" * 16])
def test_a_malformed_epoch_message_is_refused(payload):
    session = SyncSession(MeshDocument(), "peer")
    for kind in (EPOCH, WANT):
        with pytest.raises(SyncError, match="malformed"):
            session.receive(Message(kind, payload), now=1.0)


# --- two replicas through an epoch change, by sessions alone ----------------------------------


class Replica:
    """A replica as the I/O layer runs one, without I/O: a document, and adoption by crdt.compaction."""

    def __init__(self, name: str, client_id: int) -> None:
        self.name, self.client_id = name, client_id
        self.document = MeshDocument(client_id=client_id)

    def compact(self, now: float, fill: int) -> None:
        self.client_id += 100
        self.document, _ = rebuild(self.document.all_records(), now=now, retention=R, client_id=self.client_id,
                                   epoch=self.document.epoch.successor(bytes([fill]) * 16))


def pump(a: Replica, b: Replica, now: float, rounds: int = 20) -> int:
    """Run one session pair until quiet; adoptions as docsync does them. Returns messages sent."""
    sa, sb = SyncSession(a.document, b.name), SyncSession(b.document, a.name)
    queues = {id(sa): sa.open(), id(sb): sb.open()}  # what each side has sent, not yet taken
    sent = 0
    for _ in range(rounds):
        moved = False
        for me, other, replica in ((sa, sb, a), (sb, sa, b)):
            inbox, queues[id(other)] = queues[id(other)], []
            for message in inbox:
                sent += 1
                replies, update = me.receive(message, now=1.0)
                queues[id(me)] += replies
                if update is not None:
                    moved = True
                adoption = me.take_adoption()
                if adoption is not None:
                    replica.client_id += 100
                    taken = adopt(replica.document.all_records(), adoption[1], epoch=adoption[0], now=now,
                                  retention=R, client_id=replica.client_id)
                    replica.document = taken.document
                    queues[id(me)] += me.switched(taken.document)
                    if taken.update is not None:
                        queues[id(me)] += me.push(taken.update)
                    moved = True
        if not moved and not queues[id(sa)] and not queues[id(sb)]:
            break
    return sent


@pytest.mark.parametrize("both_compact", [False, True])
def test_two_replicas_of_different_epochs_end_on_one_epoch_with_the_same_records(both_compact):
    a, b = Replica("a", 1), Replica("b", 2)
    a.document.put_many([audit("a", n, T0 + n * DAY) for n in range(1, 11)] + [status("a", T0)])
    pump(a, b, T0)
    assert set(a.document.all_records()) == set(b.document.all_records())
    now = T0 + 45 * DAY  # b away for 45 days, writing
    b.document.put_many([audit("b", n, T0 + n * DAY) for n in range(1, 21)] + [status("b", now)])
    a.document.put_many([audit("a", 11, now), status("a", now, running=0)])
    a.compact(now, fill=1)
    if both_compact:
        b.compact(now, fill=2)
    pump(a, b, now)
    assert a.document.epoch == b.document.epoch == max(a.document.epoch, b.document.epoch)
    assert set(a.document.all_records()) == set(b.document.all_records())
    records = {(r.ROOT, r.key): r for r in a.document.all_records()}
    assert records[("app_status", "web@a")].running == 0 and ("app_status", "web@b") in records
    assert records[("audit_dropped", "a")].count == 10  # a/1..a/10 are more than 30 days old
    # what b wrote while away more than 30 days ago is past the retention too, the rest is there
    assert records[("audit_dropped", "b")] == DroppedAudit(site="b", upto_seq=14, count=14, first_ts=T0 + DAY,
                                                           last_ts=T0 + 14 * DAY)
    assert {k for k in records if k[0] == "audit"} == (
        {("audit", "a/11")} | {("audit", f"b/{n}") for n in range(15, 21)})
    # and the sessions of the common epoch exchange deltas again
    a.document.put(audit("a", 12, now + 1))
    pump(a, b, now + 1)
    assert ("audit", "a/12") in keys(b.document.all_records())


def test_a_replica_of_epoch_zero_and_a_compacted_one_speak_epoch_messages_only_when_needed():
    plain = SyncSession(MeshDocument(), "peer")
    assert [m.type for m in plain.open()] == [STATE]  # as before epochs: older peers understand it
    compacted_doc, _ = rebuild([], now=T0, retention=R, client_id=5, epoch=epoch(1, 1))
    compacted = SyncSession(compacted_doc, "peer")
    assert [m.type for m in compacted.open()] == [EPOCH, STATE]
    assert compacted.push(b"\x00\x00") == []  # its peer's epoch is not known yet: nothing is pushed
    compacted.receive(Message(STATE, MeshDocument().state_vector()), now=1.0)  # a peer of epoch 0
    assert compacted.peer_epoch == ZERO_EPOCH
    assert compacted.push(b"\x00\x00") == []  # it cannot apply our updates
    assert compacted.receive(Message(UPDATE, b"\x00\x00"), now=1.0) == ([], None) and compacted.ignored == 1


def test_the_expiry_slack_is_a_tenth_of_a_long_retention_an_hour_of_a_shorter_one_and_no_more_than_a_short_one():
    assert compaction.expiry_slack(30 * DAY) == 3 * DAY
    assert compaction.expiry_slack(DAY) == 0.1 * DAY
    assert compaction.expiry_slack(6 * 3600.0) == 3600.0
    assert compaction.expiry_slack(300.0) == 300.0  # minutes of history: minutes of slack
