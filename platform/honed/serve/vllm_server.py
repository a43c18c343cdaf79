"""Ray Serve LLM's LLMServer (vLLM) as honed deploys it: adapters load one at a time per replica.

Imported only where vLLM is installed (`engine: vllm`; honed.serve.vllm_engine builds the deployments).
"""

from __future__ import annotations

import asyncio

from ray.serve.llm import LLMServer


class SerializedLoraServer(LLMServer):
    """LLMServer whose LoRA loads run one after another. Ray Serve LLM checks whether vLLM holds an adapter and
    then loads it; two first requests for one adapter both passed the check and the second failed with vLLM's
    "already been loaded" (HTTP 500). Under the lock the second finds it loaded."""

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        if "_lora_lock" not in self.__dict__:  # made on the replica's event loop, on first use
            self._lora_lock = asyncio.Lock()
        async with self._lora_lock:
            await super()._maybe_resolve_lora_from_multiplex()
