"""The engine room: the fleet's Kafka consumer and batch runtime, on Faust, mode and aiokafka.

The one guarantee a write-ahead log exists for lives here: an offset is committed
only after everything its record caused is durable. Agents, tables and views use
this surface; what is behind it reaches into Faust's, mode's and aiokafka's
internals, on exactly pinned versions (``pyproject.toml``), each reach guarded by
a digest of the upstream source it corrects (``tests/unit/engine/test_upstream.py``).

The consumer, in three layers (one class each, the last installed by :func:`install`):

* :mod:`app.engine.seeking` - where each partition's reading stands; every seek.
* :mod:`app.engine.fetching` - fetched records handed to the agents (Faust's
  ``_drain_messages``, copied and changed), the fetch pace, flow control that keeps
  queued records through a resume.
* :mod:`app.engine.consumer` - what is committed: the strict commit rule, held and
  stranded partitions healed by re-reading, :func:`~app.engine.consumer.install`.

Around it:

* :mod:`app.engine.guard` - the last check of every commit (an offset past records not
  proven done is refused, logged and counted).
* :mod:`app.engine.lanes` and :mod:`app.engine.batching` - one batch contract
  (``each_batch``: the batch is acked once its handler returns; a handler that raises
  leaves it unacked, logged, read again): ingest and deliver take records handed over
  in bulk, transactions, status and stats Faust's stream events; the delay tiers use
  ``batches`` and ack what they forward themselves.
* :mod:`app.engine.producing` - ``emit``/``emit_until_durable``: durable produce, awaited
  with the batch; :mod:`app.engine.changelog` - table state written with the batch.
* :mod:`app.engine.parking` - a delay tier's partition paused while its head sleeps,
  sought back and resumed before it wakes.
* :mod:`app.engine.nodes` - a broker whose request timed out is left alone for a while by
  the worker's Kafka clients, not reconnected to one timeout after another.
* :mod:`app.engine.reading` - a topic (or partitions) read to its end, outside any group;
  :mod:`app.engine.clients` - plain clients and the security every client shares;
  :mod:`app.engine.admin` - the fleet's topics created with their settings.
* :mod:`app.engine.offsets` - a read-only view of consumer state: assignment,
  committed and acked offsets, held partitions, lag (readiness, lag metrics, views).
* :mod:`app.engine.store` - the ``rocksdb://`` table store, corrected.
* :mod:`app.engine.tables` - a GlobalTable over a topic of the fleet's choosing (the
  namespaces).
* :mod:`app.engine.worker` - the ``wal worker`` process: Faust's worker, with signal
  handling that stops within a deadline.
* :mod:`app.engine.sensors` - Faust's monitor, lean; :mod:`app.engine.partitioner` -
  the producer's partitioner, for keys computed outside a producer.
"""
