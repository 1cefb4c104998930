"""Detection: sliding windows over the datapath's counters, and the per-VM
state machine that turns thresholds into flags, throttles and blocks."""
