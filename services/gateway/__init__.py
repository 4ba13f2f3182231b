"""Gateway service: public API, tokenizer, engine with continuous batching, dense model part."""
