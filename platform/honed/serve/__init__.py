"""Ray Serve: the OpenAI-compatible endpoint (app: deployments; protocol: wire format; residency: adapters on a
replica's model; batcher: continuous batching; lora: per-row LoRA; deploy: start / stop)."""
