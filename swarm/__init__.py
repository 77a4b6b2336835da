"""swarm: many independent machines fine-tune one language model together over the Hivemind DHT."""

__version__ = "0.1.0"
