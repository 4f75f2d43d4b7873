"""The supervisor's timeouts and bounds (one place: the boot loop, the channel and the controls read them)."""

from __future__ import annotations

HALT_TIMEOUT = 30.0
KVM_FAILURE_MARKERS = ("KVM internal error", "emulation failure", "kvm run failed")
RESTART_DELAYS = (1, 2, 4, 8, 16, 30)  # bounded back-off between restarts, seconds
MAX_CONSECUTIVE_RESTARTS = 10
STABLE_AFTER = 30.0  # a VM that ran this long resets the back-off
#: the guest stream the supervisor's own liveness pings use (never given to a command)
LIVENESS_STREAM = 0xFFFFFFFF
PING_INTERVAL = 2.0  # seconds between liveness pings
LIVENESS_TIMEOUT = 10.0  # a ping unanswered this long saves execReady false (the VM is left running)
#: bytes the supervisor may queue towards the agent before a client's stdin waits for the guest to read
AGENT_BUFFER_LIMIT = 1 << 20
