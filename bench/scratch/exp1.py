import os, time, sys
for k,v in {"HF_HUB_OFFLINE":"1","VLLM_CPU_KVCACHE_SPACE":"1","VLLM_ENABLE_V1_MULTIPROCESSING":"0","VLLM_LOGGING_LEVEL":"ERROR","TOKENIZERS_PARALLELISM":"false","HF_HOME":os.path.abspath(".cache/hf"),"VLLM_CACHE_ROOT":os.path.abspath(".cache/vllm")}.items(): os.environ.setdefault(k,v)
if __name__ == "__main__":
    from vecap.backends import EngineSpec, Sampling, Request, load_engine
    from vecap.reader import ShardReader
    from vecap.images import prepare_image
    from vecap.prompts import load_prompt
    imgs=[]
    for s in ["00000","00001"]:
        for smp in ShardReader(".cache/bench/data/s256/images", s):
            if smp.image:
                try: imgs.append(prepare_image(smp.image, 64, 64_000_000, 32<<20).to_pil())
                except Exception as e: pass
    print(len(imgs))
    msgs = load_prompt("caption","concise").messages(image=True)
    be = sys.argv[1]
    spec = EngineSpec(backend=be, model=".cache/bench/models/bench-llava", multimodal=True, sampling=Sampling(24,0.0,1.0), dtype="float32", engine_kwargs={"max_model_len":512,"enforce_eager":True} if be=="vllm" else {})
    t=time.time(); eng=load_engine(spec); print("start", time.time()-t)
    reqs=[Request(messages=msgs, seed=i, image=im) for i,im in enumerate(imgs)]
    for bs in [16, 64]:
        t=time.time(); n=0; toks=0
        for i in range(0, len(reqs), bs):
            out=eng.generate(reqs[i:i+bs]); n+=len(out); toks+=sum(g.n_output_tokens or 0 for g in out)
        dt=time.time()-t; print(be, "bs",bs, n, "imgs", dt, n/dt, "img/s", toks/n, "tok/img", out[0])
