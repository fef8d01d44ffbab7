"""transformers ``generate``, batched with left padding: the research-script baseline.

Greedy requests run as one padded batch. Sampled requests run one at a time under
their own seed, since ``generate`` has a single random stream per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vecap.backends.base import ChatEngine, EngineSpec, Generation, Request, load_chat_renderer


class HFEngine(ChatEngine):
    def __init__(self, spec: EngineSpec) -> None:
        super().__init__(spec)
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        self._torch = torch
        self._render, self.processor = load_chat_renderer(spec.model, spec.trust_remote_code)
        tok = getattr(self.processor, "tokenizer", self.processor)
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.tokenizer = tok
        dtype = (
            "auto"
            if spec.dtype == "auto"
            else getattr(torch, {"half": "float16", "float": "float32"}.get(spec.dtype, spec.dtype))
        )
        auto = AutoModelForImageTextToText if spec.multimodal else AutoModelForCausalLM
        self.hf_model = self._load_model(auto, dtype).eval()

    def _load_model(self, auto: Any, dtype: Any) -> Any:
        """The model from ``spec.model``'s weights (``engine_kwargs`` go to ``from_pretrained``, e.g.
        ``device_map``); a subclass may build it otherwise (bench.gpu_hf: random weights on the GPU)."""
        spec = self.spec
        return auto.from_pretrained(
            spec.model, dtype=dtype, trust_remote_code=spec.trust_remote_code, **spec.engine_kwargs
        )

    def _generate(self, requests: Sequence[Request]) -> list[Generation]:
        if self.spec.sampling.temperature > 0:
            return [self._run([r], seed=r.seed)[0] for r in requests]
        return self._run(requests, seed=None)

    def _run(self, requests: Sequence[Request], seed: int | None) -> list[Generation]:
        torch = self._torch
        s = self.spec.sampling
        prompts = [self._render(r.messages) for r in requests]
        if self.spec.multimodal:
            inputs = self.processor(
                text=prompts,
                images=[r.image for r in requests],
                padding=True,
                return_tensors="pt",
                add_special_tokens=False,  # the chat template already holds BOS
            )
        else:
            inputs = self.tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
        inputs = inputs.to(self.hf_model.device)  # a model on a GPU (device_map) takes its inputs there
        if seed is not None:
            torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.hf_model.generate(
                **inputs,
                max_new_tokens=s.max_new_tokens,
                do_sample=s.temperature > 0,
                temperature=s.temperature if s.temperature > 0 else None,
                top_p=s.top_p if s.temperature > 0 else None,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        n_in = inputs["input_ids"].shape[1]
        eos = self.hf_model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        results = []
        for i in range(len(requests)):
            ids = out[i, n_in:].tolist()
            stopped = False
            for j, t in enumerate(ids):
                if t in eos_ids:
                    ids, stopped = ids[:j], True
                    break
            results.append(
                Generation(
                    text=self.tokenizer.decode(ids, skip_special_tokens=True),
                    finish_reason="stop" if stopped or len(ids) < s.max_new_tokens else "length",
                    n_prompt_tokens=int(inputs["attention_mask"][i].sum()),
                    n_output_tokens=len(ids) + (1 if stopped else 0),
                )
            )
        return results
