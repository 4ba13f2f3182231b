"""Router service: gating, dispatch to expert shards, weighted combine."""
