"""A small simulated Immich for the demo and the tests: NOT part of the exporter.

* ``releases``: what each Immich release's API looks like to an API key (routes, the permission each
  needs, admin routes, queues, job names), with the Immich sources each row follows.
* ``api.SimulatedApi``: an aiohttp server that answers the part of Immich's HTTP API the exporter uses
  (ping, version, ``users/me``, ``api-keys/me``, queue status, ``POST /api/assets/jobs``,
  ``PUT /api/people/{id}``) as the chosen release does, for keys with their own permissions and users,
  and queues real BullMQ jobs with Immich's prefix, job names and options. Knobs reproduce what goes
  wrong in the field: a 5xx, another user's or a locked asset refusing a whole batch, and Immich
  v3.0.0's "204 and nothing queued".
* ``worker.SimulatedWorker``: a BullMQ worker (the Python ``bullmq`` package, named like Immich v3's
  ``:w:<name>``) that plays Immich's thumbnail worker on the demo's database and media folder. It takes a
  job after a short delay and writes the asset's thumbnail and preview (or a person's face thumbnail);
  like Immich's processor it
  catches the handler's errors and completes every job with ``null``.

The exporter never imports this package; only ``demo`` and the tests do.
"""
