"""What a results location holds, and the only code that reads or writes it (one module per idea):

- :mod:`~pipeline.store.errors`: storage errors classified once (transient: retried with backoff and
  jitter; permanent: one line), and the retry rule every store call goes through.
- :mod:`~pipeline.store.objects`: a folder-like location on a local disk or object storage
  (:class:`~pipeline.store.objects.Store`): whole, atomic writes, compare-and-set, listings.
- :mod:`~pipeline.store.results`: a results location (:class:`~pipeline.store.results.Results`),
  its tables' schemas and keys.
- :mod:`~pipeline.store.estimates`: what an estimate is, its hive-style folder
  (``tables/eval/run_id=<id>/estimate=<name>/``), and the one reader of estimates.
- :mod:`~pipeline.store.ledger`: what is done, decided by name (one listing, no downloads), and
  ``repair``, which checks contents and moves damaged files aside.
- :mod:`~pipeline.store.leases`: a lease per run, held by the task that trains it.

Nothing outside this package opens a filesystem or an object-store client.
"""
