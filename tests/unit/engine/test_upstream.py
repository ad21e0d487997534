"""Upgrades are deliberate: a test fails when upstream code we lean on changes.

The engine overrides Faust, mode and aiokafka code, copies some of it (changed), and
reaches into private attributes and methods no changelog promises to keep. An upgrade
that changes any of them must not pass unnoticed, even within the versions
``pyproject.toml`` allows. :data:`PINS` lists each such place: the upstream object,
the sha256 of its source (``inspect.getsource``) at the versions in :data:`PINNED`,
what our code does with it, and the tests that prove our side. For a private
*attribute*, the pin is the upstream function that creates or maintains it (said so in
its entry). When a digest no longer matches, the test names our code and the tests
to run.

To take an upgrade:

1. Bump :data:`PINNED` and run this file: every pin whose source changed fails, and
   says which of our code to look at and which tests prove it.
2. For each, compare the new upstream source with the one at the old version and port
   the change to our override or copy (or drop the override, if upstream now does it
   right); for a reliance, check that what the entry says still holds.
3. Run the tests the failure names (``tests/integration`` needs the Kafka stack:
   ``make stack-up``, or ``make test`` for everything).
4. Print the new digest and paste it in the entry::

       python -c "import tests.unit.engine.test_upstream as t; print(t.digest('NAME'))"

Not pinned on purpose: the group coordinator's ``member_id`` (the commit log line reads it
with ``getattr``, falling back to ``?``), and public API except where an entry says why.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import re
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from mode.services import ServiceTask

ROOT = Path(__file__).resolve().parents[3]

#: The versions the digests in :data:`PINS` were taken at.
PINNED = {"faust-streaming": "0.15.3", "mode-streaming": "0.7.1", "aiokafka": "0.14.0"}
#: The distribution each top-level package comes from.
DISTRIBUTION = {"faust": "faust-streaming", "mode": "mode-streaming", "aiokafka": "aiokafka"}

OVERRIDES = "overrides"
COPIES = "copies"
RELIES = "relies on"


class Pin(NamedTuple):
    #: where it is defined: ``package.module.Class.attr``, or ``package/file`` for a
    #: source file with no Python objects (the Cython stream iterator)
    upstream: str
    #: sha256 of its source at :data:`PINNED`
    sha256: str
    kind: str
    #: our code involved, ``module:Qualname`` (shown as the file and class it is defined in)
    ours: tuple[str, ...]
    #: what our override corrects, what our copy changes, or why we rely on it
    why: str
    #: names of the tests (anywhere under tests/) that prove our side
    proofs: tuple[str, ...]


SC = "app.engine.consumer:StrictConsumer"
STORE = "app.engine.store:RocksStore"
FLOW = "app.engine.fetching:KeepingFlowControl"
PACE = "app.engine.fetching:FetchPace"

PINS: tuple[Pin, ...] = (
    # -- faust.transport.consumer: the commit rule ---------------------------------------
    Pin(
        "faust.transport.consumer.Consumer.__init__",
        "302410d59e6972d144e35ce91483b28783e01fd039f02a51f0b06c6d3953a001",
        RELIES,
        (
            f"{SC}._new_offset",
            f"{SC}.ack_chunk",
            f"{SC}.stranded",
            "app.engine.offsets:consumer_lag",
            "app.engine.offsets:_committed",
            "app.engine.offsets:_pending_acks",
        ),
        "the private bookkeeping it creates is read and written directly: _acked, "
        "_acked_index, _gap (IntervalTree), _read_offset and _committed_offset (defaultdicts "
        "of None), _unacked_messages, _commit_every, _waiting_for_ack, callback, scheduler",
        (
            "test_commits_a_run_that_follows_the_committed_offset",
            "test_acked_chunks_commit_up_to_the_first_one_not_acked",
            "test_a_partition_held_by_a_hung_target_makes_the_worker_not_ready_until_it_moves",
            "test_status_shows_delay_backlog_dlq_depth_and_lag",
        ),
    ),
    Pin(
        "faust.transport.consumer.Consumer._reset_state",
        "488b46f5c7f1d0b0cc8e15986f752ebe95a184ee5ba9371ae1f0053b35f6d1e7",
        RELIES,
        (f"{SC}.paused", f"{SC}.stranded", f"{SC}.unsought", f"{SC}._drain_messages"),
        "it creates _paused_partitions and _buffered_partitions, read directly: paused "
        "partitions are neither stranded nor unsought, buffered ones still get their records",
        (
            "test_records_handed_over_and_gone_strand_their_partition",
            "test_a_thousand_delays_arrive_on_time_under_load",
        ),
    ),
    Pin(
        "faust.transport.consumer.Consumer._new_offset",
        "1d2c7ea89a7ad4f1a216c1d51936e569162cd66bd56f889e13fd29c910b58eb0",
        OVERRIDES,
        (f"{SC}._new_offset",),
        "it commits only the run of done offsets that begins at the committed offset (or "
        "the log's start), never past an unacked head offset, counting as done only gaps a "
        "fetch proved; Faust's commits past a missing head offset (faust-streaming #312), "
        "stops at a record acked twice, and counts every inferred gap as acked",
        (
            "test_never_passes_one_missing_offset_at_the_head",
            "test_records_acked_twice_do_not_slow_the_commit",
            "test_a_known_gap_is_skipped",
            "test_with_no_committed_offset_the_log_start_is_the_base",
        ),
    ),
    Pin(
        "faust.transport.consumer.Consumer._filter_committable_offsets",
        "dc5e9baf5d994485473ce80aed1873b9318f02d735fde21e285de3d0c52a5e0e",
        RELIES,
        (f"{SC}._new_offset",),
        "every commit takes each partition's offset from _new_offset (ours) here, and keeps "
        "it only past the committed one (_should_commit)",
        (
            "test_never_passes_one_missing_offset_at_the_head",
            "test_sigkill_mid_stream_loses_nothing_and_applies_nothing_twice",
        ),
    ),
    Pin(
        "faust.transport.consumer.Consumer._commit_tps",
        "a20e230b05ae8b151ac9f78fa77a102003a948c66c24c9d3588e39cb12859b7e",
        RELIES,
        (f"{SC}._commit_offsets",),
        "every commit reaches the broker through _commit_offsets (ours), so the commit guard "
        "sees each offset before it is sent; another path to _commit would bypass it",
        (
            "test_a_commit_the_guard_cannot_prove_is_refused_and_counted",
            "test_sigkill_mid_stream_loses_nothing_and_applies_nothing_twice",
        ),
    ),
    Pin(
        "faust.transport.consumer.Consumer._commit_offsets",
        "1a6979904118844111259d182ca1c6e92ccc16364ccbe55c58e59d6e254a7adb",
        OVERRIDES,
        (f"{SC}._commit_offsets",),
        "it hands Faust's only the offsets the CommitGuard proves done (the others are "
        "logged, counted, and read again), relying on Faust's to commit just those, for "
        "assigned partitions, and to record them in _committed_offset",
        ("test_a_commit_the_guard_cannot_prove_is_refused_and_counted",),
    ),
    Pin(
        "faust.transport.consumer.Consumer.commit",
        "a354437baaa08bf8096d978ca195963e22f7a497d18392960dd53dacb7c9f2d8",
        OVERRIDES,
        (f"{SC}.commit",),
        "it learns where the logs of partitions with no committed offset begin before "
        "Faust's commit, so that _new_offset has a base for them",
        (
            "test_commit_learns_log_starts_and_heal_re_reads_from_there",
            "test_two_workers_starting_on_a_backlog_deliver_every_record_once",
        ),
    ),
    # -- faust.transport.consumer: seeks -------------------------------------------------
    Pin(
        "faust.transport.consumer.Consumer.perform_seek",
        "0e8c130ff4b0afd82c0be9c5fd831316e10febc62c94032833911096e156d7c6",
        OVERRIDES,
        (f"{SC}.perform_seek", f"{SC}._perform_seek"),
        "after Faust's seek to the committed offsets it seeks every partition with no "
        "committed offset to its log's start and begins each partition's reading there; it "
        "relies on Faust's to set _committed_offset and _read_offset from seek_to_committed",
        (
            "test_after_a_rebalance_every_partition_without_commits_restarts_at_its_log_start",
            "test_two_workers_starting_on_a_backlog_deliver_every_record_once",
        ),
    ),
    Pin(
        "faust.transport.consumer.Consumer.seek",
        "b86a9fe05f956b30cf299c787b6787c6e0349cbf1ae556f2456a1e97b15dbb22",
        RELIES,
        (
            f"{SC}.heal",
            "app.engine.parking:Parking._rewind",
            f"{SC}._seek_many",
            f"{SC}._perform_seek",
        ),
        "heal and the parked delay tiers seek through it: it calls _seek (ours), then sets "
        "_read_offset to the offset or None, which _seek_many and _perform_seek copy for the "
        "seeks they make themselves",
        (
            "test_a_seek_runs_in_the_consumer_thread",
            "test_a_parked_partition_holds_what_follows_its_head_and_rereads_from_it",
            "test_dropped_records_are_read_again_once_their_partition_s_position_is_known",
        ),
    ),
    Pin(
        "faust.transport.consumer.ThreadDelegateConsumer._seek",
        "4f95c631420410a5fe6ecb1eff2f9010d7cfff6861fe00d41889bb31bd7df8b1",
        OVERRIDES,
        (f"{SC}._seek",),
        "it seeks in the consumer thread (many partitions in one hop) and notes where the "
        "partition's reading now begins; Faust's calls aiokafka's seek from the main thread, "
        "racing fetched_records in the consumer thread (a KeyError stopped the worker)",
        ("test_a_seek_runs_in_the_consumer_thread",),
    ),
    Pin(
        "faust.transport.consumer.ThreadDelegateConsumer.__init__",
        "7072ae80eac1ff62b52ce9503a8fe7b6ff44fbb390b8f6beba7161b31b8bb483",
        RELIES,
        (f"{SC}._in_consumer_thread", f"{SC}._aiokafka_fetcher", f"{SC}._member_id"),
        "it sets _thread: our seeks run in that thread, and the fetch pace and the commit "
        "log line read its aiokafka consumer",
        (
            "test_a_seek_runs_in_the_consumer_thread",
            "test_scaling_one_three_one_under_load_delivers_each_message_once",
        ),
    ),
    Pin(
        "faust.transport.consumer.Consumer.verify_all_partitions_active",
        "4e0e46f5c297305d61bf13eeb27ab0124b6538e35b0c200a2270c85438399bf0",
        OVERRIDES,
        (f"{SC}.verify_all_partitions_active",),
        "it runs Faust's livelock scan of every partition every LIVELOCK_CHECK_S (30 s), not "
        "every 2.5 commit intervals (a tenth of an idle worker's CPU)",
        (),
    ),
    # -- faust.transport.consumer: the fetch loop and the hand-over ----------------------
    Pin(
        "faust.transport.consumer.Consumer._drain_messages",
        "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417",
        COPIES,
        (f"{SC}._drain_messages",),
        "hands records over only through _admit (no gap inferred from read offsets: issue "
        "15), to lanes a partition's fetch at a time, awaits the callback directly when it "
        "cannot block, seeks dropped records back, and paces fetches",
        (
            "test_records_fetched_before_a_seek_are_not_handed_over_and_prove_no_gap",
            "test_dropped_records_are_read_again_once_their_partition_s_position_is_known",
            "test_sigkill_mid_stream_loses_nothing_and_applies_nothing_twice",
            "test_workers_coming_and_going_lose_nothing_acknowledged",
        ),
    ),
    Pin(
        "faust.transport.consumer.Consumer.getmany",
        "4b168d84882a70d6e3e2f9804430a63b92f8fd117d3187cbb4aeb54305bda34e",
        COPIES,
        (f"{SC}._to_streams", f"{SC}._seek_back"),
        "_to_streams repeats its per-record hand-over (stop at a generation change or a "
        "stopped flow, track the highwater, _to_message) and _seek_back its seek back to "
        "the committed offsets when records arrive while the flow is stopped",
        (
            "test_workers_coming_and_going_lose_nothing_acknowledged",
            "test_scaling_one_three_one_under_load_delivers_each_message_once",
        ),
    ),
    Pin(
        "faust.transport.consumer.Consumer._wait_next_records",
        "6218e1969a636b3ff504ad1b8e7ad58a113572e43d746cc96d684ed5153032c6",
        RELIES,
        (f"{SC}._drain_messages",),
        "called directly: it waits while the flow is stopped and returns (records, active "
        "partitions); records of partitions no longer active are dropped and sought back",
        (
            "test_workers_coming_and_going_lose_nothing_acknowledged",
            "test_a_thousand_delays_arrive_on_time_under_load",
        ),
    ),
    Pin(
        "faust.transport.consumer.Consumer._add_gap",
        "4df2573ded7c1c2cde04dc6bde6d4480cb5875ef565256e56966b585ae39b1c1",
        COPIES,
        (f"{SC}._absent",),
        "records offsets absent from the log in _gap as it does (IntervalTree, end "
        "exclusive, merge_overlaps), but only where a fetch proves them",
        (
            "test_offsets_a_fetch_skips_are_absent_and_count_as_done",
            "test_a_fetch_that_starts_past_the_next_expected_proves_the_offsets_between",
        ),
    ),
    Pin(
        "faust.transport.consumer.Consumer.track_message",
        "217d7f1399a4cd8e15a43a64ecf50413b9b738058e5433e057f0dc3927a3fc03",
        RELIES,
        (f"{SC}.release", f"{SC}.stranded"),
        "every message handed to a stream joins _unacked_messages (what wait_empty waits "
        "for): release() takes a message given back out of it, stranded() reads it as what "
        "is in flight",
        (
            "test_records_handed_over_and_gone_strand_their_partition",
            "test_a_parked_partition_holds_what_follows_its_head_and_rereads_from_it",
        ),
    ),
    Pin(
        "faust.transport.consumer.Consumer.ack",
        "5fcf41cf45153475de3790dc56fec1b83335956dc8b3bf7ff6bbb2b57627f03f",
        OVERRIDES,
        (f"{SC}.ack", f"{SC}.ack_chunk"),
        "it counts an ack only from the partition's current reading (from before a "
        "rebalance: only marked done) and covers it in the guard; ack_chunk copies its "
        "bookkeeping (_acked_index, _acked, _n_acked, _waiting_for_ack, under ack_lock) for "
        "a lane chunk",
        (
            "test_an_ack_from_before_the_partitions_reading_began_is_not_counted",
            "test_acked_chunks_commit_up_to_the_first_one_not_acked",
            "test_offsets_already_committed_or_acked_are_not_counted_again",
        ),
    ),
    Pin(
        "faust.transport.consumer.Consumer.wait_empty",
        "e4662fe24f094819add590b2d75f233840e77823b432aea6504539768572102f",
        OVERRIDES,
        (f"{SC}.wait_empty",),
        "it also waits for batches taken from lanes, then Faust's, which waits only for "
        "_unacked_messages (release() empties it of messages given back)",
        (
            "test_a_batch_is_pending_until_acked_or_released",
            "test_sigterm_with_the_broker_frozen_exits_at_the_deadline_and_loses_nothing",
            "test_workers_coming_and_going_lose_nothing_acknowledged",
        ),
    ),
    Pin(
        "faust.transport.consumer.Consumer.on_partitions_revoked",
        "d04b7ae72c6fc206924a2879d6c90dd383f3e8ba6f4b10a19ca99a921eb8f4db",
        OVERRIDES,
        (f"{SC}.on_partitions_revoked",),
        "it ends the revoked partitions' readings (guard, next offset expected) and paces "
        "fetches as busy for the rebalance, then Faust's, which forgets their acks, gaps "
        "and offsets",
        (
            "test_a_rebalance_fetches_as_busy_for_a_while_whatever_the_rate",
            "test_workers_coming_and_going_lose_nothing_acknowledged",
        ),
    ),
    Pin(
        "faust.transport.consumer.Consumer.on_partitions_assigned",
        "29ce96596f05a18c6738eeb2e0d308dd8ef09e9116854129372c474f8638c069",
        OVERRIDES,
        (f"{SC}.on_partitions_assigned",),
        "it paces fetches as busy for the rebalance, then Faust's",
        (
            "test_a_rebalance_fetches_as_busy_for_a_while_whatever_the_rate",
            "test_scaling_one_three_one_under_load_delivers_each_message_once",
        ),
    ),
    Pin(
        "faust.transport.consumer.Consumer.pause_partitions",
        "27a1c94bdacd54de06593ec4eb040b32e9e7c9534e9af041f6ed66723df5f922",
        RELIES,
        ("app.engine.parking:Parking.park", f"{SC}.paused"),
        "a parked delay tier pauses its partition: it must leave the active set (not "
        "fetched) and join _paused_partitions (read by paused(), stranded(), unsought())",
        (
            "test_a_parked_partition_holds_what_follows_its_head_and_rereads_from_it",
            "test_delays_arrive_within_the_bound_even_past_the_largest_tier",
        ),
    ),
    Pin(
        "faust.transport.consumer.Consumer.resume_partitions",
        "afe6b7c02a41d63cd46d47a03f09b547c85289c108de21d682970057d1015c3b",
        RELIES,
        ("app.engine.parking:Parking._rewind",),
        "a parked delay tier resumes its partition after seeking it back to its head",
        (
            "test_a_parked_partition_holds_what_follows_its_head_and_rereads_from_it",
            "test_a_thousand_delays_arrive_on_time_under_load",
        ),
    ),
    # -- faust.transport.drivers.aiokafka ------------------------------------------------
    Pin(
        "faust.transport.drivers.aiokafka.Consumer._to_message",
        "7c24f6511b2fcef7cbfe73526e78de033bfe0df211f1fd30509d699c9deb6ce4",
        RELIES,
        (f"{SC}._to_streams",),
        "called directly to make the message handed to the conductor, with the current "
        "generation id that ack() and the streams check",
        ("test_every_valid_request_lands_once_and_every_bad_one_is_dead_lettered",),
    ),
    Pin(
        "faust.transport.drivers.aiokafka.AIOKafkaConsumerThread.on_start",
        "38b4e8bd1e10723aed02bb1e8c74ccb02a0b04dec35b9001c51f45fa7f2b611c",
        RELIES,
        (f"{SC}._aiokafka_fetcher", f"{SC}._member_id"),
        "it assigns _consumer (the aiokafka consumer), read with getattr: None before",
        (
            "test_fetches_are_patient_only_while_the_worker_is_busy",
            "test_scaling_one_three_one_under_load_delivers_each_message_once",
        ),
    ),
    Pin(
        "faust.transport.drivers.aiokafka.AIOKafkaConsumerThread._ensure_consumer",
        "ff4a4c693b7ec63f4a76dfb61c419380bef70dd32383fe38ebcfcc27091605a6",
        RELIES,
        (f"{SC}._in_consumer_thread",),
        "it returns the thread's aiokafka consumer, which our seeks use in that thread",
        ("test_a_seek_runs_in_the_consumer_thread",),
    ),
    Pin(
        "faust.transport.drivers.aiokafka.AIOKafkaConsumerThread._fetch_records",
        "39a2c6c79fc1455a199629912b533458a720c64983bc957420a42feef6593baa",
        RELIES,
        (f"{SC}._seek",),
        "fetches run in the consumer thread, inside aiokafka's fetched_records: a seek "
        "from another thread raced it (the KeyError), which is why _seek runs in this one",
        (
            "test_a_seek_runs_in_the_consumer_thread",
            "test_workers_coming_and_going_lose_nothing_acknowledged",
        ),
    ),
    Pin(
        "faust.transport.drivers.aiokafka.Producer._ensure_producer",
        "5592a4bbdf2513253f98233a4eac931ded2a531a86f269cddcc33bc3f5827db5",
        RELIES,
        ("app.engine.producing:emit",),
        "it returns the started aiokafka producer that emit() builds its batches with",
        (
            "test_202_means_durable_and_the_row_arrives",
            "test_every_valid_request_lands_once_and_every_bad_one_is_dead_lettered",
        ),
    ),
    Pin(
        "faust.transport.drivers.aiokafka.Producer.key_partition",
        "c713c4d7b421ecdf0c0d00d500d142bd312466527c86605fe7f2d4276d426d4f",
        RELIES,
        ("tables.status:status_partition", "app.web.views:_owns_stats"),
        "Faust routes a web request by key (topic_route, table_route) with it, and "
        "_owns_stats finds a stats key's partition with it: aiokafka's _partition with the "
        "app's producer_partitioner (ours), so it agrees with status_partition and the stores",
        (
            "test_message_status_from_any_worker_and_after_its_owner_dies",
            "test_namespace_metrics_are_the_same_from_either_worker",
        ),
    ),
    # -- faust app, transport and flow control -------------------------------------------
    Pin(
        "faust.transport.base.Transport.create_consumer",
        "46cc2bf5ab14acfab4e00d77004a1f4b9306b7f4f86293b6708d11bfce11188a",
        RELIES,
        ("app.engine.consumer:StrictTransport", "app.engine.consumer:install"),
        "it instantiates the transport's Consumer: StrictTransport's is StrictConsumer",
        ("test_sigkill_mid_stream_loses_nothing_and_applies_nothing_twice",),
    ),
    Pin(
        "faust.app.base.App._new_consumer",
        "bff6ccd646b71ea99a7e7a7d1c62adbf3d34432a0b42a39e6f60b4c0307d89c8",
        RELIES,
        ("app.engine.consumer:install",),
        "the app's consumer comes from app.transport, which install() replaces first",
        ("test_sigkill_mid_stream_loses_nothing_and_applies_nothing_twice",),
    ),
    Pin(
        "faust.app.base.App.flow_control",
        "f664abbe76e25985fd8ebcd1fbc5e2b3174909d2000a5aa3595e8516fdb903a5",
        RELIES,
        ("app.engine.consumer:install",),
        "a cached_property: install() puts KeepingFlowControl in app.__dict__ before any "
        "stream exists, so every stream queue and lane is managed by it",
        (
            "test_flow_control_keeps_queued_records_on_a_redundant_resume",
            "test_workers_coming_and_going_lose_nothing_acknowledged",
        ),
    ),
    Pin(
        "mode.utils.objects.cached_property.__get__",
        "a0b3bbfcb4ac99b7a7625e3c41de4671e748ae4d689aa316ccea7b8cc494d0ec",
        RELIES,
        ("app.engine.consumer:install",),
        "it returns obj.__dict__[name] once set, which is how install() substitutes the "
        "app's flow control",
        ("test_workers_coming_and_going_lose_nothing_acknowledged",),
    ),
    Pin(
        "mode.utils.queues.FlowControlEvent.resume",
        "4dcdc1253fd0dcb40de18a3702503c01d21e9da7e5e55b122fb92615f27648d9",
        OVERRIDES,
        (f"{FLOW}.resume",),
        "it empties the stream queues only when the resume ends a suspension; mode's empties "
        "them on every resume, dropping records queued for the agents when Faust resumes "
        "twice in a rebalance",
        ("test_flow_control_keeps_queued_records_on_a_redundant_resume",),
    ),
    Pin(
        "mode.utils.queues.FlowControlEvent.__init__",
        "9223af83e61229d6caf388e7840412a3d50857b3570eadb648056ebbf7787a17",
        RELIES,
        (f"{FLOW}.resume",),
        "it creates the _suspend and _resume events that our resume() reads and sets",
        ("test_flow_control_keeps_queued_records_on_a_redundant_resume",),
    ),
    Pin(
        "mode.utils.queues.FlowControlEvent.clear",
        "dda5e40d80288a8f4244cffdf3e7a648773579a72e64b40182bbbc2424752524",
        RELIES,
        (f"{FLOW}.resume", "app.engine.lanes:open_lane", "app.engine.lanes:Lane.clear"),
        "it clears every queue given to manage_queue: lanes are, so a rebalance clears them "
        "like the stream buffers",
        ("test_room_and_clear", "test_flow_control_keeps_queued_records_on_a_redundant_resume"),
    ),
    Pin(
        "faust.tables.recovery.Recovery._restart_recovery",
        "6bd8a8558a2dffe4c60b8150f23d721baa6b3d658367f911a3ad2187e20efc6f",
        RELIES,
        (f"{FLOW}.resume", "app.engine.tables:TopicGlobalTable"),
        "it resumes the flow for active-only changelog partitions of tables with "
        "recovery_buffer_size 1 (so the namespaces GlobalTable follows its topic live) and "
        "again after recovery: the double resume KeepingFlowControl makes harmless",
        (
            "test_a_namespace_change_takes_effect_on_a_running_worker",
            "test_flow_control_keeps_queued_records_on_a_redundant_resume",
        ),
    ),
    Pin(
        "faust.tables.recovery.Recovery._resume_streams",
        "d986a6710c1aca98f08c4c723fb3eadc5bf24576ad4eb9da3dd3eecedda2f24e",
        RELIES,
        (f"{SC}.perform_seek", f"{FLOW}.resume"),
        "after a rebalance it seeks the stream partitions (perform_seek, ours), then resumes "
        "flow control: the resume that ends the suspension, which clears the queues",
        (
            "test_two_workers_starting_on_a_backlog_deliver_every_record_once",
            "test_flow_control_keeps_queued_records_on_a_redundant_resume",
        ),
    ),
    Pin(
        "faust.tables.recovery.Recovery.on_recovery_completed",
        "6ef567acf072e46da3fccbccc6d662371f634f622c3d510972d5df81f70ae3ac",
        RELIES,
        (f"{SC}.perform_seek", f"{FLOW}.resume"),
        "after the tables' recovery it seeks the stream partitions (perform_seek, ours), "
        "then resumes flow control",
        (
            "test_two_workers_starting_on_a_backlog_deliver_every_record_once",
            "test_restart_with_kept_state_reads_only_the_changelog_tail",
        ),
    ),
    Pin(
        "faust.app.base.App._on_partitions_revoked",
        "d5c895bbe57dc73ae4d7f762f6fdc9fdd3abd02f9e05863ccfd8034082e5682f",
        RELIES,
        ("app.engine.lanes:Lane.clear", f"{SC}.wait_empty"),
        "at a rebalance it stops the flow, clears every queue flow control manages (the "
        "lanes too) and waits for the consumer's wait_empty (ours: lane batches too) before "
        "it commits; the seek after the rebalance reads what was cleared again",
        (
            "test_workers_coming_and_going_lose_nothing_acknowledged",
            "test_scaling_one_three_one_under_load_delivers_each_message_once",
        ),
    ),
    # -- faust tables and stores ---------------------------------------------------------
    Pin(
        "faust.tables.base.Collection._changelog_topic_name",
        "f341fe97037b4ac829cbfcdeadb269f08b3b62a3411cee380934b715bc132dbb",
        OVERRIDES,
        ("app.engine.tables:TopicGlobalTable._changelog_topic_name",),
        "it names the namespaces table's changelog the public namespaces topic: Faust's "
        "assignor ignores a custom changelog_topic (a KeyError, and the group never joins)",
        ("test_a_namespace_change_takes_effect_on_a_running_worker",),
    ),
    Pin(
        "faust.tables.base.Collection.data",
        "ade4a02ddd5582cb4264a7f927bf7a59e1c0ca6d0ebf9da40b665860cd1187f4",
        RELIES,
        (
            "app.engine.changelog:changelog_record",
            "tables.namespaces:lookup",
            "app.engine.store:_changelog_stores",
        ),
        "the table's store, made on first use: state is written to and read from it "
        "directly, not through the table (no per-call sensors, no buffered changelog write)",
        (
            "test_a_write_outside_an_event_goes_to_its_keys_partition",
            "test_pipeline_and_transactions_deliver_exactly_once_on_rocksdb",
            "test_transfers_complete_or_compensate_through_a_sigkill",
        ),
    ),
    Pin(
        "faust.stores.base.SerializedStore.__setitem__",
        "6cadf304f59f254df10250c7209bbe8ab68844746747cac3bef589fbff4506be",
        RELIES,
        ("app.engine.changelog:changelog_record",),
        "store[key] = value calls _set with the raw serializers' bytes unchanged, so the "
        "store holds exactly the changelog record emitted",
        (
            "test_a_write_outside_an_event_goes_to_its_keys_partition",
            "test_restart_with_kept_state_reads_only_the_changelog_tail",
        ),
    ),
    Pin(
        "faust.stores.memory.Store.__post_init__",
        "e59c82f3785458b2c6bb8179a01b57270be3edf167615a3f6508f102b173baa2",
        RELIES,
        ("app.engine.changelog:changelog_record",),
        "creates the private _key_partition map (key -> partition) that changelog_record "
        "fills for a direct write",
        ("test_a_key_written_with_the_batch_is_dropped_when_its_partition_leaves",),
    ),
    Pin(
        "faust.stores.memory.Store.on_recovery_completed",
        "a00bef343e139602606996e88809e62731a9113691ae678095266a52e0e0b013",
        RELIES,
        ("app.engine.changelog:changelog_record",),
        "with memory:// (the default) this drops the keys of partitions no longer held, "
        "by the partition recorded in _key_partition; changelog_record records it for a "
        "direct write (Faust's own writes leave it unset), so such a key is not kept, stale",
        (
            "test_a_key_written_with_the_batch_is_dropped_when_its_partition_leaves",
            "test_scaling_one_three_one_under_load_delivers_each_message_once",
            "test_transfers_complete_or_compensate_through_a_sigkill",
        ),
    ),
    Pin(
        "faust.stores.rocksdb.Store.__init__",
        "c7c0fa2989e8ab4a4349ff29df8258471624a160cb549e6735c367d9b2fefd19",
        RELIES,
        (f"{STORE}._set", f"{STORE}._get", f"{STORE}.note_durable", f"{STORE}._mark_written"),
        "it creates _dbs (partition -> open database) and _key_index, used directly",
        (
            "test_a_write_outside_an_event_goes_to_its_keys_partition",
            "test_acknowledged_offsets_only_move_forward_and_open_nothing",
        ),
    ),
    Pin(
        "faust.stores.rocksdb.Store._set",
        "4227e561e288d9413bf663a3a67940fd4976f5484e70e49445858ce4d400d26e",
        OVERRIDES,
        (f"{STORE}._set",),
        "it files a write under its key's partition (the producer's murmur2) and marks the "
        "database unclean; Faust's takes the current event's partition and asserts there is "
        "an event",
        ("test_a_write_outside_an_event_goes_to_its_keys_partition",),
    ),
    Pin(
        "faust.stores.rocksdb.Store._get",
        "7ae8dfd6d7754a5952ae162d4d5cf0d51a8a020ed730a4a7c7dc7f7c84e73fb8",
        OVERRIDES,
        (f"{STORE}._get",),
        "it reads a use_partitioner table's key from its key's partition only, opening no "
        "database; Faust's searches every open database",
        (
            "test_a_write_outside_an_event_goes_to_its_keys_partition",
            "test_a_database_that_does_not_open_is_moved_aside_and_starts_empty",
        ),
    ),
    Pin(
        "faust.stores.rocksdb.Store._del",
        "07f42ff3caefffddb002ba3c316120ee8a608a15021fa226fd8e9ba2635004a9",
        OVERRIDES,
        (f"{STORE}._del",),
        "it marks the key's partition unclean, then Faust's delete",
        ("test_a_write_outside_an_event_goes_to_its_keys_partition",),
    ),
    Pin(
        "faust.stores.rocksdb.Store._db_for_partition",
        "cb7e67d5f9efc4bced7b7ab09a55fe717c352daad5b693594e3f7ca52a98787f",
        RELIES,
        (f"{STORE}._set",),
        "called directly: it opens a partition's database (through _open_for_partition, "
        "ours) once and keeps it in _dbs",
        ("test_a_clean_stop_keeps_the_data_and_a_kill_rebuilds_it",),
    ),
    Pin(
        "faust.stores.rocksdb.Store._open_for_partition",
        "1dc4e0113d67379dd61c0a396fa92636577d5fc6be60d4312253fa566080377b",
        OVERRIDES,
        (f"{STORE}._open_for_partition",),
        "it rebuilds a database left unclean, reads it through once, and moves one that "
        "fails to open aside (an empty one is rebuilt from the changelog); Faust's lets any "
        "error but a lock crash the worker at every start",
        (
            "test_a_database_that_does_not_open_is_moved_aside_and_starts_empty",
            "test_damage_inside_a_data_block_is_found_when_the_database_opens",
            "test_deleted_or_corrupted_state_is_rebuilt_from_the_changelogs",
        ),
    ),
    Pin(
        "faust.stores.rocksdb.Store._try_open_db_for_partition",
        "b2546e78f9298bdc6c990229c9f426f76d666fc6e0a5ebafcd86d6fe7978941d",
        RELIES,
        (f"{STORE}._open_for_partition", "app.engine.store:locked"),
        "it retries an open that failed on the database's lock and gives up on any other "
        "error: a locked database must be re-raised to it, not moved aside",
        ("test_a_locked_database_is_not_moved_aside",),
    ),
    Pin(
        "faust.stores.rocksdb.Store.stop",
        "2e98db0eb7c7582b49fb40e788f2d2c28cf417900ce638c5981a177b5ea99ec6",
        OVERRIDES,
        (f"{STORE}.stop",),
        "it removes the UNCLEAN marks of a clean stop, then Faust's (which drops the "
        "databases without closing them)",
        ("test_a_clean_stop_keeps_the_data_and_a_kill_rebuilds_it",),
    ),
    Pin(
        "faust.stores.rocksdb.Store.revoke_partitions",
        "3f85447a24fc34ffd1ecb5039f502ac6049d92fbd61d91371049bab01203e390",
        OVERRIDES,
        (f"{STORE}.revoke_partitions",),
        "it forgets the durable offsets of revoked changelog partitions, then Faust's",
        ("test_standby_takes_over_the_tables_of_a_killed_worker",),
    ),
    Pin(
        "faust.stores.rocksdb.Store.set_persisted_offset",
        "b4c811926678346ebb8c40486dbc46d0fbac2bbeaa592384bd955112556acf45",
        COPIES,
        (f"{STORE}.note_durable",),
        "writes the changelog offset Kafka acknowledged under offset_key, as "
        "str(offset).encode() like Faust's, for persisted_offset at the next start",
        (
            "test_acknowledged_offsets_only_move_forward_and_open_nothing",
            "test_restart_with_kept_state_reads_only_the_changelog_tail",
        ),
    ),
    Pin(
        "faust.stores.rocksdb.Store.persisted_offset",
        "6f2e502fb86043a1cf0adca5c2fffb197579db01b31dbba3b0415aaacc35a2ed",
        RELIES,
        (f"{STORE}.note_durable",),
        "it reads back what note_durable writes: where a restart's recovery begins",
        (
            "test_note_durable_takes_each_batch_last_offset_for_table_changelogs",
            "test_restart_with_kept_state_reads_only_the_changelog_tail",
        ),
    ),
    Pin(
        "mode.utils.imports.FactoryMapping.__init__",
        "fe3236f0f035e7fe961399feb6dc5a921602532dfa749c58114c13aa1ce2c8f6",
        RELIES,
        ("app.engine.store:install",),
        "it sets aliases, where install() points rocksdb:// at RocksStore",
        ("test_rocksdb_urls_resolve_to_the_corrected_store",),
    ),
    # -- faust streams -------------------------------------------------------------------
    Pin(
        "faust.streams.Stream.noack_take",
        "f2cc2dbfc162d2006c94361c0ed68535c95484020849eb0d4210c1f52c4c430a",
        COPIES,
        ("app.engine.batching:batches",),
        "collects events the same way (a processor taking current_event while the stream "
        "drains passively, acks off) but arms its timer only once a batch has begun",
        (
            "test_batches_fill_up_then_wait_for_the_window",
            "test_an_idle_stream_yields_nothing_and_arms_no_timer",
        ),
    ),
    Pin(
        "faust.streams.Stream._enable_passive",
        "64da8ce9f729e30ea2c6952a4cb55617c1231f82793c4435966a8b811a0f26e8",
        RELIES,
        ("app.engine.batching:batches",),
        "called directly to drain the stream's channel in the background through its processors",
        (
            "test_batches_fill_up_then_wait_for_the_window",
            "test_delays_arrive_within_the_bound_even_past_the_largest_tier",
        ),
    ),
    Pin(
        "faust.streams.Stream.add_processor",
        "3bb6686bc255f12163b3398ee96f19d0aacb82d2a2d42f286afc8b462190ced6",
        RELIES,
        ("app.engine.batching:batches",),
        "it appends to _processors, from which batches() removes its processor at the end",
        ("test_batches_fill_up_then_wait_for_the_window",),
    ),
    Pin(
        "faust.streams.Stream._py_aiter",
        "3a48ee257a65435b482d51edb74f2993a67867949b1ef89b49fea893769e0614",
        RELIES,
        ("app.engine.batching:batches",),
        "without Cython it runs the processors on each event with current_event set, and "
        "acks an event itself only while enable_acks is on: batches() turns acks off so "
        "that agents ack once their effects are durable",
        (
            "test_sigkill_mid_stream_loses_nothing_and_applies_nothing_twice",
            "test_delays_through_a_sigkill_none_early_none_lost",
        ),
    ),
    Pin(
        "faust/_cython/streams.pyx",
        "0041622f4a251188f53d73e6d51d18d16f0f427512df1e96c043cfdeea4c3250",
        RELIES,
        ("app.engine.batching:batches", f"{SC}.ack"),
        "the compiled StreamIterator (installed here) runs the processors with current_event "
        "set, and with enable_acks on it inlines Consumer.ack, bypassing StrictConsumer.ack "
        "(the guard never covers the offset and its commit is refused): every stream must "
        "ack through stream.ack with acks off, as batches() does",
        (
            "test_sigkill_mid_stream_loses_nothing_and_applies_nothing_twice",
            "test_transfers_complete_or_compensate_through_a_sigkill",
        ),
    ),
    Pin(
        "faust.streams.Stream.ack",
        "32d7171a89b0931d806a87dc81dcba5673dd9702f8a6add8426e0e236b9e8fef",
        RELIES,
        (f"{SC}.ack",),
        "agents ack events with it: event.ack() -> Message.ack(app.consumer), which ends "
        "in the consumer's ack (ours)",
        (
            "test_an_ack_from_before_the_partitions_reading_began_is_not_counted",
            "test_delays_through_a_sigkill_none_early_none_lost",
        ),
    ),
    Pin(
        "faust.types.tuples.ConsumerMessage.on_final_ack",
        "45d670b6a8ac4bd07a3e5600c89358638415b7a2bf1d17c03c260cfc1b8a8e5a",
        RELIES,
        (f"{SC}.ack",),
        "a message's last ack calls the consumer's ack (ours)",
        (
            "test_an_ack_from_before_the_partitions_reading_began_is_not_counted",
            "test_transfers_complete_or_compensate_through_a_sigkill",
        ),
    ),
    Pin(
        "faust.topics.Topic.__aiter__",
        "838623ae001ec5d1cc42e4a0be92e3485144bc6ce5d3b15aca785f605ffe2dd1",
        RELIES,
        ("app.engine.lanes:open_lane",),
        "iterating a topic registers it with the conductor (the consumer subscribes to it) "
        "and returns the channel whose topics name the lane",
        ("test_every_valid_request_lands_once_and_every_bad_one_is_dead_lettered",),
    ),
    Pin(
        "faust.transport.conductor.Conductor._update_indices",
        "619b3247b96ac7d508b9b571e30fdaceb00378b77c79e4aee12a5d8ee3f41d34",
        RELIES,
        (f"{SC}._to_streams",),
        "it fills _topic_name_index (topic -> channels), read to tell whether handing a "
        "record over could block on a full channel queue",
        (
            "test_workers_coming_and_going_lose_nothing_acknowledged",
            "test_scaling_one_three_one_under_load_delivers_each_message_once",
        ),
    ),
    # -- mode threads --------------------------------------------------------------------
    Pin(
        "mode.threads.QueueServiceThread.call_thread",
        "479edda75b54734b48dabbb33071259949ded0a6f9fa6f82e81afdc42aff6e55",
        RELIES,
        (f"{SC}._in_consumer_thread",),
        "it runs a function in the consumer thread and returns its result",
        (
            "test_a_seek_runs_in_the_consumer_thread",
            "test_workers_coming_and_going_lose_nothing_acknowledged",
        ),
    ),
    Pin(
        "mode.threads.MethodQueue._process_enqueued",
        "d88a086d148c80126eab3fc2e052b288257a34573a8874965729601a0da84e19",
        RELIES,
        ("app.engine.seeking:_seek_all",),
        "it awaits maybe_async(fn(...)): a plain function such as _seek_all works",
        ("test_workers_coming_and_going_lose_nothing_acknowledged",),
    ),
    # -- the worker ----------------------------------------------------------------------
    Pin(
        "faust.worker.Worker._on_sigterm",
        "ba99cf23ea875c02ec56789188908e790bfa29ed6c8b7021e1ce939ade9c56b6",
        OVERRIDES,
        ("app.engine.worker:FleetWorker._on_sigterm",),
        "it arms the shutdown deadline (WAL_SHUTDOWN_TIMEOUT_S), then Faust's",
        ("test_sigterm_with_the_broker_frozen_exits_at_the_deadline_and_loses_nothing",),
    ),
    Pin(
        "faust.worker.Worker._on_sigint",
        "327193230c65ea83db83983b7a0a5f983e1658e3f4271a506838d96f507283f1",
        OVERRIDES,
        ("app.engine.worker:FleetWorker._on_sigint",),
        "it arms the shutdown deadline (WAL_SHUTDOWN_TIMEOUT_S), then Faust's",
        ("test_sigterm_with_the_broker_frozen_exits_at_the_deadline_and_loses_nothing",),
    ),
    Pin(
        "mode.worker.Worker._install_signal_handlers_unix",
        "6a1810b3485970e8d0c5dd1ded34eccfc467e9693c82c1c32c7e38f635fb1648",
        RELIES,
        ("app.engine.worker:FleetWorker._on_sigterm", "app.engine.worker:FleetWorker._on_sigint"),
        "SIGTERM and SIGINT call _on_sigterm and _on_sigint",
        ("test_sigterm_with_the_broker_frozen_exits_at_the_deadline_and_loses_nothing",),
    ),
    # -- faust sensors -------------------------------------------------------------------
    Pin(
        "faust.sensors.prometheus.PrometheusMonitor",
        "69a1537022641050825a478c8793a4075edf5d306f6eca84f1d71fb4e960bb31",
        OVERRIDES,
        ("app.engine.sensors:LeanMonitor",),
        "LeanMonitor replaces its per-message and per-event methods (label children cached, "
        "no per-event timing, no base Monitor bookkeeping) and uses its _metrics and "
        "_stream_label; the whole class is pinned",
        (),
    ),
    Pin(
        "faust.sensors.prometheus.setup_prometheus_sensors",
        "b1b6473d8a389910739694fd0cdc60f6744f74c6f48832111ad24a22d46ab92e",
        RELIES,
        ("app.engine.sensors:install_monitor",),
        "it sets app.monitor to a PrometheusMonitor, whose _metrics install_monitor hands "
        "to LeanMonitor",
        (),
    ),
    Pin(
        "faust.sensors.monitor.Monitor.__init__",
        "71b613e8019232d1294358ffa749e8ac17d69b00840e1741cee74b3be6e018cd",
        RELIES,
        (
            "app.engine.sensors:LeanMonitor.on_records_in",
            "app.engine.sensors:LeanMonitor.track_tp_end_offset",
        ),
        "it creates messages_received_total, events_total, tp_read_offsets and "
        "tp_end_offsets, which LeanMonitor keeps current without the base class's methods",
        (),
    ),
    # -- aiokafka ------------------------------------------------------------------------
    Pin(
        "aiokafka.partitioner",
        "52a0b1ce4baad08d57ebbbb1bb3844ee00244b210058f968ba86a4d5b689da19",
        COPIES,
        ("app.engine.partitioner:partitioner", "app.engine.partitioner:partition_of"),
        "compute its DefaultPartitioner's partitions (murmur2, Kafka's seed) in C",
        (
            "test_keys_land_where_kafkas_default_partitioner_puts_them",
            "test_an_id_lands_in_the_partition_kafkas_default_partitioner_gives_its_key",
        ),
    ),
    Pin(
        "aiokafka.producer.producer.AIOKafkaProducer.__init__",
        "fd6f2966fb3dc883ffcd325fe27b2580f005c3246bec5f20fc8412b2134f6180",
        RELIES,
        ("app.engine.producing:_chooser", "app.engine.consumer:ShunningProducer._new_producer"),
        "it sets _metadata (the client's cluster) and _partitioner, read by _chooser, and "
        "client, the AIOKafkaClient whose hung nodes are left alone",
        (
            "test_a_key_stays_in_order_through_failures_while_others_flow",
            "test_a_node_paused_past_its_session_timeout_then_resumed",
        ),
    ),
    Pin(
        "aiokafka.producer.producer.AIOKafkaProducer._partition",
        "e45fa9c539d431d1a8af1efb94604c35e9108132a28f6a1e5b03977a0c67beaa",
        COPIES,
        ("app.engine.producing:_chooser",),
        "chooses a keyed record's partition as it does (the partitioner over all and "
        "available partitions from _metadata), the partitions looked up once per topic",
        (
            "test_a_key_stays_in_order_through_failures_while_others_flow",
            "test_keys_land_where_kafkas_default_partitioner_puts_them",
        ),
    ),
    Pin(
        "aiokafka.client.AIOKafkaClient._wait_on_metadata",
        "52b0a5ee78ef3aa0c21c82b69baa20eb6983d9e5871e9e66784198cb2f1bf256",
        RELIES,
        ("app.engine.producing:_chooser",),
        "called directly, as send() does first: the topic's partitions are known after it",
        ("test_202_means_durable_and_the_row_arrives",),
    ),
    Pin(
        "aiokafka.producer.producer.AIOKafkaProducer.send_batch",
        "bf42b0f0c5c0646db4cc15b54a81103fe948473a2969149bd9277fe2ca1b5235",
        RELIES,
        ("app.engine.producing:emit",),
        "it sends a built batch to one partition and returns the whole batch's future",
        (
            "test_202_means_durable_and_the_row_arrives",
            "test_every_key_stays_in_order_through_a_sigkill_and_a_dead_lettered_head",
        ),
    ),
    Pin(
        "aiokafka.producer.message_accumulator.MessageBatch.done",
        "2d765e5c2dc8638ddf995f5f35484a7e60830c1ec3e0e9018e6e23438aeae20d",
        RELIES,
        ("app.engine.producing:emit", "app.engine.store:note_durable"),
        "a batch's future resolves to RecordMetadata with the batch's first offset: "
        "note_durable adds the record count less one to it",
        (
            "test_note_durable_takes_each_batch_last_offset_for_table_changelogs",
            "test_restart_with_kept_state_reads_only_the_changelog_tail",
        ),
    ),
    Pin(
        "aiokafka.consumer.consumer.AIOKafkaConsumer.__init__",
        "01506f316191f7c99c785bec915756d1560029a6fad75cba6f4da71e343a8163",
        RELIES,
        ("app.engine.reading:partitions_of",),
        "it sets _client, whose force_metadata_update() learns a topic's partitions (no "
        "public call does): for the wal commands, the status book's rebuild and the probe",
        (
            "test_a_namespace_change_takes_effect_on_a_running_worker",
            "test_list_reads_a_namespace_dlq_topic_given_with_topic",
            "test_status_shows_delay_backlog_dlq_depth_and_lag",
        ),
    ),
    Pin(
        "aiokafka.consumer.consumer.AIOKafkaConsumer.start",
        "2f1ba70443327538800d348e61042cdedd5a5e6306f40ebe1a06dddba7494c45",
        RELIES,
        (f"{SC}._aiokafka_fetcher", f"{SC}._member_id", "app.engine.consumer:bound_fetches"),
        "it creates _fetcher (paced by FetchPace; its fetch_max_bytes from the consumer's "
        "_fetch_max_bytes, which bound_fetches sets before start) and _coordinator",
        (
            "test_fetches_are_patient_only_while_the_worker_is_busy",
            "test_a_fetch_brings_back_at_most_the_configured_bytes",
        ),
    ),
    Pin(
        "aiokafka.consumer.fetcher.Fetcher.__init__",
        "bf21ecb7e0f210b7c90ddabf89b02ae088d97d93cd157cea11429d13737eea2a",
        RELIES,
        (f"{PACE}._set",),
        "it sets _fetch_min_bytes, _fetch_max_wait_ms and _fetcher_timeout, which FetchPace "
        "rewrites while the worker is busy",
        (
            "test_fetches_are_patient_only_while_the_worker_is_busy",
            "test_a_busy_fetch_gathers_what_arrives_in_a_fixed_time_within_bounds",
        ),
    ),
    Pin(
        "aiokafka.consumer.fetcher.Fetcher._get_actions_per_node",
        "1dab2cf937d165d0eeacc8da8ed2b0ebd80b321bb6583757e01cdc1013d31635",
        RELIES,
        (f"{PACE}._set",),
        "it reads them for every fetch request it builds and as the fetch routine's "
        "timeout, so FetchPace's values apply from the next fetch",
        (
            "test_fetches_are_patient_only_while_the_worker_is_busy",
            "test_a_rebalance_fetches_as_busy_for_a_while_whatever_the_rate",
        ),
    ),
    # -- hung brokers left alone (app.engine.nodes) ----------------------------------------
    Pin(
        "aiokafka.client.AIOKafkaClient._get_conn",
        "68ce5d8391719d3334eeee4c7d374d6ebb7eda5e6d402b2ada8c99725acae711",
        OVERRIDES,
        ("app.engine.nodes:shun_hung_nodes",),
        "wrapped per client: a node that hung lately gets None, which every caller takes "
        "as a node it cannot reach (ready() is False, metadata asks another node); keyword "
        "arguments group and no_hint passed through",
        (
            "test_a_node_whose_request_timed_out_and_that_does_not_answer_is_left_alone",
            "test_a_connection_attempt_that_hung_to_its_deadline_counts",
            "test_a_node_paused_past_its_session_timeout_then_resumed",
        ),
    ),
    Pin(
        "aiokafka.client.AIOKafkaClient._on_connection_closed",
        "36f8c06a62fe343a37931d60230db17e53615ce50441c4eab6f8bff608e57e02",
        OVERRIDES,
        ("app.engine.nodes:shun_hung_nodes",),
        "wrapped per client before any connection exists (_get_conn passes it to each new "
        "connection as on_close): a close for CONNECTION_TIMEOUT marks the node hung, then "
        "aiokafka's own callback runs",
        (
            "test_a_node_whose_request_timed_out_and_that_does_not_answer_is_left_alone",
            "test_a_node_paused_past_its_session_timeout_then_resumed",
        ),
    ),
    Pin(
        "aiokafka.client.AIOKafkaClient.send",
        "246b277687d7b687d79fd81f0a9718633b61a5ead0a1e9898419a1151ae3a91d",
        RELIES,
        ("app.engine.nodes:shun_hung_nodes", "app.engine.nodes:bound_requests"),
        "a request that times out closes its connection with CONNECTION_TIMEOUT, still in "
        "_conns under its (node, group) key when on_close runs; bound_requests wraps send "
        "(node_id, request, group=...) and closes that same connection the same way",
        (
            "test_a_node_whose_request_timed_out_and_that_does_not_answer_is_left_alone",
            "test_a_node_paused_past_its_session_timeout_then_resumed",
            "test_a_request_to_a_node_that_never_answers_fails_within_the_bound",
            "test_a_rebalance_request_may_wait_past_the_bound",
        ),
    ),
    Pin(
        "aiokafka.conn.AIOKafkaConnection.connect",
        "b0f9ba7f0cf6b432c387480060970d41ba1a9df9883064efbbb33fbdb4366b81",
        RELIES,
        ("app.engine.nodes:shun_hung_nodes",),
        "a connect cancelled during its handshake (the probe of a suspect node cut short) "
        "closes what it opened (a bare except), so nothing is left open behind the probe",
        (
            "test_a_node_whose_request_timed_out_and_that_does_not_answer_is_left_alone",
            "test_a_node_paused_past_its_session_timeout_then_resumed",
        ),
    ),
    Pin(
        "aiokafka.client.AIOKafkaClient._metadata_update",
        "06dc51ed3e0d38b8d64100fd59012f399b2235c2f4804dfd142fcec397412fda",
        RELIES,
        ("app.engine.nodes:shun_hung_nodes",),
        "it asks the known nodes in random order, each through _get_conn, skipping one it "
        "gets None for: a hung node is skipped at once instead of after a request timeout",
        ("test_a_node_paused_past_its_session_timeout_then_resumed",),
    ),
    Pin(
        "faust.transport.drivers.aiokafka.AIOKafkaConsumerThread._create_consumer",
        "a4dc6ba0681a298c05d60994890984fe35edee17dea101f8071da9456700c238",
        RELIES,
        ("app.engine.consumer:ShunningConsumerThread._create_consumer",),
        "every consumer of a worker is made here (worker and client-only)",
        ("test_a_node_paused_past_its_session_timeout_then_resumed",),
    ),
    Pin(
        "faust.transport.drivers.aiokafka.Producer._new_producer",
        "e72355c3430ed02f5202c83e2f5ef7daf484f33aa40e62f98fe3adec3e18aa17",
        RELIES,
        ("app.engine.consumer:ShunningProducer._new_producer",),
        "every producer of the app is made here (the transactional ones included)",
        ("test_a_node_paused_past_its_session_timeout_then_resumed",),
    ),
    Pin(
        "faust.transport.drivers.aiokafka.Transport._create_topic",
        "5e1966c11a52b515d86c8ff9be5277eed3ece22dd0ce077811467da043651cf0",
        OVERRIDES,
        ("app.engine.consumer:StrictTransport._create_topic",),
        "every topic Faust declares (from its consumer and its producer) passes here with "
        "its replication and config keyword: the fleet's durability configs are added",
        (
            "test_every_topic_faust_declares_gets_the_fleets_durability",
            "test_the_leader_of_most_ingest_partitions_killed_and_restarted",
        ),
    ),
)


# -- reading upstream and our code ---------------------------------------------------------


def _unwrap(obj: Any) -> Any:
    """The function behind a property, class/static method, mode ``cached_property`` or
    ``Service.task``."""
    if isinstance(obj, property):
        return obj.fget
    if isinstance(obj, (classmethod, staticmethod)):
        return obj.__func__
    if isinstance(obj, ServiceTask):
        return obj.fun
    return getattr(obj, "_cached_property__get", obj)


def _upstream(name: str) -> Any:
    """The object ``name`` (module, class, function) exactly where it is defined: an
    attribute a class inherits does not count."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        break
    else:
        raise ModuleNotFoundError(name)
    for attr in parts[i:]:
        obj = vars(obj)[attr] if isinstance(obj, type) else getattr(obj, attr)
    return _unwrap(obj)


def source(name: str) -> str:
    """The source of upstream ``name`` (for ``package/file``: the whole file)."""
    if "/" in name:
        package, _, rest = name.partition("/")
        file = importlib.import_module(package).__file__
        assert file is not None
        return (Path(file).parent / rest).read_text()
    return inspect.getsource(_upstream(name))


def digest(name: str) -> str:
    return hashlib.sha256(source(name).encode()).hexdigest()


def _ours(ref: str) -> Any:
    """Our object ``module:Qualname`` (an attribute inherited from our base classes counts)."""
    module, _, qualname = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for attr in qualname.split(".") if qualname else ():
        obj = getattr(obj, attr)
    return _unwrap(obj)


def _where(ref: str) -> str:
    """``ref`` as the file and class it is defined in, e.g. ``app/engine/fetching.py
    FetchingConsumer._drain_messages``; as written if it cannot be imported."""
    module, _, qualname = ref.partition(":")
    try:
        obj = _ours(ref)
        path = Path(inspect.getsourcefile(obj) or "").resolve().relative_to(ROOT)
    except Exception:
        return f"{module.replace('.', '/')}.py {qualname}".strip()
    return f"{path} {getattr(obj, '__qualname__', '')}" if qualname else str(path)


@cache
def _tests() -> dict[str, list[str]]:
    """Test name -> ``path::name`` of every test defined under tests/."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        for name in re.findall(r"^\s*(?:async\s+)?def\s+(test_\w+)\(", path.read_text(), re.M):
            found.setdefault(name, []).append(f"{path.relative_to(ROOT)}::{name}")
    return found


def _distribution(pin: Pin) -> str:
    name = DISTRIBUTION[re.split(r"[./]", pin.upstream)[0]]
    return f"{name} {importlib.metadata.version(name)}, pinned at {PINNED[name]}"


def _message(pin: Pin, what: str) -> str:
    ours = ", ".join(_where(ref) for ref in pin.ours)
    many = len(pin.ours) > 1
    said = {
        OVERRIDES: f"{ours} {'override' if many else 'overrides'} it: {pin.why}",
        COPIES: f"{ours} {'are copies' if many else 'is a copy'} of it that {pin.why}",
        RELIES: f"{ours} {'rely' if many else 'relies'} on it: {pin.why}",
    }[pin.kind]
    proofs = " ".join(" ".join(_tests().get(name, [name])) for name in pin.proofs)
    check = f"run {proofs}" if proofs else "check it by hand (no test covers it)"
    return (
        f"{pin.upstream} {what} ({_distribution(pin)}): {said}. Re-read the new source, port "
        f"the change, then {check} and update the digest in tests/unit/engine/test_upstream.py."
    )


# -- the tests -----------------------------------------------------------------------------


def test_the_installed_versions_are_the_pinned_ones() -> None:
    installed = {name: importlib.metadata.version(name) for name in PINNED}
    assert installed == PINNED, (
        f"installed {installed}, but the digests in tests/unit/engine/test_upstream.py were "
        f"taken at {PINNED}: bump PINNED there, and follow each digest that fails"
    )


@pytest.mark.parametrize("pin", PINS, ids=[pin.upstream for pin in PINS])
def test_upstream_source_is_the_one_pinned(pin: Pin) -> None:
    try:
        now = digest(pin.upstream)
    except (ImportError, AttributeError, KeyError, OSError, TypeError) as exc:
        pytest.fail(_message(pin, f"is no longer where it was ({exc!r})"))
    assert now == pin.sha256, _message(pin, f"changed upstream (sha256 now {now})")


def test_every_pin_is_listed_once_with_a_digest() -> None:
    names = [pin.upstream for pin in PINS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    for pin in PINS:
        assert re.fullmatch(r"[0-9a-f]{64}", pin.sha256), pin.upstream
        assert pin.kind in (OVERRIDES, COPIES, RELIES) and pin.ours, pin.upstream


@pytest.mark.parametrize("ref", sorted({ref for pin in PINS for ref in pin.ours}))
def test_our_side_of_each_pin_is_our_code(ref: str) -> None:
    """Each override still exists (not inherited from upstream), and nothing named is gone."""
    obj = _ours(ref)
    module = getattr(obj, "__module__", getattr(obj, "__name__", ""))
    assert module.split(".")[0] in ("app", "agents", "tables"), (
        f"{ref} is {module}'s now, not ours: update the pins that name it"
    )


def test_every_proof_is_one_test_that_exists() -> None:
    named = sorted({name for pin in PINS for name in pin.proofs})
    wrong = {name: _tests().get(name, []) for name in named if len(_tests().get(name, [])) != 1}
    assert not wrong, f"proofs not found, or defined more than once, under tests/: {wrong}"
