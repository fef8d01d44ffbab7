import os, time, sys
for k,v in {"HF_HUB_OFFLINE":"1","VLLM_CPU_KVCACHE_SPACE":"1","VLLM_ENABLE_V1_MULTIPROCESSING":"0","VLLM_LOGGING_LEVEL":"ERROR","TOKENIZERS_PARALLELISM":"false","HF_HOME":os.path.abspath(".cache/hf"),"VLLM_CACHE_ROOT":os.path.abspath(".cache/vllm")}.items(): os.environ.setdefault(k,v)
if __name__ == "__main__":
    from vecap.backends import EngineSpec, Sampling, Request, load_engine
    from vecap.prompts import load_prompt
    from vecap.reader import read_parquet_rows
    from vecap import fusion
    p = load_prompt("fuse","vecap")
    rows = read_parquet_rows(".cache/bench/data/s256/images","00000")+read_parquet_rows(".cache/bench/data/s256/images","00001")
    reqs=[]
    for i,r in enumerate(rows):
        alt = fusion.clean_alt_text(r.get("caption"), 64)
        reqs.append(Request(messages=p.messages(alt_text=alt or "none", vlm_caption="A red car parked on a city street next to a blue bicycle."), seed=i))
    pc = sys.argv[1]=="1"
    spec = EngineSpec(backend="vllm", model=".cache/bench/models/bench-llama", sampling=Sampling(48,0.0,1.0), dtype="float32", engine_kwargs={"max_model_len":2048,"enforce_eager":True,"enable_prefix_caching":pc})
    t=time.time(); eng=load_engine(spec); print("start", time.time()-t)
    reqs=reqs[:64]
    for bs in [32]:
      for rep in range(2):
        t=time.time(); n=0
        for i in range(0, len(reqs), bs):
            t1=time.time(); out=eng.generate(reqs[i:i+bs]); n+=len(out); print(f"  call bs={bs} {len(out)} {time.time()-t1:.2f}s ptoks={out[0].n_prompt_tokens} otoks={out[0].n_output_tokens}")
        dt=time.time()-t; print("pc",pc, "bs",bs, n, round(dt,2), round(n/dt,2), "fus/s")
