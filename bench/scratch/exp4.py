import os, time, sys, resource
for k,v in {"HF_HUB_OFFLINE":"1","VLLM_CPU_KVCACHE_SPACE":"1","VLLM_ENABLE_V1_MULTIPROCESSING":"0","VLLM_LOGGING_LEVEL":"ERROR","TOKENIZERS_PARALLELISM":"false","HF_HOME":os.path.abspath(".cache/hf"),"VLLM_CACHE_ROOT":os.path.abspath(".cache/vllm")}.items(): os.environ.setdefault(k,v)
if __name__ == "__main__":
    from vecap.backends import EngineSpec, Sampling, Request, load_engine
    from vecap.reader import ShardReader
    from vecap.images import prepare_image
    from vecap.prompts import load_prompt
    imgs=[]
    for s in ["00001"]:
        for smp in ShardReader(".cache/bench/data/s256/images", s):
            if smp.image:
                try: imgs.append(prepare_image(smp.image, 64, 64_000_000, 32<<20).to_pil())
                except Exception as e: pass
    msgs = load_prompt("caption","concise").messages(image=True)
    spec = EngineSpec(backend="vllm", model=".cache/bench/models/bench-llava", multimodal=True, sampling=Sampling(24,0.0,1.0), dtype="float32", engine_kwargs={"max_model_len":512,"enforce_eager":True})
    t=time.time(); eng=load_engine(spec); print("start", time.time()-t)
    reqs=[Request(messages=msgs, seed=i, image=im) for i,im in enumerate(imgs)][:32]
    for rep in range(6):
        t=time.time(); c=time.process_time(); out=eng.generate(reqs); print(f"call {rep} wall {time.time()-t:.2f}s cpu {time.process_time()-c:.2f}s load {os.getloadavg()[0]:.1f}")
