"""Host-side confinement of a workspace's VM: network policy (network.py) and the jailer (jail.py)."""
