"""vLLM offline engine, held for the life of the actor; many requests per call.

vLLM batches continuously inside one ``generate`` call, so the stage hands it whole
batches. Prefix caching is on by default: the fixed instructions of a prompt are
computed once and reused by every sample.
"""

from __future__ import annotations

from collections.abc import Sequence

from vecap.backends.base import ChatEngine, EngineSpec, Generation, Request, load_chat_renderer


class VLLMEngine(ChatEngine):
    def __init__(self, spec: EngineSpec) -> None:
        super().__init__(spec)
        from vllm import LLM, SamplingParams

        self._sampling_params = SamplingParams
        kwargs = {"enable_prefix_caching": True, "seed": 0}
        if spec.multimodal:
            kwargs["limit_mm_per_prompt"] = {"image": 1}
        kwargs.update(spec.engine_kwargs)
        self.llm = LLM(model=spec.model, dtype=spec.dtype, trust_remote_code=spec.trust_remote_code, **kwargs)
        self._render, _ = load_chat_renderer(spec.model, spec.trust_remote_code)

    def _generate(self, requests: Sequence[Request]) -> list[Generation]:
        s = self.spec.sampling
        inputs = []
        params = []
        for r in requests:
            prompt = self._render(r.messages)
            inputs.append({"prompt": prompt, "multi_modal_data": {"image": r.image}} if r.image is not None else prompt)
            params.append(
                self._sampling_params(
                    max_tokens=s.max_new_tokens,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    seed=r.seed if s.temperature > 0 else None,
                )
            )
        # The chat template already holds BOS and the other special tokens (as in vLLM's chat path).
        outputs = self.llm.generate(
            inputs, params, use_tqdm=False, tokenization_kwargs={"add_special_tokens": False}
        )
        result = []
        for out in outputs:
            comp = out.outputs[0]
            result.append(
                Generation(
                    text=comp.text,
                    finish_reason=comp.finish_reason,
                    n_prompt_tokens=len(out.prompt_token_ids or []),
                    n_output_tokens=len(comp.token_ids),
                )
            )
        return result

    def close(self) -> None:
        del self.llm
