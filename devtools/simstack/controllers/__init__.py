"""The simulated cluster's controllers: deployment + replicaset controller, scheduler, cluster-autoscaler
and kubelet (with faults), all on the sim's one event loop, writing real-form objects to the store.

Every controller is woken by store changes (``Store.listeners``) or by asyncio timers; nothing polls.
Simulated durations (``simstack.timings``) are multiplied by ``time_scale``.

One module a concern: :mod:`~simstack.controllers.cluster` (:class:`Cluster`, the controllers assembled)
over :mod:`~simstack.controllers.context` (what they share), :mod:`~simstack.controllers.deployment`,
:mod:`~simstack.controllers.scheduler`, :mod:`~simstack.controllers.autoscaler`,
:mod:`~simstack.controllers.kubelet`, :mod:`~simstack.controllers.faults`, and the helpers
:mod:`~simstack.controllers.loop`, :mod:`~simstack.controllers.events`, :mod:`~simstack.controllers.objects`.
"""
