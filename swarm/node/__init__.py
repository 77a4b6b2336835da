"""A peer's presence in the swarm, below the training loop and the verification layer that both use it: its state
(:mod:`swarm.node.state`), its façade over the DHT and averager (:class:`swarm.node.peer.SwarmPeer`), its view of
who counts (:mod:`swarm.node.trust`) and what a round produced (:mod:`swarm.node.rounds`)."""
