"""Expert service: a shard of routed-expert FFN weights behind a bidirectional stream."""
