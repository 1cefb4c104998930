"""The response to detection: the responder (counters in, detector's verdicts
out to the keeper, the trip wire, incidents and the webhook), the incident book
and the store they persist in. A room of its own, not inside detect/, because
detection stays pure code (snapshots, policy, clock -> verdicts) while responding
touches the kernel, sqlite and the network; it may import detect, enforce,
datapath, inventory, policy, fleet.record and observe, never daemon/ or api/
(detect/engine saves through respond.store, which imports only detect.machine)."""
