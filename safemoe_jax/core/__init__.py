"""The model: configuration schema, the Llama-family decoder, the SafeMoE experts and router,
and the sharding rules."""
